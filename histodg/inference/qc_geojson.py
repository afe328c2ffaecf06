"""`qc.geojson`: the windows artefact QC flagged (`--qc flag|exclude`), as QuPath annotations.

One annotation per connected region of windows with the same flag (pen, blur, dark, glass),
merged on the slide's thumbnail grid (`plan.thumbnail`, a few thousand pixels a side), with the
class `QC <flag>` and its colour, and as measurements how many windows it joins and whether
`--qc exclude` left them out. A window with two flags is in both classes' regions. Written
whenever QC ran, empty (a FeatureCollection without features) when it flagged nothing, so a
script can count on the file.
"""
from __future__ import annotations

import numpy as np

from ..constants import QC_EXCLUDED, QC_FLAGS
from .polygons import GEOJSON_EPSILON, mask_polygons, polygons_to_geojson

NAME = "qc.geojson"
COLOURS = {"pen": [30, 90, 220], "blur": [150, 150, 150], "dark": [90, 60, 20], "glass": [170, 220, 240]}


def qc_class(flag: str) -> dict:
    return {"name": f"QC {flag}", "color": COLOURS.get(flag, [255, 160, 0])}


def qc_features(flags: dict[int, int], level0_xy: np.ndarray, window_level0: float, thumb_shape: tuple[int, int],
                downsample: float, bounds: tuple[float, float], excluding: bool) -> dict:
    """The FeatureCollection of `flags` (window index -> QC flag bits); `level0_xy[i]` is window i's
    level-0 corner, `window_level0` its side in level-0 px; regions are traced on a grid of
    `thumb_shape` with `downsample` level-0 px per pixel."""
    features = []
    for flag, bit in QC_FLAGS.items():
        hits = [i for i, f in flags.items() if f & bit]
        if not hits:
            continue
        mask = np.zeros(thumb_shape, bool)
        for i in hits:
            x0, y0 = level0_xy[i] / downsample
            x1, y1 = (level0_xy[i] + window_level0) / downsample
            mask[int(y0):max(int(np.ceil(y1)), int(y0) + 1), int(x0):max(int(np.ceil(x1)), int(x0) + 1)] = True
        excluded = int(excluding and bool(bit & QC_EXCLUDED))
        for region, windows in _regions(mask, [(level0_xy[i] + window_level0 / 2) / downsample for i in hits]):
            polygons = mask_polygons(region, epsilon_px=GEOJSON_EPSILON)
            measured = [{"Windows": windows, "Excluded from prediction": excluded}] * len(polygons)
            features += polygons_to_geojson(polygons, downsample, bounds, properties={"classification": qc_class(flag)},
                                            measurements=measured)["features"]
    return {"type": "FeatureCollection", "features": features}


def _regions(mask: np.ndarray, centres):
    """(region mask, how many window centres fall in it) for each connected region of `mask`."""
    from skimage.measure import label

    labels = label(mask, connectivity=1)
    counts = np.zeros(labels.max() + 1, np.int64)
    h, w = mask.shape
    for cx, cy in centres:
        counts[labels[min(int(cy), h - 1), min(int(cx), w - 1)]] += 1
    for k in range(1, labels.max() + 1):
        yield labels == k, int(counts[k])
