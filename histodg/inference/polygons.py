"""`tumor.geojson`: the mask's outlines as QuPath annotations (polygons with holes, level-0 px).

Outlines run on the line halfway between inside and outside pixel centres (contours of a grid
of pixel corners, edges and centres, on a mask whose diagonal pinches are filled, so every ring
is simple), Douglas-Peucker simplified by 0.35 px: under the 0.354 px at which a pixel centre
could change sides, so a polygon rasterised at pixel centres gives its pixels back exactly, with
3-4x fewer vertices than the pixel outline (1 px would cost 1-4% IoU on blobby masks). One
annotation per region, classification `Tumor`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np

from ..constants import TUMOR_CLASS
from ..files import write_text_atomic
from ..slides.annotations import fill_rings

# Douglas-Peucker tolerance of the outlines, in traced-mask pixels (see above)
GEOJSON_EPSILON = 0.35


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


def region_measurements(rings: list[np.ndarray], prob_u8: np.ndarray, scale: float, mpp: float | None) -> dict:
    """QuPath `measurements` of one region: its area (um^2 when the slide's mpp is known, else
    level-0 px^2) and the mean and max tumour probability over the map pixels whose centres
    it covers. `rings` are in `prob_u8` pixel units; `scale` is level-0 px per map px."""
    area = (abs(_signed_area(rings[0])) - sum(abs(_signed_area(r)) for r in rings[1:])) * scale**2
    h, w = prob_u8.shape
    x0, y0 = (max(0, int(np.floor(v))) for v in rings[0].min(0))
    x1, y1 = (min(n, int(np.ceil(v))) for v, n in zip(rings[0].max(0), (w, h)))
    inside = fill_rings([r - (x0 + 0.5, y0 + 0.5) for r in rings], max(0, y1 - y0), max(0, x1 - x0))
    values = prob_u8[y0:y1, x0:x1][inside]  # the pixels whose centres the region covers, holes left out
    values = values if values.size else prob_u8[y0:y1, x0:x1].ravel()
    key = "Area µm^2" if mpp else "Area px^2"
    return {key: round(area * (mpp**2 if mpp else 1), 2),
            "Tumor probability mean": round(float(values.mean()) / 255, 4) if values.size else 0.0,
            "Tumor probability max": round(float(values.max()) / 255, 4) if values.size else 0.0}


def polygons_to_geojson(polygons, scale: float, bounds: tuple[float, float], properties: dict | None = None,
                        ndigits: int = 2, measurements: list[dict] | None = None) -> dict:
    """A QuPath-importable FeatureCollection: one annotation per polygon, coordinates multiplied by
    `scale` (mask px -> level-0 px) and clipped to [0, width] x [0, height]; rings that clipping
    flattens are dropped. `measurements[i]` (QuPath's per-object measurements) goes with polygon i."""
    bw, bh = bounds
    props = {"objectType": "annotation", "classification": dict(TUMOR_CLASS), **(properties or {})}
    features = []
    for i, rings in enumerate(polygons):
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
        feature_props = {**props, "classification": dict(props["classification"])}
        if measurements is not None:
            feature_props["measurements"] = measurements[i]
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coords},
                         "properties": feature_props})
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, separators=(",", ":")))


