"""Tissue masks from a thumbnail: no weights, a few milliseconds.

``otsu`` (default): HSV saturation, median-smoothed, thresholded at Otsu's value clamped to
[0.02, 0.08]. Glass is grey (saturation near 0.01); stained tissue is above about 0.1. The
clamp keeps Otsu from splitting pale from dark tissue when the thumbnail is all tissue (a
COSAS patch), and from calling tinted glass tissue. Then closing, small objects removed,
small holes filled. ``saturation``: the fixed threshold 0.08 with the same clean-up.
``none``: everything is tissue (for image data sets that are all tissue).
"""
from __future__ import annotations

import cv2
import numpy as np

METHODS = ("otsu", "saturation", "none")
OTSU_CLAMP = (0.02, 0.08)
FIXED_THRESHOLD = 0.08


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1], smoothed with a 5-px median."""
    s = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[..., 1]
    if min(s.shape) >= 5:
        s = cv2.medianBlur(s, 5)
    return s.astype(np.float32) / 255.0


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of values in [0, 1] (256 bins)."""
    hist = np.bincount(np.clip((values.ravel() * 255).astype(np.int64), 0, 255), minlength=256).astype(np.float64)
    if hist.sum() == 0:
        return 0.5
    centers = (np.arange(256) + 0.5) / 256
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float((np.argmax(between[:-1]) + 1) / 256)


def tissue_mask(rgb: np.ndarray, method: str = "otsu", min_object_px: int = 16) -> np.ndarray:
    """Boolean (H, W) mask of tissue in an RGB thumbnail."""
    if method not in METHODS:
        raise ValueError(f"unknown tissue method {method!r} (choose from {', '.join(METHODS)})")
    if method == "none":
        return np.ones(rgb.shape[:2], bool)
    s = saturation(rgb)
    if method == "otsu":
        t = float(np.clip(otsu_threshold(s), *OTSU_CLAMP))
    else:
        t = FIXED_THRESHOLD
    dark = rgb.max(axis=2) < 25  # scanner margins and black borders are not tissue
    mask = (s > t) & ~dark
    return clean(mask, min_object_px)


def clean(mask: np.ndarray, min_object_px: int) -> np.ndarray:
    """Close small gaps, drop specks, fill small holes (lumens larger than specks stay)."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    m = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    if min_object_px > 0:
        m = _drop_small(m, min_object_px)
        m = ~_drop_small(~m, min_object_px)
    return m


def _drop_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    """Remove 8-connected components of fewer than `min_px` pixels."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False  # background label
    return keep[labels]


def window_fractions(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Mean of `mask` over each box (x0, y0, x1, y1) in mask pixels (floats, may leave the mask).

    Area outside the mask counts as no tissue; fractional pixel coverage is rounded to the
    nearest pixel edge. Uses an integral image: O(1) per box.
    """
    h, w = mask.shape
    ii = np.zeros((h + 1, w + 1), np.float64)
    ii[1:, 1:] = np.cumsum(np.cumsum(mask, 0, dtype=np.float64), 1)
    x0 = np.clip(np.round(boxes[:, 0]), 0, w).astype(np.int64)
    y0 = np.clip(np.round(boxes[:, 1]), 0, h).astype(np.int64)
    x1 = np.clip(np.round(boxes[:, 2]), 0, w).astype(np.int64)
    y1 = np.clip(np.round(boxes[:, 3]), 0, h).astype(np.int64)
    inside = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-9)
    return np.clip(inside / area, 0.0, 1.0).astype(np.float32)
