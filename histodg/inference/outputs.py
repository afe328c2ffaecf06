"""Everything made from a finished `prob.zarr`: mask.ome.tiff, tumor.geojson, overlay.png, mask.png
(and prob.ome.tiff, tiles.geojson when asked); `--layout flat` moves the viewer's files beside the folder.

One pass over the probability map's non-empty chunks builds the OME-TIFF pyramid and the
reduced map (`BlockReducer`) that the GeoJSON and the overlay are made from; plain images also
get a 0/255 `mask.png` of their own size.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import exc_line
from .mask_tiff import OmeTiffMask
from .polygons import GEOJSON_EPSILON, inside_only, mask_polygons, polygons_to_geojson, region_measurements, write_geojson
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


# --layout flat: the files a viewer opens, moved beside the slide folders as OUT/<slide><suffix>
FLAT_NAMES = {"mask.ome.tiff": ".ome.tiff", "tumor.geojson": ".geojson", "qc.geojson": ".qc.geojson",
              "prob.ome.tiff": ".prob.ome.tiff", "tiles.geojson": ".tiles.geojson"}


def write_outputs(out: Path, prob, nonempty, geo: MapGeometry, spec: OutputSpec, thumbnail,
                  thumbnail_downsample: float) -> dict:
    """Write the outputs into `out`; returns {"files": [...], "geojson_factor": f, "polygons": n}."""
    threshold, tiles = spec.threshold, spec.tiles
    h, w = prob.shape
    cut = threshold_u8(threshold)
    f = contour_factor((h, w))
    tiffs = {"mask.ome.tiff": OmeTiffMask(out / "mask.ome.tiff", geo.level0_per_px, geo.level0_size, (h, w), geo.mpp, threshold)}
    if spec.prob_tiff:
        tiffs["prob.ome.tiff"] = OmeTiffMask(out / "prob.ome.tiff", geo.level0_per_px, geo.level0_size, (h, w), geo.mpp, None)
    reducer = BlockReducer((h, w), f)
    try:
        for r0, band in iter_bands(prob, nonempty):
            for tiff in tiffs.values():
                tiff.feed(r0, band)
            reducer.feed(band)
    except BaseException:
        for tiff in tiffs.values():
            tiff.close()
        raise
    for name, tiff in tiffs.items():
        tiff.finish(name=spec.name if name == "mask.ome.tiff" else f"{spec.name} tumour probability x 255")
    low = reducer.finish()
    files = [PROB, *tiffs]
    if spec.mask_png:
        write_mask_png(out / "mask.png", prob, geo.level0_per_px, geo.level0_size, threshold, nonempty)
        files.append("mask.png")
    scale = f * geo.level0_per_px
    polygons = mask_polygons(inside_only(low >= cut, scale, geo.level0_size), epsilon_px=GEOJSON_EPSILON)
    measured = [region_measurements(rings, low, scale, geo.mpp) for rings in polygons]
    write_geojson(out / "tumor.geojson", polygons_to_geojson(polygons, scale, geo.level0_size, measurements=measured))
    files.append("tumor.geojson")
    if tiles is not None:
        write_geojson(out / "tiles.geojson", tile_features(low, scale, tiles[0], tiles[1], geo.level0_size))
        files.append("tiles.geojson")
    write_overlay(out / "overlay.png", thumbnail, thumbnail_downsample, low, scale, threshold)
    files.append("overlay.png")
    return {"files": files, "geojson_factor": f, "polygons": len(polygons)}


def verify_outputs(out: Path, files: list[str]) -> None:
    """Read back every output file (done.json, written after this, promises that they open):
    the probability map's first row of chunks, the OME-TIFF's smallest level, the GeoJSON, the PNGs."""
    import json

    import tifffile
    from PIL import Image

    from .predictor import PredictError
    from .prob_map import open_probability

    for name in files:
        path = out / name
        try:
            if name == PROB:
                arr = open_probability(out)
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
        if f in FLAT_NAMES:
            target = out.parent / f"{name}{FLAT_NAMES[f]}"
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
