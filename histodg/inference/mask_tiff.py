"""`mask.ome.tiff`: the thresholded mask (0/255) at level-0 geometry as a pyramidal OME-TIFF; and
with `--outputs prob-tiff`, `prob.ome.tiff`: the probability itself (uint8 0-255), the same pyramid.

Tiled 512, deflate, pyramid levels as SubIFDs halving down to <= 1024 px, PhysicalSizeX/Y and
the TIFF resolution tags set to the slide's mpp: QuPath, tifffile and tiffslide open it. Level
pixel (x, y) takes the mask value of the output pixel under its centre (nearest neighbour), so
every level is exact, not a blur of the last. All levels are built in one pass over the
probability bands (`feed`); their compressed tiles wait in a spool file until `finish`.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..files import atomic_write, new_temporary
from .rasters import sample_index, threshold_u8

TIFF_TILE = 512
PYRAMID_MIN_PX = 1024  # the smallest level has its longest side at most this


def pyramid_shapes(width: int, height: int, min_px: int = PYRAMID_MIN_PX) -> list[tuple[int, int]]:
    """(width, height) of each level: level 0, then halving until the longest side is <= min_px."""
    shapes = [(width, height)]
    while max(shapes[-1]) > min_px:
        w, h = shapes[-1]
        shapes.append((max(1, -(-w // 2)), max(1, -(-h // 2))))
    return shapes


class _Level:
    """One pyramid level built from output-resolution bands: its rows are filled in order, and each
    completed row of tiles is compressed and appended to a spool file (memory: one tile row)."""

    def __init__(self, shape, downsample: float, level0_per_px: float, out_shape, spool, level: int = 1, scale: int = 255):
        self.w, self.h = shape
        t = TIFF_TILE
        self.src_rows = sample_index(self.h, downsample, level0_per_px, out_shape[0])
        cols = sample_index(self.w, downsample, level0_per_px, out_shape[1])
        self.cols = None if np.array_equal(cols, np.arange(self.w)) and self.w <= out_shape[1] else cols
        self.buf = np.zeros((t, -(-self.w // t) * t), np.uint8)  # the mask as 0/1 (x `scale` when written), or the probability
        self.scale = np.uint8(scale)
        self.next_row = 0
        self.dirty = False
        self.spool = spool
        self.tiles: list[tuple[int, int]] = []  # (offset, length) in the spool, tile by tile
        self.level = level
        self._known: dict[str, tuple[int, int]] = {}

    def feed(self, r0: int, band: np.ndarray | None, rows: int) -> None:
        """`band`: uint8 rows r0..r0+rows of the output grid (0/1 for a mask), or None when they are all 0."""
        t = TIFF_TILE
        y1 = int(np.searchsorted(self.src_rows, r0 + rows, side="left"))
        while self.next_row < y1:
            y = self.next_row
            y_end = min(y1, (y // t + 1) * t)
            if band is not None:
                src_rows = self.src_rows[y:y_end] - r0
                if src_rows[-1] - src_rows[0] == len(src_rows) - 1:  # consecutive rows: a view, no copy
                    src = band[src_rows[0] : src_rows[-1] + 1]
                else:
                    src = band[src_rows]
                if self.cols is not None:
                    src = src[:, self.cols]
                self.buf[y % t : y % t + (y_end - y), : self.w] = src[:, : self.w]
                self.dirty = True
            self.next_row = y_end
            if y_end % t == 0 or y_end == self.h:
                self._emit(y_end - (y // t) * t)

    def _emit(self, rows: int) -> None:
        t = TIFF_TILE
        n = -(-self.w // t)
        if not self.dirty:  # a row of empty tiles
            self.tiles.extend([self._shared("empty", self.buf[:, :t])] * n)
            return
        self.buf[rows:] = 0
        for x in range(0, self.w, t):
            tile = self.buf[:, x : x + t]
            if not tile.any():
                self.tiles.append(self._shared("empty", tile))
            elif self.scale == 255 and tile.all():  # a mask's all-tumour tile (a probability's rarely repeats)
                self.tiles.append(self._shared("full", tile))
            else:
                self.tiles.append(self._write(zlib.compress((tile * self.scale).tobytes(), self.level)))
        self.buf[:] = 0
        self.dirty = False

    def _shared(self, key: str, tile) -> tuple[int, int]:
        if key not in self._known:
            self._known[key] = self._write(zlib.compress((tile * self.scale).tobytes(), self.level))
        return self._known[key]

    def _write(self, data: bytes) -> tuple[int, int]:
        offset = self.spool.tell()
        self.spool.write(data)
        return offset, len(data)

    def tile_bytes(self, fd: int):
        for offset, length in self.tiles:
            yield os.pread(fd, length, offset)


class OmeTiffMask:
    """Builds every pyramid level of the thresholded mask in one pass over the output bands
    (`feed`), compressed tiles spooled to a temporary file, then writes the OME-TIFF (`finish`).
    `threshold` None: the probability itself (uint8 0-255), not a mask."""

    def __init__(self, path: Path, level0_per_px: float, level0_size, out_shape, mpp: float | None, threshold: float | None):
        self.path = Path(path)
        self.cut = None if threshold is None else threshold_u8(threshold)
        self.mpp = mpp
        self.dims = tuple(int(v) for v in level0_size)
        self.shapes = pyramid_shapes(*self.dims)
        self.spool_path = new_temporary(self.path, "tiles")  # never a link planted at a guessable name
        self.spool = open(self.spool_path, "r+b")
        w0 = self.dims[0]
        self.levels = [_Level(s, w0 / s[0] if i else 1.0, level0_per_px, out_shape, self.spool,
                              scale=1 if self.cut is None else 255) for i, s in enumerate(self.shapes)]

    def feed(self, r0: int, band: np.ndarray) -> None:
        values = band if self.cut is None else (band >= self.cut).view(np.uint8)
        data = values if values.any() else None
        for lv in self.levels:
            lv.feed(r0, data, band.shape[0])

    def finish(self, name: str = "tumor mask") -> list[tuple[int, int]]:
        try:
            atomic_write(self.path, lambda tmp: self._write(tmp, name))
        finally:
            self.close()
        return self.shapes

    def _write(self, tmp: Path, name: str) -> None:
        import tifffile

        self.spool.flush()
        fd = self.spool.fileno()
        w0, h0 = self.dims
        meta: dict[str, Any] = {"axes": "YX", "Name": name}
        if self.mpp:
            meta.update({"PhysicalSizeX": float(self.mpp), "PhysicalSizeXUnit": "µm",
                         "PhysicalSizeY": float(self.mpp), "PhysicalSizeYUnit": "µm"})
        with tifffile.TiffWriter(tmp, bigtiff=w0 * h0 > 2**31, ome=True) as tif:
            for i, ((w, h), lv) in enumerate(zip(self.shapes, self.levels)):
                if lv.next_row != h:
                    raise RuntimeError(f"pyramid level {i} got {lv.next_row} of {h} rows")
                ds = w0 / w if i else 1.0
                kw: dict[str, Any] = dict(shape=(h, w), dtype=np.uint8, tile=(TIFF_TILE, TIFF_TILE), compression="zlib",
                          photometric="minisblack")
                if self.mpp:
                    kw.update(resolution=(1e4 / (self.mpp * ds), 1e4 / (self.mpp * ds)), resolutionunit="CENTIMETER")
                if i == 0:
                    tif.write(lv.tile_bytes(fd), subifds=len(self.shapes) - 1, metadata=meta,
                              software=f"histodg {__version__}", **kw)
                else:
                    tif.write(lv.tile_bytes(fd), subfiletype=1, metadata=None, **kw)

    def close(self) -> None:
        if not self.spool.closed:
            self.spool.close()
        self.spool_path.unlink(missing_ok=True)
