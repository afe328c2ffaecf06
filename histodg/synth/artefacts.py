"""Slide artefacts drawn onto real tissue, for the QC tests and benchmark (`slides.qc`).

    art, where = draw_artefacts(rgb)    # where["pen"], where["blur"], where["dark"]: boolean (H, W)

A blue marker stroke (ink multiplies the colour under it), a block out of focus (Gaussian blur
of sigma 3 px) and a fold (the optical density of the tissue times `FOLD_OD`: two or three
layers lying on each other), at fixed places in level-0 pixels of a slide at least 2200 x 2700 px
(the real slide in the tests' data). `scale` moves them for a larger slide.
"""
from __future__ import annotations

import numpy as np

BLUR = (300, 1200, 1100, 1900)  # x0, y0, x1, y1
BLUR_SIGMA = 3.0
PEN = ((100, 300), (900, 500), (1800, 350))
PEN_WIDTH = 120
PEN_INK = (40, 70, 170)  # a blue marker
FOLD = ((1200, 2100), (2100, 2000), (2150, 2500), (1250, 2600))
FOLD_OD = 2.5


def draw_artefacts(rgb: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`rgb` with a pen stroke, a blurred block and a fold drawn on; and where each one is."""
    import cv2

    h, w = rgb.shape[:2]
    out, where = rgb[..., :3].astype(np.float32), {}
    pen = (np.asarray(PEN, np.float64) * scale).astype(np.int32)
    where["pen"] = cv2.polylines(np.zeros((h, w), np.uint8), [pen], False, 1, max(1, round(PEN_WIDTH * scale))).astype(bool)
    out[where["pen"]] *= 0.25 + 0.75 * np.asarray(PEN_INK, np.float32) / 255
    x0, y0, x1, y1 = (round(v * scale) for v in BLUR)
    out[y0:y1, x0:x1] = cv2.GaussianBlur(out[y0:y1, x0:x1], (0, 0), BLUR_SIGMA)
    where["blur"] = np.zeros((h, w), bool)
    where["blur"][y0:y1, x0:x1] = True
    fold = (np.asarray(FOLD, np.float64) * scale).astype(np.int32)
    where["dark"] = cv2.fillPoly(np.zeros((h, w), np.uint8), [fold], 1).astype(bool)
    od = -np.log(np.maximum(out[where["dark"]], 1) / 255)
    out[where["dark"]] = 255 * np.exp(-FOLD_OD * od)
    return np.clip(out, 0, 255).astype(np.uint8), where
