"""Writers for a slide's prediction: pyramidal OME-TIFF mask, QuPath GeoJSON, PNG overlay, mask PNG.

All of them read the probability map (``prob.zarr``: uint8 0-255 at the model's resolution, one
output pixel = `level0_per_px` level-0 pixels) one chunk row at a time (`iter_bands`, skipping
chunks known to be empty), so memory depends on the slide's width at most, never on its area.

- `OmeTiffMask` / `write_ome_tiff`: the thresholded mask at level-0 geometry (values 0/255), tiled
  512, deflate, pyramid levels as SubIFDs halving down to <= 1024 px, PhysicalSizeX/Y and the
  TIFF resolution tags set to the slide's mpp. Level pixel (x, y) takes the mask value of the
  output pixel under its centre (nearest neighbour), so every level is exact, not a blur of the
  last. All levels are built in one pass; their compressed tiles wait in a spool file.
- `mask_polygons` / `polygons_to_geojson`: outlines of the mask (holes included) on the line
  halfway between inside and outside pixel centres (marching squares on a mask whose diagonal
  pinches are filled, so every ring is simple), Douglas-Peucker simplified by 0.35 px: under the
  0.354 px at which a pixel centre could change sides, so a polygon rasterised at pixel centres
  gives its pixels back exactly, with 3-4x fewer vertices than the pixel outline (1 px would cost
  1-4% IoU on blobby masks). Level-0 coordinates, one QuPath annotation per region.
- `write_overlay`: a thumbnail with the mask tinted and outlined.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path

import cv2
import numpy as np

from . import __version__

TIFF_TILE = 512
PYRAMID_MIN_PX = 1024  # the smallest level has its longest side at most this
CONTOUR_BUDGET_PX = 16_000_000  # mask pixels traced at once (the traced grid is 4x that, uint8)
TUMOR_CLASS = {"name": "Tumor", "color": [200, 0, 0]}


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


# -- OME-TIFF ----------------------------------------------------------------------------------
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

    def __init__(self, shape, downsample: float, level0_per_px: float, out_shape, spool, level: int = 1):
        self.w, self.h = shape
        t = TIFF_TILE
        self.src_rows = sample_index(self.h, downsample, level0_per_px, out_shape[0])
        cols = sample_index(self.w, downsample, level0_per_px, out_shape[1])
        self.cols = None if np.array_equal(cols, np.arange(self.w)) and self.w <= out_shape[1] else cols
        self.buf = np.zeros((t, -(-self.w // t) * t), bool)
        self.next_row = 0
        self.dirty = False
        self.spool = spool
        self.tiles: list[tuple[int, int]] = []  # (offset, length) in the spool, tile by tile
        self.level = level
        self._known: dict[str, tuple[int, int]] = {}

    def feed(self, r0: int, band: np.ndarray | None, rows: int) -> None:
        """`band`: bool mask rows r0..r0+rows of the output grid, or None when they are all False."""
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
        self.buf[rows:] = False
        for x in range(0, self.w, t):
            tile = self.buf[:, x : x + t]
            if not tile.any():
                self.tiles.append(self._shared("empty", tile))
            elif tile.all():
                self.tiles.append(self._shared("full", tile))
            else:
                self.tiles.append(self._write(zlib.compress((tile * np.uint8(255)).tobytes(), self.level)))
        self.buf[:] = False
        self.dirty = False

    def _shared(self, key: str, tile) -> tuple[int, int]:
        if key not in self._known:
            self._known[key] = self._write(zlib.compress((tile * np.uint8(255)).tobytes(), self.level))
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
    (`feed`), compressed tiles spooled to a temporary file, then writes the OME-TIFF (`finish`)."""

    def __init__(self, path: Path, level0_per_px: float, level0_size, out_shape, mpp: float | None, threshold: float):
        self.path = Path(path)
        self.cut = threshold_u8(threshold)
        self.mpp = mpp
        self.dims = tuple(int(v) for v in level0_size)
        self.shapes = pyramid_shapes(*self.dims)
        self.spool_path = self.path.with_name(self.path.name + ".tiles.tmp")
        self.spool = open(self.spool_path, "w+b")
        w0 = self.dims[0]
        self.levels = [_Level(s, w0 / s[0] if i else 1.0, level0_per_px, out_shape, self.spool)
                       for i, s in enumerate(self.shapes)]

    def feed(self, r0: int, band: np.ndarray) -> None:
        mask = band >= self.cut
        if not mask.any():
            mask = None
        for lv in self.levels:
            lv.feed(r0, mask, band.shape[0])

    def finish(self, name: str = "tumor mask") -> list[tuple[int, int]]:
        import tifffile

        self.spool.flush()
        fd = self.spool.fileno()
        w0, h0 = self.dims
        meta = {"axes": "YX", "Name": name}
        if self.mpp:
            meta.update({"PhysicalSizeX": float(self.mpp), "PhysicalSizeXUnit": "µm",
                         "PhysicalSizeY": float(self.mpp), "PhysicalSizeYUnit": "µm"})
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with tifffile.TiffWriter(tmp, bigtiff=w0 * h0 > 2**31, ome=True) as tif:
                for i, ((w, h), lv) in enumerate(zip(self.shapes, self.levels)):
                    if lv.next_row != h:
                        raise RuntimeError(f"pyramid level {i} got {lv.next_row} of {h} rows")
                    ds = w0 / w if i else 1.0
                    kw = dict(shape=(h, w), dtype=np.uint8, tile=(TIFF_TILE, TIFF_TILE), compression="zlib",
                              photometric="minisblack")
                    if self.mpp:
                        kw.update(resolution=(1e4 / (self.mpp * ds), 1e4 / (self.mpp * ds)), resolutionunit="CENTIMETER")
                    if i == 0:
                        tif.write(lv.tile_bytes(fd), subifds=len(self.shapes) - 1, metadata=meta,
                                  software=f"histodg {__version__}", **kw)
                    else:
                        tif.write(lv.tile_bytes(fd), subfiletype=1, metadata=None, **kw)
            os.replace(tmp, self.path)
        finally:
            self.close()
        return self.shapes

    def close(self) -> None:
        if not self.spool.closed:
            self.spool.close()
        self.spool_path.unlink(missing_ok=True)


def write_ome_tiff(path: Path, prob, level0_per_px: float, level0_size: tuple[int, int], mpp: float | None,
                   threshold: float, name: str = "tumor mask", nonempty=None) -> list[tuple[int, int]]:
    """The thresholded mask (0/255) at level-0 geometry as a tiled, deflated, pyramidal OME-TIFF."""
    writer = OmeTiffMask(path, level0_per_px, level0_size, prob.shape, mpp, threshold)
    try:
        for r0, band in iter_bands(prob, nonempty):
            writer.feed(r0, band)
    except BaseException:
        writer.close()
        raise
    return writer.finish(name)


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
    tmp = Path(path).with_name(Path(path).stem + ".tmp.png")
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(tmp), img, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
        raise OSError(f"cannot write {path}")
    os.replace(tmp, path)


# -- low-resolution views --------------------------------------------------------------------------
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


def reduce_prob(prob, factor: int, nonempty=None) -> np.ndarray:
    """Block means of the probability over factor x factor output pixels (uint8), read in bands;
    partial blocks at the right and bottom edges average with zeros."""
    red = BlockReducer(prob.shape, factor)
    for _, band in iter_bands(prob, nonempty):
        red.feed(band)
    return red.finish()


# -- polygons --------------------------------------------------------------------------------------
def well_composed(mask: np.ndarray) -> np.ndarray:
    """The mask with every 2x2 'checkerboard' (two pixels touching only at a corner) filled in.

    Such pinches are where 8-connected foreground and 4-connected background disagree; without
    them each region's outline and each hole's are simple rings, so the polygons are valid."""
    m = np.ascontiguousarray(mask, dtype=bool).copy()
    for _ in range(64):
        a, b, c, d = m[:-1, :-1], m[:-1, 1:], m[1:, :-1], m[1:, 1:]
        pinch = (a & d & ~b & ~c) | (b & c & ~a & ~d)
        if not pinch.any():
            break
        ys, xs = np.nonzero(pinch)
        fill_b = a[ys, xs] & ~b[ys, xs]  # a-d diagonal: fill b; b-c diagonal: fill a
        m[ys[fill_b], xs[fill_b] + 1] = True
        m[ys[~fill_b], xs[~fill_b]] = True
    return m


def _edge_grid(m: np.ndarray) -> np.ndarray:
    """(2H+1, 2W+1) grid of pixel corners, edges and centres: 1 where a foreground pixel's closed
    square is. Its contours, halved, run exactly along the mask's pixel edges."""
    h, w = m.shape
    p = np.zeros((h + 2, w + 2), bool)
    p[1:-1, 1:-1] = m
    g = np.zeros((2 * h + 1, 2 * w + 1), np.uint8)
    g[1::2, 1::2] = m
    g[1::2, 0::2] = p[1:-1, :-1] | p[1:-1, 1:]  # vertical edges
    g[0::2, 1::2] = p[:-1, 1:-1] | p[1:, 1:-1]  # horizontal edges
    g[0::2, 0::2] = p[:-1, :-1] | p[:-1, 1:] | p[1:, :-1] | p[1:, 1:]  # corners
    return g


def _ring(contour: np.ndarray, epsilon: float) -> np.ndarray | None:
    pts = contour.reshape(-1, 2)
    pts = pts[(pts[:, 0] + pts[:, 1]) % 2 == 1]  # edge midpoints: the line halfway between inside and outside centres
    if epsilon > 0 and len(pts) > 3:
        pts = cv2.approxPolyDP(pts.astype(np.float32).reshape(-1, 1, 2), epsilon, True).reshape(-1, 2)
    pts = pts.astype(np.float64) / 2.0
    if len(pts) < 3 or abs(_signed_area(pts)) < 1e-9:
        return None
    return pts


def _signed_area(r: np.ndarray) -> float:
    x, y = r[:, 0], r[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def mask_polygons(mask: np.ndarray, epsilon_px: float = 1.0) -> list[list[np.ndarray]]:
    """Polygons of a boolean mask, in mask pixel units (pixel (i, j) is [j, j+1) x [i, i+1)):
    each is [exterior, hole, ...], rings as (K, 2) float (x, y), not repeating the first point;
    exteriors counter-clockwise, holes clockwise (in x-right, y-up terms, as RFC 7946 asks).
    `epsilon_px`: Douglas-Peucker tolerance in mask pixels (0: exact pixel outlines)."""
    if not np.any(mask):
        return []
    grid = _edge_grid(well_composed(mask))
    contours, hierarchy = cv2.findContours(grid, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]
    eps = 2.0 * epsilon_px
    polygons: dict[int, list[np.ndarray]] = {}
    for i, c in enumerate(contours):
        if hierarchy[i][3] == -1:  # an outer boundary
            ring = _ring(c, eps)
            if ring is not None:
                polygons[i] = [_oriented(ring, ccw=True)]
    for i, c in enumerate(contours):
        parent = hierarchy[i][3]
        if parent != -1 and parent in polygons:
            ring = _ring(c, eps)
            if ring is not None:
                polygons[parent].append(_oriented(ring, ccw=False))
    return list(polygons.values())


def _oriented(ring: np.ndarray, ccw: bool) -> np.ndarray:
    # the shoelace area is positive for a counter-clockwise ring in x-right, y-up terms (RFC 7946's);
    # on screen, with image rows growing downwards, such a ring looks clockwise
    area = _signed_area(ring)
    return ring if (area > 0) == ccw else ring[::-1]


def inside_only(mask: np.ndarray, scale: float, bounds: tuple[float, float]) -> np.ndarray:
    """The mask without the pixels whose centres lie past the slide's right or bottom edge (the
    last output row and column may straddle it): what is left traces to polygons that reach
    past the edge by less than half a pixel, which clipping then removes."""
    bw, bh = bounds
    h, w = mask.shape
    nx = int(np.clip(math.ceil(bw / scale - 0.5 - 1e-9), 0, w))  # pixels j with (j + .5) * scale < bw
    ny = int(np.clip(math.ceil(bh / scale - 0.5 - 1e-9), 0, h))
    if nx == w and ny == h:
        return mask
    out = np.zeros_like(mask)
    out[:ny, :nx] = mask[:ny, :nx]
    return out


def polygons_to_geojson(polygons, scale: float, bounds: tuple[float, float], properties: dict | None = None,
                        ndigits: int = 2) -> dict:
    """A QuPath-importable FeatureCollection: one annotation per polygon, coordinates multiplied by
    `scale` (mask px -> level-0 px) and clipped to [0, width] x [0, height]; rings that clipping
    flattens are dropped."""
    bw, bh = bounds
    props = {"objectType": "annotation", "classification": dict(TUMOR_CLASS), **(properties or {})}
    features = []
    for rings in polygons:
        coords = []
        for k, r in enumerate(rings):
            pts = np.empty_like(r)
            pts[:, 0] = np.clip(r[:, 0] * scale, 0, bw)
            pts[:, 1] = np.clip(r[:, 1] * scale, 0, bh)
            pts = np.round(pts, ndigits)
            if abs(_signed_area(pts)) < 1e-6:
                if k == 0:
                    break  # the exterior is flat: drop the polygon
                continue
            coords.append(pts.tolist() + [pts[0].tolist()])  # rings are closed
        if not coords:
            continue
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coords},
                         "properties": {**props, "classification": dict(props["classification"])}})
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: Path, data: dict) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)


# -- overlay ---------------------------------------------------------------------------------------
def write_overlay(path: Path, thumbnail: np.ndarray, thumbnail_downsample: float, low_prob: np.ndarray,
                  low_per_level0: float, threshold: float, max_px: int = 1024) -> None:
    """The thumbnail (longest side <= max_px) with the mask tinted red and outlined.

    `low_prob` is the probability on a grid of `low_per_level0` level-0 px per pixel."""
    h, w = thumbnail.shape[:2]
    f = max(1.0, max(h, w) / max_px)
    size = (max(1, round(w / f)), max(1, round(h / f)))
    rgb = cv2.resize(thumbnail, size, interpolation=cv2.INTER_AREA) if f > 1 else thumbnail.copy()
    ds = thumbnail_downsample * (w / size[0])  # level-0 px per overlay px
    rows = np.clip(np.floor((np.arange(size[1]) + 0.5) * ds / low_per_level0).astype(np.int64), 0, low_prob.shape[0] - 1)
    cols = np.clip(np.floor((np.arange(size[0]) + 0.5) * ds / low_per_level0).astype(np.int64), 0, low_prob.shape[1] - 1)
    mask = low_prob[np.ix_(rows, cols)] >= threshold_u8(threshold)
    out = rgb.astype(np.float32)
    tint = np.array([220, 20, 60], np.float32)
    out[mask] = 0.6 * out[mask] + 0.4 * tint
    out = out.astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (200, 0, 0), 1)
    _imwrite(path, out)
