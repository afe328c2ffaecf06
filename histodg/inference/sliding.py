"""The sliding window on an array, apart from files: `sliding_window(image, predict, tile, stride)`.

    prob = sliding_window(rgb, lambda crops: my_model(crops), tile=512, stride=256)   # (H, W) float32

nnU-Net's inference on one image held in memory, made of the three parts `predict_slide` runs over a
whole slide through its reader threads: windows flush with the edges at most `stride` apart
(`slides.plan.window_starts`), each window's probabilities weighted by `stitching.gaussian_map`, and
the weighted sums kept by `stitching.ChunkAccumulator`. For a region a lab already holds in memory,
and for testing the stitching on arrays without a slide reader in the way.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..slides.plan import window_starts
from .stitching import ChunkAccumulator, gaussian_map


def sliding_window(image: np.ndarray, predict: Callable[[np.ndarray], np.ndarray], tile: int, stride: int,
                   batch_size: int = 8, pad_value: int = 255) -> np.ndarray:
    """The (H, W) float32 probability of `predict` over an (H, W, 3) uint8 `image`.

    `predict` takes (N, tile, tile, 3) uint8 windows and returns (N, tile, tile) probabilities in
    [0, 1]; a window past the image's edge (an image smaller than `tile`) is padded with
    `pad_value` (white, as slides read outside their area). Each pixel is the Gaussian-weighted
    mean of the windows covering it."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), not {image.shape}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    h, w = image.shape[:2]
    windows = [(int(x), int(y)) for y in window_starts(h, tile, stride) for x in window_starts(w, tile, stride)]
    out = np.zeros((h, w), np.float32)
    chunk = 512

    def on_final(cy: int, cx: int, prob: np.ndarray) -> None:
        out[cy * chunk:cy * chunk + prob.shape[0], cx * chunk:cx * chunk + prob.shape[1]] = prob

    acc = ChunkAccumulator((h, w), chunk, on_final, cache_chunks=len(range(0, h, chunk)) * len(range(0, w, chunk)))
    acc.expect(windows, (tile, tile))
    g = gaussian_map(tile)
    for a in range(0, len(windows), batch_size):
        batch = windows[a:a + batch_size]
        probs = np.asarray(predict(np.stack([_crop(image, x, y, tile, pad_value) for x, y in batch])), np.float32)
        if probs.shape != (len(batch), tile, tile):
            raise ValueError(f"predict returned {probs.shape}, not ({len(batch)}, {tile}, {tile})")
        for (x, y), p in zip(batch, probs):
            acc.add(x, y, p * g, g)
    acc.close()
    return out


def _crop(image: np.ndarray, x: int, y: int, tile: int, pad_value: int) -> np.ndarray:
    crop = image[y:y + tile, x:x + tile]
    if crop.shape[:2] == (tile, tile):
        return crop
    padded = np.full((tile, tile, 3), pad_value, image.dtype)
    padded[:crop.shape[0], :crop.shape[1]] = crop
    return padded
