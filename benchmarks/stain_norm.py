#!/usr/bin/env python
"""Stain normalisation cost: histodg's batched Macenko/Reinhard against torchstain's one-image loop.

    .venv/bin/python benchmarks/stain_norm.py

Patches are crops of ../shared/data/he_carcinoma_1000.png (real H&E), the reference fitted on
two others. Each figure is the fastest of 5 runs, one thread, on the CPU (torchstain's torch
backend keeps its constants on the CPU, so its Reinhard cannot take a CUDA tensor at all); the
two outputs are compared pixel by pixel.
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import torch
import torchstain
from PIL import Image

from histodg.model.stain import StainNormalizer, fit_reference

HE = Path(__file__).resolve().parents[2] / "shared" / "data" / "he_carcinoma_1000.png"


def library(method: str, ref: dict):
    if method == "macenko":
        lib = torchstain.normalizers.MacenkoNormalizer(backend="torch")
        lib.HERef, lib.maxCRef = torch.tensor(ref["he"]), torch.tensor(ref["max_c"])
        return lambda img: lib.normalize(I=img, stains=False)[0]
    lib = torchstain.normalizers.ReinhardNormalizer(backend="torch")
    lib.target_means, lib.target_stds = torch.tensor(ref["means"]), torch.tensor(ref["stds"])
    return lib.normalize


def best(fn, n=5) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    rgb = np.asarray(Image.open(HE).convert("RGB"))
    rng = np.random.default_rng(0)
    print(f"Machine: {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, 1 thread\n")
    print("| method | batch | torchstain, one image at a time | histodg, batched | speed-up | max difference |")
    print("|---|---|---|---|---|---|")
    for method in ("macenko", "reinhard"):
        ref = fit_reference(method, [rgb[:256, :256], rgb[256:512, :256]])
        ours, theirs = StainNormalizer(ref), library(method, ref)
        for n, size in ((16, 128), (8, 512)):
            xy = rng.integers(0, 1000 - size, (n, 2))
            patches = [np.ascontiguousarray(rgb[y:y + size, x:x + size]) for x, y in xy]
            batch = torch.from_numpy(np.stack(patches)).permute(0, 3, 1, 2).float()
            imgs = [torch.from_numpy(p).permute(2, 0, 1) for p in patches]
            t_lib = best(lambda: [theirs(i) for i in imgs])
            t_ours = best(lambda: ours(batch))
            diff = (ours(batch) - torch.stack([theirs(i).float() for i in imgs]).permute(0, 3, 1, 2)).abs().max()
            print(f"| {method} | {n} x {size} px | {1000 * t_lib:.0f} ms | {1000 * t_ours:.0f} ms | "
                  f"{t_lib / t_ours:.1f}x | {diff:.0f} |")


if __name__ == "__main__":
    main()
