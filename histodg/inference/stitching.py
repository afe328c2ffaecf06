"""Stitching a sliding window's predictions: Gaussian weights, summed chunk by chunk.

    g = gaussian_map(tile)                          # importance of each window pixel
    acc = ChunkAccumulator((H, W), chunk=512, on_final=write)   # weighted sums, chunk by chunk
    acc.expect(windows, (tile, tile))               # (x, y) of every window, to finalise early
    acc.add(x, y, prob * g, g)                      # one window's weighted prediction
    acc.close()

Everything here is in output pixels (the model's resolution, (x, y) order); nothing knows
about slides. Where windows go is `slides.plan`'s job (`window_starts`: nnU-Net's steps).

Stitching: each output pixel gets sum_w g_w p_w / sum_w g_w over the windows w covering it
(0 where none does). The sums live in fixed-size float32 chunks. A chunk is finalised (the
division, handed to `on_final`) and dropped as soon as every window that touches it has been
added, so when windows come in strip order only a strip's worth of chunks is ever alive; chunks
pushed out of the bounded in-memory cache before then are spilled to files in a scratch folder
(compressed: areas without tissue are zeros) and read back when a window touches them again.
Peak memory is `cache_chunks` chunks, whatever the size of the slide.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np

GAUSSIAN_SIGMA = 1 / 8  # of the tile side (nnU-Net's choice)
GAUSSIAN_FLOOR = 1e-3  # relative to the centre: finite and positive everywhere, so edges still count


def gaussian_map(tile: int, sigma_scale: float = GAUSSIAN_SIGMA, floor: float = GAUSSIAN_FLOOR) -> np.ndarray:
    """(tile, tile) float32 importance map: a Gaussian centred on the window, sigma = tile / 8,
    1 at the centre, never below `floor` (window borders, where the context is poorest, count little)."""
    c = (tile - 1) / 2
    sigma = max(tile * sigma_scale, 1e-6)
    r = np.exp(-0.5 * ((np.arange(tile) - c) / sigma) ** 2)
    g = np.outer(r, r)
    g /= g.max()
    return np.maximum(g, floor).astype(np.float32)


def chunk_span(start: int, size: int, chunk: int, limit: int) -> range:
    """Indices of the chunks that [start, start + size) touches, clipped to [0, limit)."""
    a, b = max(start, 0), min(start + size, limit)
    if b <= a:
        return range(0)
    return range(a // chunk, (b - 1) // chunk + 1)


class ChunkAccumulator:
    """Gaussian-weighted sums over an (H, W) grid in (chunk, chunk) float32 tiles.

    `on_final(cy, cx, prob)` receives each finished chunk's probability (float32, 0 where no
    window contributed) exactly once: (h, w), or (channels, h, w) for `channels` > 1 (a multi-class
    model's class probabilities, each weighted alike); chunks no window touches are never materialised.
    `cache_chunks` bounds how many chunks are held in memory; more spill to `scratch`.
    """

    def __init__(self, shape: tuple[int, int], chunk: int, on_final: Callable[[int, int, np.ndarray], None],
                 cache_chunks: int = 64, scratch: Path | None = None, channels: int = 1):
        if chunk < 1:
            raise ValueError("chunk must be positive")
        self.channels = int(channels)  # planes per chunk: the channels' weighted sums, then the weights
        self.height, self.width = int(shape[0]), int(shape[1])
        self.chunk = int(chunk)
        self.ny = -(-self.height // self.chunk)
        self.nx = -(-self.width // self.chunk)
        self.on_final = on_final
        self.cache_chunks = max(1, int(cache_chunks))
        self.scratch = Path(scratch) if scratch is not None else None
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._spilled: set[tuple[int, int]] = set()
        self._pending: dict[tuple[int, int], int] = {}
        self.spills = 0  # counters, for tests and timings
        self.reloads = 0
        self.max_alive = 0
        self._codec = None

    # -- bookkeeping ---------------------------------------------------------------------------
    def _chunks_of(self, x: int, y: int, w: int, h: int):
        for cy in chunk_span(y, h, self.chunk, self.height):
            for cx in chunk_span(x, w, self.chunk, self.width):
                yield cy, cx

    def expect(self, windows, size: tuple[int, int]) -> None:
        """Announce every window (x, y) of size (w, h) that will be added or skipped, so that each
        chunk can be finalised as soon as its last window is in."""
        w, h = size
        for x, y in windows:
            for key in self._chunks_of(int(x), int(y), w, h):
                self._pending[key] = self._pending.get(key, 0) + 1

    def _extent(self, cy: int, cx: int) -> tuple[int, int]:
        return (min(self.chunk, self.height - cy * self.chunk), min(self.chunk, self.width - cx * self.chunk))

    def _get(self, key: tuple[int, int]) -> np.ndarray:
        buf = self._cache.get(key)
        if buf is not None:
            self._cache.move_to_end(key)
            return buf
        if key in self._spilled:
            buf = self._load(key)
            self.reloads += 1
        else:
            buf = np.zeros((self.channels + 1, *self._extent(*key)), np.float32)
        self._cache[key] = buf
        while len(self._cache) > self.cache_chunks:
            old, data = self._cache.popitem(last=False)
            self._spill(old, data)
        self.max_alive = max(self.max_alive, len(self._cache))
        return buf

    # -- spill files -----------------------------------------------------------------------------
    def _path(self, key) -> Path:
        if self.scratch is None:
            raise RuntimeError("the accumulator's cache is full and it has no scratch folder to spill to")
        return self.scratch / f"acc_{key[0]}_{key[1]}.bin"

    def _blosc(self):
        if self._codec is None:
            from numcodecs import Blosc

            self._codec = Blosc(cname="lz4", clevel=1, shuffle=Blosc.SHUFFLE)
        return self._codec

    def _spill(self, key, data: np.ndarray) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self._blosc().encode(np.ascontiguousarray(data)))
        self._spilled.add(key)
        self.spills += 1

    def _load(self, key) -> np.ndarray:
        """Take a spilled chunk back into memory (its file is removed)."""
        path = self._path(key)
        raw = self._blosc().decode(path.read_bytes())
        os.unlink(path)
        self._spilled.discard(key)
        return np.frombuffer(raw, np.float32).reshape(self.channels + 1, *self._extent(*key)).copy()

    # -- the work --------------------------------------------------------------------------------
    def add(self, x: int, y: int, weighted: np.ndarray, weight: np.ndarray) -> None:
        """Add one window with top-left (x, y): `weighted` = prob * weight, both (h, w) float32 (or
        `weighted` (channels, h, w)). Parts outside the grid are dropped (a padded window at the edge)."""
        h, w = weighted.shape[-2:]
        planes = weighted.reshape(-1, h, w)
        c = self.chunk
        for key in list(self._chunks_of(x, y, w, h)):
            cy, cx = key
            buf = self._get(key)
            y0, x0 = cy * c, cx * c
            ch, cw = buf.shape[1:]
            a0, a1 = max(y, y0), min(y + h, y0 + ch)
            b0, b1 = max(x, x0), min(x + w, x0 + cw)
            src = (slice(a0 - y, a1 - y), slice(b0 - x, b1 - x))
            dst = (slice(a0 - y0, a1 - y0), slice(b0 - x0, b1 - x0))
            buf[:-1][(slice(None), *dst)] += planes[(slice(None), *src)]
            buf[-1][dst] += weight[src]
            self._done_with(key)

    def skip(self, x: int, y: int, size: tuple[int, int]) -> None:
        """A window announced by `expect` that will not be added (it could not be read); size (w, h)."""
        for key in list(self._chunks_of(x, y, *size)):
            self._done_with(key)

    def _done_with(self, key) -> None:
        left = self._pending.get(key)
        if left is None:
            return  # not announced: finalised by close()
        if left > 1:
            self._pending[key] = left - 1
            return
        del self._pending[key]
        self._finalise(key)

    def _finalise(self, key) -> None:
        buf = self._cache.pop(key, None)
        if buf is None:
            if key not in self._spilled:
                return  # announced but nothing was ever added (every window skipped)
            buf = self._load(key)
        sums, weights = buf[:-1], buf[-1]
        prob = np.divide(sums, weights, out=np.zeros_like(sums), where=weights > 0)
        self.on_final(key[0], key[1], prob[0] if self.channels == 1 else prob)

    def close(self) -> None:
        """Finalise whatever is still open (chunks whose windows were not all announced)."""
        keys = set(self._cache) | set(self._spilled)
        self._pending.clear()
        for key in sorted(keys):
            self._finalise(key)
