"""Annotation files -> the label rasters of `annotations`: QuPath GeoJSON, ASAP and Aperio XML, label masks.

`load_annotations(path, slide_dimensions, labels)` picks the reader by the file's content (JSON,
XML, or an image), not its extension, and checks the annotations overlap the slide.

GeoJSON as QuPath writes it: a FeatureCollection, a Feature or a bare list of features; Polygon,
MultiPolygon and GeometryCollection geometries (others are counted as skipped). The class is
`properties.classification` as `{"name", "color"}`, as `{"names": [...]}` (a derived class such
as `Tumor: Positive`, looked up whole, then by its first name), or as a string; else `class` or
`label`. Only objects of `labels.objects` count (default: annotations; `objectType` detection,
cell and tile objects are counted as skipped unless asked for with `--objects`); `isLocked`,
`measurements` and other properties are ignored. XML: `annotation_xml`. A label mask
(PNG/TIFF/...) covers the slide at any downsample.
"""
from __future__ import annotations

from collections import Counter
from json import JSONDecodeError
from pathlib import Path

import numpy as np

from ..constants import too_large
from ..files import parse_json
from .annotation_xml import read_xml
from .annotations import AnnotationError, LabelMap, MaskAnnotations, Polygon, PolygonAnnotations
from .opening import image_kind

MASK_SUFFIXES = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"}
# QuPath 0.2 named the object type by the feature's "id"
QUPATH_IDS = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection", "PathCellObject": "cell",
              "PathTileObject": "tile"}


def annotation_format(path: Path) -> str:
    """"geojson", "xml" or "mask", from the first bytes of the file (not its name)."""
    with open(path, "rb") as f:
        head = f.read(512)
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text[:1] in (b"{", b"["):
        return "geojson"
    if text[:1] == b"<":
        return "xml"
    if image_kind(head) != "other":
        return "mask"
    return {".geojson": "geojson", ".json": "geojson", ".xml": "xml"}.get(path.suffix.lower(), "unknown")


def load_annotations(path, dimensions: tuple[int, int], labels: LabelMap | None = None):
    """Read a GeoJSON, ASAP XML or label-mask image for a slide of `dimensions` (level 0)."""
    path = Path(path)
    labels = labels or LabelMap()
    if not path.is_file():
        raise AnnotationError(path, "annotation file not found")
    kind = annotation_format(path)
    ann: PolygonAnnotations | MaskAnnotations
    if kind == "geojson":
        ann = PolygonAnnotations(*_read_geojson(path, labels))
    elif kind == "xml":
        ann = PolygonAnnotations(*read_xml(path, labels))
    elif kind == "mask":
        ann = MaskAnnotations(read_label_mask(path), path, dimensions)
    else:
        raise AnnotationError(path, "unknown annotation format (expected GeoJSON, ASAP or Aperio XML, or a mask image)")
    ann.check_fits(dimensions)
    return ann


def _read_geojson(path: Path, labels: LabelMap):
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise AnnotationError(path, "not a text file (GeoJSON expected)") from None
    except JSONDecodeError as exc:
        raise AnnotationError(path, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except ValueError as exc:
        raise AnnotationError(path, f"not readable JSON ({exc})") from None
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
    polygons: list = []
    skipped: Counter[str] = Counter()
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
        kind = _object_type(feat, props)
        if kind not in labels.objects:
            skipped[f"{kind} object"] += 1
            continue
        name, label = _class_label(props, labels)
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


def _object_type(feat: dict, props: dict) -> str:
    fid = feat.get("id")
    kind = props.get("objectType") or props.get("object_type") or (QUPATH_IDS.get(fid) if isinstance(fid, str) else None)
    return kind.strip().lower() if isinstance(kind, str) else "annotation"


def _class_label(props: dict, labels: LabelMap) -> tuple[str | None, int | None]:
    """The feature's class name and its label (a derived class: the whole name, then its first part)."""
    c = props.get("classification")
    names = []
    if isinstance(c, dict):
        if isinstance(c.get("name"), str):
            names = [c["name"]]
        elif isinstance(c.get("names"), list) and all(isinstance(n, str) for n in c["names"]) and c["names"]:
            names = [": ".join(c["names"]), c["names"][0]]
    elif isinstance(c, str):
        names = [c]
    if not names:
        other = props.get("class") or props.get("label")
        names = [str(other)] if other is not None and not isinstance(other, (dict, list)) else []
    if not names:
        return None, labels(None)
    label = next((v for v in map(labels, names) if v is not None), None)
    return names[0], label


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


def read_label_mask(path: Path) -> np.ndarray:
    """A label image as uint8 (H, W): 0/255 binary -> 0/1; 0/1 kept; anti-aliased grey -> >127."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                page = tf.pages.first
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
