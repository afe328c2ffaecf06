"""Annotation files -> the label rasters of `annotations`: QuPath GeoJSON, ASAP XML, label masks.

`load_annotations(path, slide_dimensions, labels)` picks the reader by extension and checks the
annotations overlap the slide. GeoJSON: a FeatureCollection, a Feature or a list of features;
Polygon, MultiPolygon and GeometryCollection geometries (others are counted as skipped); the
class from `properties.classification` (a dict with `name`, or a string), `class` or `label`.
ASAP XML: every <Annotation> a polygon (rectangles expanded), its group its class. A label mask
(PNG/TIFF/...) covers the slide at any downsample.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np

from ..constants import too_large
from .annotations import AnnotationError, LabelMap, MaskAnnotations, Polygon, PolygonAnnotations

MASK_SUFFIXES = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"}


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
        props = feat.get("properties") or {}
        if not isinstance(props, dict):
            raise AnnotationError(path, f"feature {i}: properties must be an object, not {type(props).__name__}")
        geom = feat["geometry"]
        if geom is not None and not isinstance(geom, dict):
            raise AnnotationError(path, f"feature {i}: geometry must be an object, not {type(geom).__name__}")
        if isinstance(geom, dict) and geom.get("type") in ("Polygon", "MultiPolygon") and "coordinates" not in geom:
            raise AnnotationError(path, f"feature {i}: {geom['type']} without coordinates")
        name = _class_name(props)
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
        c = c.get("name")
    if not isinstance(c, str):
        c = props.get("class") or props.get("label")
    return str(c) if c is not None and not isinstance(c, (dict, list)) else None


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
        parts = geom.get("geometries", [])
        if not isinstance(parts, list) or not all(isinstance(g, dict) or g is None for g in parts):
            raise ValueError("a GeometryCollection's geometries must be a list of geometry objects")
        for g in parts:
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

            with tifffile.TiffFile(path) as tf:
                page = tf.pages[0]
                if why := too_large(int(page.imagewidth), int(page.imagelength), "mask image"):
                    raise AnnotationError(path, why)
                arr = page.asarray()
        else:
            with Image.open(path) as im:
                if why := too_large(*im.size, "mask image"):
                    raise AnnotationError(path, why)
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
