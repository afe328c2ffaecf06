"""`tiles.geojson` (`histodg predict --geojson-tiles`): the probability map as QuPath tile objects.

One locked `objectType: "tile"` square per cell of a grid whose side is the prediction's window
stride (level-0 px), for every cell a predicted window covers, with `measurements` per class:
`Tumor probability` (the mean over the cell of the probability map) and `Background
probability`. QuPath shows them as a measurement map (Measure > Show measurement maps); being
tiles, `histodg tile --annotations` skips them unless `--objects tile` is asked for.
"""
from __future__ import annotations

import math

import numpy as np


def covered_cells(level0_xy: np.ndarray, window: float, side: float, bounds: tuple[float, float]) -> np.ndarray:
    """(K, 2) grid cells (column, row) of side `side` that windows of side `window` at `level0_xy` cover."""
    nx, ny = math.ceil(bounds[0] / side), math.ceil(bounds[1] / side)
    covered = np.zeros((ny, nx), bool)
    for x, y in np.asarray(level0_xy, np.float64).reshape(-1, 2):
        c0, r0 = max(0, int(x // side)), max(0, int(y // side))
        c1, r1 = min(nx, math.ceil((x + window) / side)), min(ny, math.ceil((y + window) / side))
        covered[r0:r1, c0:c1] = True
    rows, cols = np.nonzero(covered)
    return np.stack([cols, rows], 1)


def tile_features(low: np.ndarray, scale: float, cells: np.ndarray, side: float, bounds: tuple[float, float]) -> dict:
    """A FeatureCollection of one tile per cell; `low` is the uint8 probability map with `scale`
    level-0 px per pixel."""
    bw, bh = bounds
    integral = np.pad(low.astype(np.float64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    h, w = low.shape
    features = []
    for col, row in np.asarray(cells, np.int64).reshape(-1, 2):
        x0, y0 = col * side, row * side
        x1, y1 = min(bw, x0 + side), min(bh, y0 + side)
        i0, i1 = int(np.clip(round(y0 / scale), 0, h)), int(np.clip(round(y1 / scale), 0, h))
        j0, j1 = int(np.clip(round(x0 / scale), 0, w)), int(np.clip(round(x1 / scale), 0, w))
        if i1 <= i0 or j1 <= j0:
            continue
        total = integral[i1, j1] - integral[i0, j1] - integral[i1, j0] + integral[i0, j0]
        p = round(float(total / ((i1 - i0) * (j1 - j0)) / 255), 4)
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": {"objectType": "tile", "isLocked": True,
                                        "measurements": {"Tumor probability": p,
                                                         "Background probability": round(1 - p, 4)}}})
    return {"type": "FeatureCollection", "features": features}
