"""Reading a probability map in bands, and the low-resolution views made from it.

`prob.zarr` is uint8 0-255 at the model's resolution (one output pixel = `level0_per_px`
level-0 pixels). Every writer reads it one chunk row at a time (`iter_bands`, skipping chunks
known to be empty), so memory depends on the slide's width at most, never on its area.

- `threshold_u8`: the uint8 cut of a probability threshold (mask = prob_u8 >= cut);
- `BlockReducer`: block means over f x f output pixels, fed band by band (the map the GeoJSON
  and the overlay are made from, `contour_factor` keeps it under a pixel budget);
- `write_mask_png`: the 0/255 mask at the input's own size (plain images);
- `write_overlay`: a thumbnail with the mask tinted and outlined.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from ..files import atomic_write

CONTOUR_BUDGET_PX = 16_000_000  # mask pixels traced at once (the traced grid is 4x that, uint8)


def threshold_u8(threshold: float) -> int:
    """The uint8 cut matching a probability threshold: mask = prob_u8 >= this (never 0)."""
    return int(np.clip(math.ceil(threshold * 255 - 1e-9), 1, 255))


def sample_index(count: int, downsample: float, level0_per_px: float, limit: int) -> np.ndarray:
    """Output-grid indices under the centres of `count` level pixels (`downsample` level-0 px
    each): nearest-neighbour sampling of the output grid on any grid aligned with level 0."""
    idx = np.floor((np.arange(count) + 0.5) * (downsample / level0_per_px)).astype(np.int64)
    return np.clip(idx, 0, limit - 1)


def iter_bands(prob, nonempty=None):
    """(first row, rows) of an (H, W) uint8 array (zarr or numpy), one chunk row at a time.

    `nonempty`: the (chunk row, chunk column) keys holding data, when known (predict records
    them); other chunks are zeros and not read at all."""
    h, w = (int(v) for v in prob.shape)
    chunks = getattr(prob, "chunks", None) or (512, 512)
    ch, cw = int(chunks[0]), int(chunks[1])
    by_row = None
    if nonempty is not None:
        by_row = {}
        for cy, cx in nonempty:
            by_row.setdefault(int(cy), []).append(int(cx))
    for cy, r0 in enumerate(range(0, h, ch)):
        r1 = min(r0 + ch, h)
        if by_row is None:
            yield r0, np.asarray(prob[r0:r1, :])
            continue
        band = np.zeros((r1 - r0, w), np.uint8)
        cols = sorted(by_row.get(cy, ()))
        i = 0
        while i < len(cols):  # read runs of consecutive chunks in one call
            j = i
            while j + 1 < len(cols) and cols[j + 1] == cols[j] + 1:
                j += 1
            c0, c1 = cols[i] * cw, min((cols[j] + 1) * cw, w)
            band[:, c0:c1] = prob[r0:r1, c0:c1]
            i = j + 1
        yield r0, band


def contour_factor(shape: tuple[int, int], budget_px: int = CONTOUR_BUDGET_PX) -> int:
    """The smallest integer reduction f so that the (H/f, W/f) mask fits the budget."""
    h, w = shape
    return max(1, math.ceil(math.sqrt(h * w / budget_px) - 1e-9))


class BlockReducer:
    """Block means over factor x factor output pixels (uint8), fed band by band in row order."""

    def __init__(self, shape: tuple[int, int], factor: int):
        self.h, self.w = (int(v) for v in shape)
        self.f = int(factor)
        self.wl = -(-self.w // self.f)
        self.out = np.zeros((-(-self.h // self.f), self.wl), np.uint8)
        self.rows_done = 0
        self.rest = np.zeros((0, self.wl * self.f), np.uint8)

    def feed(self, band: np.ndarray) -> None:
        f = self.f
        if not band.any() and not self.rest.any():  # nothing to average: the output stays zero
            total = len(self.rest) + band.shape[0]
            self.rows_done += total // f
            self.rest = np.zeros((total % f, self.wl * f), np.uint8)
            return
        if f == 1:
            self.out[self.rows_done : self.rows_done + band.shape[0]] = band
            self.rows_done += band.shape[0]
            return
        wide = np.zeros((band.shape[0], self.wl * f), np.uint8)
        wide[:, : self.w] = band
        data = np.concatenate([self.rest, wide]) if len(self.rest) else wide
        k = len(data) // f
        if k:
            r = self.rows_done
            self.out[r : r + k] = cv2.resize(data[: k * f], (self.wl, k), interpolation=cv2.INTER_AREA)
            self.rows_done += k
        self.rest = data[k * f :]

    def finish(self) -> np.ndarray:
        if self.f > 1 and len(self.rest):
            pad = np.zeros((self.f, self.wl * self.f), np.uint8)
            pad[: len(self.rest)] = self.rest
            self.out[self.rows_done] = cv2.resize(pad, (self.wl, 1), interpolation=cv2.INTER_AREA)[0]
            self.rest = self.rest[:0]
        return self.out


def write_mask_png(path: Path, prob, level0_per_px: float, level0_size: tuple[int, int], threshold: float,
                   nonempty=None) -> None:
    """The thresholded mask (0/255) at level-0 size (for plain images: the input's size)."""
    w0, h0 = (int(v) for v in level0_size)
    rows = sample_index(h0, 1.0, level0_per_px, prob.shape[0])
    cols = sample_index(w0, 1.0, level0_per_px, prob.shape[1])
    mask = np.zeros((h0, w0), np.uint8)
    cut = threshold_u8(threshold)
    for r0, band in iter_bands(prob, nonempty):
        sel = np.nonzero((rows >= r0) & (rows < r0 + band.shape[0]))[0]
        if len(sel):
            mask[sel] = np.where(band[rows[sel] - r0][:, cols] >= cut, 255, 0)
    _imwrite(path, mask)


def _imwrite(path: Path, img: np.ndarray) -> None:
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)

    def write(tmp):
        if not cv2.imwrite(str(tmp), img, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
            raise OSError(f"cannot write {path}")

    atomic_write(path, write)


def write_overlay(path: Path, thumbnail: np.ndarray, thumbnail_downsample: float, low_prob: np.ndarray,
                  low_per_level0: float, threshold: float, max_px: int = 1024) -> None:
    """The thumbnail (longest side <= max_px) with the mask tinted red and outlined.

    `low_prob` is the probability on a grid of `low_per_level0` level-0 px per pixel."""
    h, w = thumbnail.shape[:2]
    f = max(1.0, max(h, w) / max_px)
    size = (max(1, round(w / f)), max(1, round(h / f)))
    rgb = cv2.resize(thumbnail, size, interpolation=cv2.INTER_AREA) if f > 1 else thumbnail.copy()
    ds = thumbnail_downsample * (w / size[0])  # level-0 px per overlay px
    rows = sample_index(size[1], ds, low_per_level0, low_prob.shape[0])
    cols = sample_index(size[0], ds, low_per_level0, low_prob.shape[1])
    mask = low_prob[np.ix_(rows, cols)] >= threshold_u8(threshold)
    out = rgb.astype(np.float32)
    tint = np.array([220, 20, 60], np.float32)
    out[mask] = 0.6 * out[mask] + 0.4 * tint
    out = out.astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (200, 0, 0), 1)
    _imwrite(path, out)
