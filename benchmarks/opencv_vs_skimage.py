#!/usr/bin/env python
"""Where histodg keeps OpenCV instead of scikit-image: the same operation, timed both ways.

    .venv/bin/python benchmarks/opencv_vs_skimage.py

Each row is one operation on the input histodg gives it (a resampled patch, a thumbnail block,
a 2500 px slide thumbnail), the median of a few runs, and whether the two results agree.
The table is in ARCHITECTURE.md ("Where OpenCV stays, and why").
"""
from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from skimage import color, filters, morphology, transform

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_slide  # noqa: E402


def ms(f, n=5) -> float:
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main() -> None:
    from histodg.slides.opening import open_slide

    rng = np.random.default_rng(0)
    patch = rng.integers(0, 256, (514, 514, 3), dtype=np.uint8)
    block = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    thumb = open_slide(ensure_slide(20000, REPO / "bench_out")).thumbnail(2500)
    sat = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[..., 1]
    mask = cv2.medianBlur(sat, 5) > 15
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    field = rng.random((2000, 2000)).astype(np.float32)
    rows = [
        ("resize 514 -> 512 px, bilinear", lambda: cv2.resize(patch, (512, 512), interpolation=cv2.INTER_LINEAR),
         lambda: transform.resize(patch, (512, 512), order=1, preserve_range=True, anti_aliasing=False), None),
        ("resize 1024 -> 512 px, area", lambda: cv2.resize(block, (512, 512), interpolation=cv2.INTER_AREA),
         lambda: transform.downscale_local_mean(block, (2, 2, 1)), None),
        ("HSV saturation, 2500 px thumbnail", lambda: cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[..., 1],
         lambda: color.rgb2hsv(thumb)[..., 1], lambda a, b: np.abs(a / 255 - b).max() < 0.005),
        ("median 5 px, 2500 px", lambda: cv2.medianBlur(sat, 5), lambda: filters.median(sat, footprint=np.ones((5, 5), bool)),
         np.array_equal),
        ("closing 5 px ellipse, 2500 px", lambda: cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool),
         lambda: morphology.closing(mask, kernel.astype(bool)), np.array_equal),
        ("gaussian blur sigma 3, 2000 px float", lambda: cv2.GaussianBlur(field, (0, 0), 3),
         lambda: filters.gaussian(field, 3), None),
    ]
    print(f"Machine: {platform.machine()}, Python {platform.python_version()}, OpenCV {cv2.__version__}\n")
    print("| operation | OpenCV ms | scikit-image ms | ratio | same result |\n|---|---|---|---|---|")
    for name, a, b, same in rows:
        ta, tb = ms(a), ms(b, 3)
        agree = "" if same is None else ("yes" if same(a(), b()) else "no")
        print(f"| {name} | {ta:.1f} | {tb:.1f} | {tb / ta:.0f}x | {agree} |")


if __name__ == "__main__":
    main()
