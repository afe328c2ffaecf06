"""XML annotation files: ASAP (`<ASAP_Annotations>`) and Aperio ImageScope (`<Annotations>`).

ASAP: every <Annotation> a polygon (rectangles expanded), its `PartOfGroup` its class.
Aperio ImageScope: `Annotations/Annotation/Regions/Region/Vertices/Vertex X Y`, level-0 px.
An Annotation's class is its `Name`, else its `LineColor` (the integer ImageScope writes), so
`--label Tumor=1` or `--label 65280=1` map it. Regions of type 0 (free-hand / polygon) and 1
(rectangle) are polygons, type 2 (ellipse, two corners of its box) becomes a 64-gon, arrows and
rulers (3, 4) are counted as skipped. A region with `NegativeROA="1"` is a hole in the
positive region of the same Annotation that contains it (one outside every region is skipped).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np

from .annotations import AnnotationError, LabelMap, Polygon

ELLIPSE_POINTS = 64
APERIO_REGION_TYPES = {0: "polygon", 1: "rectangle", 2: "ellipse", 3: "arrow", 4: "ruler"}


def read_xml(path: Path, labels: LabelMap):
    """(polygons, path, skipped) of an ASAP or Aperio XML file, told apart by the root element."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise AnnotationError(path, f"not valid XML ({exc})") from None
    if root.tag == "Annotations" or root.find("./Annotation/Regions") is not None:
        return _aperio(root, path, labels)
    annotations = root.findall(".//Annotation")
    if root.tag != "ASAP_Annotations" and not annotations:
        raise AnnotationError(path, "not an ASAP or Aperio annotation file (no <Annotation> elements)")
    return _asap(annotations, path, labels)


def _asap(annotations, path: Path, labels: LabelMap):
    polygons: list = []
    skipped: Counter[str] = Counter()
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


def _aperio_class(ann) -> tuple[str, list[str]]:
    """The Annotation's class name and the names its label is looked up by (Name, then LineColor)."""
    names = [n for n in ((ann.get("Name") or "").strip(), (ann.get("LineColor") or "").strip()) if n]
    return (names[0] if names else ""), names


def _aperio(root, path: Path, labels: LabelMap):
    polygons: list = []
    skipped: Counter[str] = Counter()
    for i, ann in enumerate(root.iter("Annotation")):
        name, names = _aperio_class(ann)
        label = next((v for v in map(labels, names) if v is not None), None) if names else labels(None)
        if label is None:
            skipped[name or "(unnamed)"] += 1
            continue
        positive: list[np.ndarray] = []
        holes: list[np.ndarray] = []
        for j, region in enumerate(ann.iter("Region")):
            try:
                kind = int(float(region.get("Type") or 0))
                ring = np.array([[float(v.get("X")), float(v.get("Y"))] for v in region.iter("Vertex")])
            except (TypeError, ValueError) as exc:
                raise AnnotationError(path, f"annotation {i} region {j} has malformed vertices ({exc})") from None
            kept = _region_ring(kind, ring, skipped)
            if kept is None:
                continue
            (holes if region.get("NegativeROA") == "1" else positive).append(kept)
        mine = [Polygon([r], label, name) for r in positive]
        for hole in holes:
            owner = next((p for p in mine if _inside(hole[0], p.rings[0])), None)
            if owner is None:
                skipped["negative region outside every region"] += 1
            else:
                owner.rings.append(hole)
        polygons += mine
    return polygons, path, skipped


def _region_ring(kind: int, ring: np.ndarray, skipped: Counter) -> np.ndarray | None:
    if kind not in (0, 1, 2):
        skipped[f"{APERIO_REGION_TYPES.get(kind, f'type {kind}')} region"] += 1
        return None
    if ring.ndim != 2 or not np.isfinite(ring).all():
        skipped["degenerate region"] += 1
        return None
    if kind == 2 and len(ring) >= 2:  # the ellipse inside the box of its first two vertices
        (ax, ay), (bx, by) = ring[0], ring[1]
        t = np.linspace(0, 2 * np.pi, ELLIPSE_POINTS, endpoint=False)
        ring = np.stack([(ax + bx) / 2 + abs(bx - ax) / 2 * np.cos(t), (ay + by) / 2 + abs(by - ay) / 2 * np.sin(t)], 1)
    elif kind == 1 and len(ring) == 2:
        (ax, ay), (bx, by) = ring
        ring = np.array([[ax, ay], [bx, ay], [bx, by], [ax, by]])
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    if len(ring) < 3:
        skipped["degenerate region"] += 1
        return None
    return ring


def _inside(point, ring: np.ndarray) -> bool:
    """Even-odd point-in-polygon test."""
    x, y = point
    xs, ys = ring[:, 0], ring[:, 1]
    xn, yn = np.roll(xs, -1), np.roll(ys, -1)
    crosses = (ys > y) != (yn > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        at = xs + (y - ys) * (xn - xs) / (yn - ys)
    return bool(np.count_nonzero(crosses & (x < at)) % 2)
