"""Annotations -> a label raster for any window at any resolution.

Sources:
- QuPath GeoJSON (Feature, FeatureCollection or a list of features; Polygon, MultiPolygon and
  GeometryCollection, holes included), coordinates in level-0 pixels;
- ASAP XML (Polygon / Rectangle / Spline / PointSet annotations, grouped by ``PartOfGroup``);
- a label-mask image at any downsample of the slide (PNG / TIFF / JPEG; COSAS masks of 0/255
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

import json
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import HistodgError

IGNORE = 255
MASK_SUFFIXES = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"}


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
    """Class name -> label. Empty map: everything is 1."""

    mapping: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, items) -> LabelMap:
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
        return cls(mapping)

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

    def labels_present(self) -> set[int]:
        return {p.label for p in self.polygons}


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

    def labels_present(self) -> set[int]:
        return set(np.unique(self.labels).tolist())


def fill_rings(rings: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Even-odd fill of closed rings (coordinates in pixel units, pixel centres at integers)."""
    us, vs, ue, ve = [], [], [], []
    for r in rings:
        if len(r) < 3:
            continue
        nxt = np.roll(r, -1, axis=0)
        us.append(r[:, 0]), vs.append(r[:, 1]), ue.append(nxt[:, 0]), ve.append(nxt[:, 1])
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


# -- readers ----------------------------------------------------------------------------------
def load_annotations(path, dimensions: tuple[int, int], labels: LabelMap | None = None):
    """Read a GeoJSON, ASAP XML or label-mask image for a slide of `dimensions` (level 0)."""
    path = Path(path)
    labels = labels or LabelMap()
    if not path.is_file():
        raise AnnotationError(path, "annotation file not found")
    suffix = path.suffix.lower()
    if suffix in (".geojson", ".json"):
        ann = PolygonAnnotations(*_read_geojson(path, labels), )
    elif suffix == ".xml":
        ann = PolygonAnnotations(*_read_asap(path, labels))
    elif suffix in MASK_SUFFIXES:
        ann = MaskAnnotations(read_label_mask(path), path, dimensions)
    else:
        raise AnnotationError(path, "unknown annotation format (expected .geojson, .json, .xml or a mask image)")
    ann.check_fits(dimensions)
    return ann


def _read_geojson(path: Path, labels: LabelMap):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise AnnotationError(path, "not a text file (GeoJSON expected)") from None
    except json.JSONDecodeError as exc:
        raise AnnotationError(path, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and data.get("type") in ("Polygon", "MultiPolygon", "GeometryCollection"):
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    elif isinstance(data, list):
        features = data
    else:
        raise AnnotationError(path, "not GeoJSON: expected a FeatureCollection, a Feature or a list of features")
    if not isinstance(features, list):
        raise AnnotationError(path, "FeatureCollection without a list of features")
    polygons, skipped = [], Counter()
    for i, feat in enumerate(features):
        if not isinstance(feat, dict) or "geometry" not in feat:
            raise AnnotationError(path, f"feature {i} has no geometry")
        name = _class_name(feat.get("properties") or {})
        label = labels(name)
        if label is None:
            skipped[name or "(unclassified)"] += 1
            continue
        try:
            for rings in _geometry_polygons(feat["geometry"]):
                polygons.append(Polygon(rings, label, name or ""))
        except (TypeError, ValueError, IndexError) as exc:
            raise AnnotationError(path, f"feature {i} has malformed coordinates ({exc})") from None
        except _Unsupported as exc:
            skipped[f"{exc} geometry"] += 1
    return polygons, path, skipped


class _Unsupported(Exception):
    pass


def _class_name(props: dict) -> str | None:
    c = props.get("classification")
    if isinstance(c, dict):
        return c.get("name")
    if isinstance(c, str):
        return c
    return props.get("class") or props.get("label")


def _geometry_polygons(geom):
    """Yield the rings of each polygon of a GeoJSON geometry."""
    if geom is None:
        raise _Unsupported("empty")
    kind = geom.get("type")
    if kind == "Polygon":
        yield _rings(geom["coordinates"])
    elif kind == "MultiPolygon":
        for poly in geom["coordinates"]:
            yield _rings(poly)
    elif kind == "GeometryCollection":
        for g in geom.get("geometries", []):
            yield from _geometry_polygons(g)
    else:
        raise _Unsupported(str(kind))


def _rings(coords) -> list[np.ndarray]:
    rings = []
    for ring in coords:
        a = np.asarray(ring, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] < 2 or len(a) < 3 or not np.isfinite(a).all():
            raise ValueError("each ring must be a list of at least 3 finite [x, y] points")
        a = a[:, :2]
        if np.array_equal(a[0], a[-1]):
            a = a[:-1]
        rings.append(a)
    if not rings:
        raise ValueError("polygon without rings")
    return rings


def _read_asap(path: Path, labels: LabelMap):
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise AnnotationError(path, f"not valid XML ({exc})") from None
    annotations = root.findall(".//Annotation")
    if root.tag != "ASAP_Annotations" and not annotations:
        raise AnnotationError(path, "not an ASAP annotation file (no <Annotation> elements)")
    polygons, skipped = [], Counter()
    for i, ann in enumerate(annotations):
        group = ann.get("PartOfGroup") or ""
        kind = (ann.get("Type") or "Polygon").lower()
        if kind in ("dot", "point", "measurement"):
            skipped[f"{kind} annotation"] += 1
            continue
        label = labels(group)
        if label is None:
            skipped[group or "(no group)"] += 1
            continue
        try:
            pts = sorted(ann.findall(".//Coordinate"), key=lambda c: float(c.get("Order", 0)))
            ring = np.array([[float(c.get("X")), float(c.get("Y"))] for c in pts])
        except (TypeError, ValueError) as exc:
            raise AnnotationError(path, f"annotation {i} has malformed coordinates ({exc})") from None
        if kind == "rectangle" and len(ring) == 2:
            (ax, ay), (bx, by) = ring
            ring = np.array([[ax, ay], [bx, ay], [bx, by], [ax, by]])
        if len(ring) < 3:
            skipped["degenerate polygon"] += 1
            continue
        polygons.append(Polygon([ring], label, group))
    return polygons, path, skipped


def read_label_mask(path: Path) -> np.ndarray:
    """A label image as uint8 (H, W): 0/255 binary -> 0/1; 0/1 kept; anti-aliased grey -> >127."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        else:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("L") if im.mode in ("P", "LA", "1") else im)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise AnnotationError(path, f"not a readable mask image ({exc})") from None
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise AnnotationError(path, f"mask values {arr.min()}-{arr.max()} do not fit labels 0-255")
        arr = arr.astype(np.uint8)
    return normalise_mask(arr)


def normalise_mask(arr: np.ndarray) -> np.ndarray:
    values = np.unique(arr)
    if set(values.tolist()) <= {0, 255}:
        return (arr == 255).astype(np.uint8)
    if len(values) > 16:  # a greyscale (e.g. JPEG) binary mask
        return (arr > 127).astype(np.uint8)
    return np.ascontiguousarray(arr)
