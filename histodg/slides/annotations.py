"""Annotations -> a label raster for any window at any resolution.

Two kinds (read from files by `annotation_files.load_annotations`):
- `PolygonAnnotations`: polygons with holes in level-0 pixels (QuPath GeoJSON, ASAP XML);
- `MaskAnnotations`: a label-mask image at any downsample of the slide (COSAS masks of 0/255
  or 0/1, 1- or 3-channel, are normalised to 0/1).

Class names map to labels with ``--label name=value`` (case-insensitive, ``*`` matches any other
name). Without a map every polygon is label 1. Paint order: positive labels largest polygon first,
so a region nested in another (a tumour inside a tissue outline) wins whatever the file order; then
label 0 (erasers, such as ASAP exclusion groups); then 255 (ignore).

Rasterisation samples pixel centres: target pixel (row i, col j) of a window with level-0 origin
(x0, y0) and scale s (level-0 px per target px) is inside a polygon when the point
(x0 + (j + 0.5) s, y0 + (i + 0.5) s) is, under the even-odd rule with half-open edges.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import HistodgError
from ..constants import IGNORE

OBJECT_TYPES = ("annotation", "detection", "cell", "tile")  # QuPath's objectType values


class AnnotationError(HistodgError):
    """An annotation file is malformed or does not fit its slide."""


@dataclass
class Polygon:
    rings: list[np.ndarray]  # exterior first, then holes; each (K, 2) float64 level-0 (x, y)
    label: int
    name: str = ""

    @property
    def area(self) -> float:
        """Shoelace area of the exterior minus the holes (level-0 px^2)."""
        def ring_area(r):
            x, y = r[:, 0], r[:, 1]
            return abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2

        return ring_area(self.rings[0]) - sum(ring_area(r) for r in self.rings[1:])

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        ext = self.rings[0]
        return float(ext[:, 0].min()), float(ext[:, 1].min()), float(ext[:, 0].max()), float(ext[:, 1].max())


@dataclass
class LabelMap:
    """Class name -> label (empty map: everything is 1), and which QuPath object types count."""

    mapping: dict[str, int] = field(default_factory=dict)
    objects: tuple[str, ...] = ("annotation",)  # GeoJSON objectType values that are read

    @classmethod
    def parse(cls, items, objects: str | None = None) -> LabelMap:
        kinds = tuple(dict.fromkeys(k.strip().lower() for k in (objects or "annotation").split(",") if k.strip()))
        if not kinds or not set(kinds) <= set(OBJECT_TYPES):
            raise ValueError(f"--objects {objects!r}: a comma-separated list of {', '.join(OBJECT_TYPES)}")
        mapping = {}
        for item in items or ():
            name, sep, value = str(item).rpartition("=")
            if not sep or not name.strip():
                raise ValueError(f"--label {item!r}: expected NAME=VALUE, such as tumor=1")
            try:
                v = int(value)
            except ValueError:
                raise ValueError(f"--label {item!r}: {value!r} is not an integer label") from None
            if not 0 <= v <= 255:
                raise ValueError(f"--label {item!r}: labels are 0-255 (255 = ignore)")
            mapping[name.strip().lower()] = v
        return cls(mapping, kinds)

    def __call__(self, name: str | None) -> int | None:
        if not self.mapping:
            return 1
        key = (name or "").strip().lower()
        if key in self.mapping:
            return self.mapping[key]
        return self.mapping.get("*")

    def label_names(self) -> dict[str, str]:
        """The store's `labels` attr: {"0": "background", "1": "tumor", ...}."""
        names = {"0": "background"}
        if not self.mapping:
            names["1"] = "tumor"
        for name, v in sorted(self.mapping.items(), key=lambda kv: kv[1]):
            if v not in (0, IGNORE) and name != "*":
                names.setdefault(str(v), name)
            elif name == "*" and v not in (0, IGNORE):
                names.setdefault(str(v), "annotated")
        return names


class PolygonAnnotations:
    """Polygons in level-0 px, rasterised per window."""

    def __init__(self, polygons: list[Polygon], source: Path, skipped: Counter | None = None):
        order = {0: 1, IGNORE: 2}
        self.polygons = sorted(polygons, key=lambda p: (order.get(p.label, 0), -p.area))
        self.source = Path(source)
        self.skipped = skipped or Counter()
        self._boxes = np.array([p.bbox for p in self.polygons]).reshape(-1, 4)

    def __len__(self):
        return len(self.polygons)

    def check_fits(self, dimensions: tuple[int, int]) -> None:
        if not len(self.polygons):
            return
        w, h = dimensions
        x0, y0 = self._boxes[:, 0].min(), self._boxes[:, 1].min()
        x1, y1 = self._boxes[:, 2].max(), self._boxes[:, 3].max()
        if x1 < 0 or y1 < 0 or x0 > w or y0 > h:
            raise AnnotationError(
                self.source, f"no polygon overlaps the {w}x{h} slide (coordinates must be level-0 pixels)"
            )

    def rasterize(self, x0: float, y0: float, scale: float, size: int) -> np.ndarray:
        out = np.zeros((size, size), np.uint8)
        if not len(self.polygons):
            return out
        x1, y1 = x0 + size * scale, y0 + size * scale
        b = self._boxes
        hit = np.nonzero((b[:, 0] < x1) & (b[:, 2] > x0) & (b[:, 1] < y1) & (b[:, 3] > y0))[0]
        for i in hit:
            poly = self.polygons[i]
            rings = [(r - (x0, y0)) / scale - 0.5 for r in poly.rings]  # pixel centres at integers
            out[fill_rings(rings, size, size)] = poly.label
        return out



class MaskAnnotations:
    """A label image covering the slide at some downsample; nearest-neighbour sampling."""

    def __init__(self, labels: np.ndarray, source: Path, dimensions: tuple[int, int]):
        self.labels = labels
        self.source = Path(source)
        h, w = labels.shape
        sw, sh = dimensions
        self.ds_x, self.ds_y = sw / w, sh / h
        if abs(self.ds_x - self.ds_y) > 0.02 * max(self.ds_x, self.ds_y) and abs(round(sw / self.ds_y) - w) > 1:
            raise AnnotationError(
                source, f"mask is {w}x{h} but the slide is {sw}x{sh}: not the same shape at any downsample"
            )

    def check_fits(self, dimensions):
        pass

    def rasterize(self, x0: float, y0: float, scale: float, size: int) -> np.ndarray:
        h, w = self.labels.shape
        centres = np.arange(size) + 0.5
        cols = np.floor((x0 + centres * scale) / self.ds_x).astype(np.int64)
        rows = np.floor((y0 + centres * scale) / self.ds_y).astype(np.int64)
        out = np.zeros((size, size), np.uint8)
        cin = (cols >= 0) & (cols < w)
        rin = (rows >= 0) & (rows < h)
        out[np.ix_(rin, cin)] = self.labels[np.ix_(rows[rin], cols[cin])]
        return out


def fill_rings(rings: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Even-odd fill of closed rings (coordinates in pixel units, pixel centres at integers)."""
    us, vs, ue, ve = [], [], [], []
    for r in rings:
        if len(r) < 3:
            continue
        nxt = np.roll(r, -1, axis=0)
        us.append(r[:, 0])
        vs.append(r[:, 1])
        ue.append(nxt[:, 0])
        ve.append(nxt[:, 1])
    inside = np.zeros((height, width), bool)
    if not us:
        return inside
    u1, v1, u2, v2 = (np.concatenate(a) for a in (us, vs, ue, ve))
    lo, hi = np.minimum(v1, v2), np.maximum(v1, v2)
    # rows i with lo <= i < hi cross this edge (half-open: each vertex counted once)
    r0 = np.clip(np.ceil(lo), 0, height).astype(np.int64)
    r1 = np.clip(np.ceil(hi), 0, height).astype(np.int64)
    count = np.maximum(r1 - r0, 0)
    if count.sum() == 0:
        return inside
    edge = np.repeat(np.arange(len(u1)), count)
    rows = np.repeat(r0, count) + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))
    t = (rows - v1[edge]) / (v2[edge] - v1[edge])
    xs = u1[edge] + t * (u2[edge] - u1[edge])
    order = np.lexsort((xs, rows))
    rows, xs = rows[order], xs[order]
    if len(rows) % 2:  # cannot happen for closed rings; guard against float edge cases
        rows, xs = rows[:-1], xs[:-1]
    ra, xa, xb = rows[0::2], xs[0::2], xs[1::2]
    ja = np.clip(np.ceil(xa), 0, width).astype(np.int64)
    jb = np.clip(np.ceil(xb), 0, width).astype(np.int64)
    diff = np.zeros((height, width + 1), np.int32)
    np.add.at(diff, (ra, ja), 1)
    np.add.at(diff, (ra, jb), -1)
    return np.cumsum(diff[:, :width], axis=1) > 0
