"""Everything made from a finished `prob.zarr`: mask.ome.tiff, tumor.geojson, overlay.png, mask.png
(and prob.ome.tiff, tiles.geojson when asked); `--layout flat` moves the viewer's files beside the folder.

One pass over the probability map's non-empty chunks builds the OME-TIFF pyramid and the
reduced map (`BlockReducer`) that the GeoJSON and the overlay are made from; plain images also
get a 0/255 `mask.png` of their own size.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import exc_line
from ..constants import TUMOR_CLASS
from .mask_tiff import OmeTiffMask
from .polygons import GEOJSON_EPSILON, inside_only, mask_polygons, polygons_to_geojson, region_measurements, write_geojson
from .prob_map import CLASS_PROBS, CLASSES
from .prob_map import NAME as PROB
from .rasters import BlockReducer, contour_factor, iter_bands, threshold_u8, write_mask_png, write_overlay
from .tiles_geojson import tile_features


@dataclass(frozen=True)
class MapGeometry:
    """Where the probability map lies on the slide."""

    level0_per_px: float  # level-0 px per map px
    level0_size: tuple[int, int]  # the slide's (width, height)
    mpp: float | None  # the slide's level-0 um/px


@dataclass(frozen=True)
class OutputSpec:
    """What to write from a map: the name inside the OME-TIFF, the tumour threshold, a 0/255
    mask.png too (plain images), and `tiles`: (cells, side) of `tiles_geojson` for tiles.geojson
    (`--geojson-tiles`)."""

    name: str
    threshold: float
    mask_png: bool = False
    tiles: tuple | None = None
    prob_tiff: bool = False  # --outputs prob-tiff: prob.ome.tiff beside mask.ome.tiff
    labels: dict | None = None  # a multi-class model's {label: name}: a region set per class


# --layout flat: the files a viewer opens, moved beside the slide folders as OUT/<slide><suffix>
FLAT_NAMES = {"mask.ome.tiff": ".ome.tiff", "tumor.geojson": ".geojson", "qc.geojson": ".qc.geojson",
              "prob.ome.tiff": ".prob.ome.tiff", "tiles.geojson": ".tiles.geojson"}


@dataclass(frozen=True)
class ClassMaps:
    """A multi-class model's maps beside prob.zarr: the label map (`classes.zarr`) and, with
    `--outputs prob-tiff`, each annotated label's probability (`class_prob.zarr/<label>`)."""

    labels: object
    probs: dict


def write_outputs(out: Path, prob, nonempty, geo: MapGeometry, spec: OutputSpec, thumbnail,
                  thumbnail_downsample: float, maps: ClassMaps | None = None) -> dict:
    """Write the outputs into `out`; returns {"files": [...], "geojson_factor": f, "polygons": n}.
    `maps`: a multi-class model's label map and class probabilities, named by `spec.labels`."""
    classes = maps.labels if maps is not None else None
    threshold, tiles = spec.threshold, spec.tiles
    h, w = prob.shape
    f = contour_factor((h, w))
    # a binary model's mask is 0/255; a multi-class model's holds each pixel's label
    tiffs = {"mask.ome.tiff": OmeTiffMask(out / "mask.ome.tiff", geo.level0_per_px, geo.level0_size, (h, w), geo.mpp,
                                          threshold if classes is None else None)}
    if spec.prob_tiff:
        tiffs["prob.ome.tiff"] = OmeTiffMask(out / "prob.ome.tiff", geo.level0_per_px, geo.level0_size, (h, w), geo.mpp, None)
    class_tiffs = {k: OmeTiffMask(out / class_tiff_name(k, (spec.labels or {}).get(str(k), str(k))), geo.level0_per_px,
                                  geo.level0_size, (h, w), geo.mpp, None) for k in (maps.probs if maps else {})}
    reducer = BlockReducer((h, w), f)
    per_class = {int(k): BlockReducer((h, w), f) for k in (spec.labels or {}) if int(k) > 0} if classes is not None else {}
    label_bands = iter_bands(classes, nonempty) if classes is not None else None
    try:
        for r0, band in iter_bands(prob, nonempty):
            labels = next(label_bands)[1] if label_bands is not None else None
            for name, tiff in tiffs.items():
                tiff.feed(r0, labels if name == "mask.ome.tiff" and labels is not None else band)
            reducer.feed(band)
            for k, red in per_class.items():
                red.feed(np.asarray(labels == k).view(np.uint8) * np.uint8(255))
            for k, tiff in class_tiffs.items():
                tiff.feed(r0, np.asarray(maps.probs[k][r0 : r0 + band.shape[0]]))  # type: ignore[union-attr]
    except BaseException:
        for tiff in (*tiffs.values(), *class_tiffs.values()):
            tiff.close()
        raise
    for name, tiff in tiffs.items():
        tiff.finish(name=spec.name if name == "mask.ome.tiff" else f"{spec.name} tumour probability x 255")
    for k, tiff in class_tiffs.items():
        tiff.finish(name=f"{spec.name} {(spec.labels or {}).get(str(k), k)} probability x 255")
        tiffs[tiff.path.name] = tiff
    low = reducer.finish()
    files = [PROB, *tiffs] if classes is None else [PROB, CLASSES, *((CLASS_PROBS,) if class_tiffs else ()), *tiffs]
    if spec.mask_png:
        write_mask_png(out / "mask.png", prob, geo.level0_per_px, geo.level0_size, threshold, nonempty)
        files.append("mask.png")
    scale = f * geo.level0_per_px
    regions = _regions(low, {k: red.finish() for k, red in per_class.items()}, spec, scale, geo)
    write_geojson(out / "tumor.geojson", regions)
    files.append("tumor.geojson")
    if tiles is not None:
        write_geojson(out / "tiles.geojson", tile_features(low, scale, tiles[0], tiles[1], geo.level0_size))
        files.append("tiles.geojson")
    write_overlay(out / "overlay.png", thumbnail, thumbnail_downsample, low, scale, threshold)
    files.append("overlay.png")
    return {"files": files, "geojson_factor": f, "polygons": len(regions["features"])}


def class_tiff_name(label: int, name: str) -> str:
    """A multi-class model's per-class probability OME-TIFF: prob-<label>-<name>.ome.tiff (name made safe)."""
    from ..files import safe_name

    return f"prob-{label}-{safe_name(name)}.ome.tiff"


PALETTE = ([0, 150, 0], [0, 90, 220], [220, 150, 0], [150, 0, 150], [0, 160, 160], [120, 80, 40], [90, 90, 90])


def class_of(label: int, name: str) -> dict:
    """QuPath's classification of a multi-class model's label: its training name and a colour
    (label 1 the tumour's red, the others from `PALETTE`)."""
    colour = list(TUMOR_CLASS["color"]) if label == 1 else PALETTE[(label - 2) % len(PALETTE)]
    return {"name": name, "color": colour}


def _regions(low, class_lows: dict, spec: OutputSpec, scale: float, geo: MapGeometry) -> dict:
    """tumor.geojson: the tumour's regions (a binary model), or one set of regions per class, each
    classified with its label's name and colour (a multi-class model); measurements from `low`."""
    sets = [(None, low >= threshold_u8(spec.threshold))] if not class_lows else \
        [(class_of(k, (spec.labels or {}).get(str(k), f"class {k}")), lk >= 128) for k, lk in sorted(class_lows.items())]
    features: list = []
    for classification, mask in sets:
        polygons = mask_polygons(inside_only(mask, scale, geo.level0_size), epsilon_px=GEOJSON_EPSILON)
        measured = [region_measurements(rings, low, scale, geo.mpp) for rings in polygons]
        props = {"classification": classification} if classification else None
        features += polygons_to_geojson(polygons, scale, geo.level0_size, props, measurements=measured)["features"]
    return {"type": "FeatureCollection", "features": features}


def verify_outputs(out: Path, files: list[str]) -> None:
    """Read back every output file (done.json, written after this, promises that they open):
    the probability map's first row of chunks, the OME-TIFF's smallest level, the GeoJSON, the PNGs."""
    import json

    import tifffile
    from PIL import Image

    from .predictor import PredictError
    from .prob_map import open_classes, open_probability

    for name in files:
        path = out / name
        try:
            if name == CLASS_PROBS:
                import zarr

                for _, arr in zarr.open_group(str(path), mode="r").arrays():
                    arr[: min(arr.shape[0], arr.chunks[0])]
            elif name in (PROB, CLASSES):
                arr = open_probability(out) if name == PROB else open_classes(out)
                arr[: min(arr.shape[0], arr.chunks[0])]
            elif name.endswith(".ome.tiff"):
                with tifffile.TiffFile(path) as tf:
                    tf.series[0].levels[-1].asarray()
            elif name.endswith(".geojson"):
                json.loads(path.read_text())
            else:
                with Image.open(path) as im:
                    im.verify()
        except Exception as exc:  # any reader's error: the file is not what a user could open
            raise PredictError(path, f"written but cannot be read back ({exc_line(exc, 120)})") from None


def place_flat(out: Path, name: str, files: list[str]) -> list[str]:
    """`--layout flat`: move the files a viewer opens from `out` (OUT/<name>/) to OUT/<name><suffix>
    (`FLAT_NAMES`); returns the file list with those as paths relative to `out` (`../<name>.geojson`),
    as done.json records them."""
    import os

    placed = []
    for f in files:
        suffix = FLAT_NAMES.get(f) or (f".{f}" if f.startswith("prob-") and f.endswith(".ome.tiff") else None)
        if suffix:  # a multi-class model's prob-<label>-<name>.ome.tiff: OUT/<slide>.prob-<label>-<name>.ome.tiff
            target = out.parent / f"{name}{suffix}"
            os.replace(out / f, target)  # a link planted at the target is replaced, its target untouched
            placed.append(f"../{target.name}")
        else:
            placed.append(f)
    return placed


def remove_placed(out: Path, files: list[str]) -> None:
    """The flat files a finished prediction in `out` placed beside it (its done.json's `../` entries),
    removed before the input is predicted again: never a file of the user's of the same name."""
    for f in files:
        if f.startswith("../") and "/" not in f[3:]:
            (out.parent / f[3:]).unlink(missing_ok=True)
