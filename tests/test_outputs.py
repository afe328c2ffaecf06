"""The prediction writers: pyramidal OME-TIFF, QuPath GeoJSON, overlay; on synthetic maps and through predict."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from helpers import DarkModel, raw_config
from histodg.inference import PredictOptions, Predictor, predict_slide
from histodg.inference.mask_tiff import pyramid_shapes
from histodg.inference.outputs import MapGeometry, OutputSpec, write_outputs
from histodg.inference.polygons import inside_only, mask_polygons, polygons_to_geojson, well_composed, write_geojson
from histodg.inference.rasters import BlockReducer, contour_factor, iter_bands, threshold_u8, write_overlay
from histodg.slides.annotation_files import load_annotations
from histodg.slides.annotations import Polygon, PolygonAnnotations
from histodg.slides.inputs import SlideJob

shapely = pytest.importorskip("shapely")
from shapely.geometry import shape  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

def shapes_mask(h: int, w: int) -> np.ndarray:
    """A disc with a hole holding an island, a bar, a blob touching the corner, some noise blobs."""
    yy, xx = np.mgrid[:h, :w]
    r2 = (xx - w * 0.3) ** 2 + (yy - h * 0.45) ** 2
    m = r2 < (0.3 * h) ** 2
    m &= ~(r2 < (0.15 * h) ** 2)
    m |= r2 < (0.06 * h) ** 2
    m[int(0.05 * h) : int(0.1 * h), int(0.7 * w) : int(0.9 * w)] = True
    m[int(0.85 * h) :, int(0.9 * w) :] = True
    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 5)
    m |= (noise > np.quantile(noise, 0.93)) & (xx > 0.6 * w) & (yy > 0.2 * h)
    return m


def rasterise_geojson(path, dims, scale, shape_hw):
    ann = load_annotations(path, dims)
    h, w = shape_hw
    out = np.zeros((h, w), np.uint8)
    for y in range(0, h, 256):
        for x in range(0, w, 256):
            out[y : y + 256, x : x + 256] = ann.rasterize(x * scale, y * scale, scale, 256)[: min(256, h - y), : min(256, w - x)]
    return out.astype(bool)


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


# -- OME-TIFF ---------------------------------------------------------------------------------------
def test_ome_tiff_reads_back_with_the_slide_geometry_and_pixel_size(tmp_path):
    import tiffslide

    prob = (shapes_mask(500, 760) * 200).astype(np.uint8)
    dims = (3037, 1999)  # level 0, not a multiple of the output grid (4 level-0 px per output px)
    path = tmp_path / "mask.ome.tiff"
    written = write_outputs(tmp_path, prob, None, MapGeometry(4.0, dims, 0.25), OutputSpec("mask", 0.5),
                            np.full((100, 152, 3), 255, np.uint8), 20.0)
    assert written["files"] == ["prob.zarr", "mask.ome.tiff", "tumor.geojson", "overlay.png"]
    assert pyramid_shapes(*dims) == [(3037, 1999), (1519, 1000), (760, 500)]
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome
        series = tf.series[0]
        assert series.shape == (1999, 3037) and [lv.shape for lv in series.levels] == [(1999, 3037), (1000, 1519), (500, 760)]
        page = tf.pages[0]
        assert page.is_tiled and page.tilewidth == 512 and page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert len(page.subifds) == 2
        assert 'PhysicalSizeX="0.25"' in tf.ome_metadata and 'PhysicalSizeY="0.25"' in tf.ome_metadata
        assert page.tags["XResolution"].value[0] / page.tags["XResolution"].value[1] == pytest.approx(1e4 / 0.25)
        level0 = series.levels[0].asarray()
        level2 = series.levels[2].asarray()
    assert set(np.unique(level0)) == {0, 255}
    # nearest neighbour: level-0 pixel (x, y) shows output pixel floor((x + .5) / 4)
    rows = np.minimum((np.arange(1999) + 0.5) // 4, 499).astype(int)
    cols = np.minimum((np.arange(3037) + 0.5) // 4, 759).astype(int)
    np.testing.assert_array_equal(level0, (prob >= 128)[np.ix_(rows, cols)] * 255)
    ds = 3037 / 760
    rows = np.minimum(((np.arange(500) + 0.5) * ds) // 4, 499).astype(int)
    cols = np.minimum(((np.arange(760) + 0.5) * ds) // 4, 759).astype(int)
    np.testing.assert_array_equal(level2, (prob >= 128)[np.ix_(rows, cols)] * 255)
    ts = tiffslide.TiffSlide(path)
    assert ts.dimensions == dims and ts.level_count == 3
    assert float(ts.properties["tiffslide.mpp-x"]) == pytest.approx(0.25)
    region = np.asarray(ts.read_region((1000, 800), 0, (300, 200)))
    region = region[..., 0] if region.ndim == 3 else region
    np.testing.assert_array_equal(region, level0[800:1000, 1000:1300])


def test_ome_tiff_of_a_predicted_slide(cmu, tmp_path):
    import tiffslide

    pred = Predictor(DarkModel(), raw_config(4.0), PredictOptions())
    assert predict_slide(pred, SlideJob(cmu, "cmu"), tmp_path).status == "done"
    ts = tiffslide.TiffSlide(tmp_path / "cmu" / "mask.ome.tiff")
    assert ts.dimensions == (2220, 2967) and float(ts.properties["tiffslide.mpp-x"]) == pytest.approx(0.499)
    assert ts.level_dimensions[-1][1] <= 1024 < ts.level_dimensions[-2][1]


# -- GeoJSON ----------------------------------------------------------------------------------------
def test_polygons_trace_pixel_edges_exactly_with_holes():
    m = shapes_mask(300, 400)
    polys = mask_polygons(m, epsilon_px=0)
    gj = polygons_to_geojson(polys, 1.0, (400, 300))
    holes = sum(len(f["geometry"]["coordinates"]) - 1 for f in gj["features"])
    assert holes >= 1
    for f in gj["features"]:
        g = shape(f["geometry"])
        assert g.is_valid and g.geom_type == "Polygon"
        assert all(r[0] == r[-1] for r in f["geometry"]["coordinates"])  # closed rings
    polygons = [Polygon([np.array(r)[:-1] for r in f["geometry"]["coordinates"]], 1) for f in gj["features"]]
    back = PolygonAnnotations(polygons, "mem").rasterize(0, 0, 1.0, 400)[:300].astype(bool)
    np.testing.assert_array_equal(back, well_composed(m))  # exactly the mask's pixels (pinches filled)
    assert (well_composed(m) != m).sum() < 10


def test_geojson_polygons_are_valid_inside_and_rasterise_back(tmp_path):
    rng = np.random.default_rng(1)
    for trial in range(12):
        h, w = rng.integers(40, 260, 2)
        noise = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), rng.uniform(1, 8))
        m = noise > np.quantile(noise, rng.uniform(0.3, 0.9))
        scale = float(rng.choice([1.0, 2.0, 3.7]))
        dims = (int(w * scale) - 1, int(h * scale) - 1)
        gj = polygons_to_geojson(mask_polygons(inside_only(m, scale, dims), 0.35), scale, dims)
        for f in gj["features"]:
            g = shape(f["geometry"])
            assert g.is_valid, trial
            x0, y0, x1, y1 = g.bounds
            assert x0 >= 0 and y0 >= 0 and x1 <= dims[0] and y1 <= dims[1]
            assert f["properties"]["objectType"] == "annotation" and f["properties"]["classification"]["name"] == "Tumor"
        path = tmp_path / f"t{trial}.geojson"
        write_geojson(path, gj)
        back = rasterise_geojson(path, dims, scale, (h, w))
        yy, xx = np.mgrid[:h, :w]
        inside = ((xx + 0.5) * scale < dims[0]) & ((yy + 0.5) * scale < dims[1])  # pixel centres on the slide
        assert not (back & ~inside).any()
        assert iou(back, m & inside) > 0.99, trial


def test_predicted_geojson_rasterises_back_to_the_mask(tmp_path):
    rgb = np.full((420, 640, 3), (235, 190, 215), np.uint8)
    m = shapes_mask(420, 640)
    rgb[m] = (70, 20, 110)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    pred = Predictor(DarkModel(), raw_config(1.0), PredictOptions())
    r = predict_slide(pred, SlideJob(tmp_path / "img.png", "img", mpp=0.5), tmp_path)  # 2 level-0 px per output px
    assert r.status == "done", r.error
    out = tmp_path / "img"
    done = json.loads((out / "done.json").read_text())
    prob = zarr.open_array(str(out / "prob.zarr"), mode="r")[:]
    assert prob.shape == (210, 320) and done["output"]["level0_per_px"] == 2.0
    mask = prob >= threshold_u8(0.5)
    gj = json.loads((out / "tumor.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == done["output"]["polygons"] > 3
    assert any(len(f["geometry"]["coordinates"]) > 1 for f in gj["features"])  # the hole survived
    for f in gj["features"]:
        g = shape(f["geometry"])
        assert g.is_valid and g.bounds[2] <= 640 and g.bounds[3] <= 420
    back = rasterise_geojson(out / "tumor.geojson", (640, 420), 2.0, prob.shape)
    assert iou(back, mask) > 0.99
    png = np.asarray(Image.open(out / "mask.png"))
    assert png.shape == (420, 640) and iou(png > 0, m) > 0.95  # the input's mask at its own size (from half resolution)


def test_big_masks_are_traced_on_a_reduced_grid():
    m = shapes_mask(600, 900)
    prob = (m * 255).astype(np.uint8)
    f = contour_factor(prob.shape, budget_px=34_000)
    assert f == 4
    reducer = BlockReducer(prob.shape, f)
    for _, band in iter_bands(prob):
        reducer.feed(band)
    low = reducer.finish()
    ref = cv2.resize(prob, (225, 150), interpolation=cv2.INTER_AREA)  # exact 4x block means
    np.testing.assert_array_equal(low, ref)
    polys = mask_polygons(low >= 128, 0.35)
    gj = polygons_to_geojson(polys, float(f), (900, 600))
    assert all(shape(x["geometry"]).is_valid for x in gj["features"])
    back = np.zeros((600, 900), bool)
    ann = PolygonAnnotations([Polygon([np.array(r)[:-1] for r in x["geometry"]["coordinates"]], 1) for x in gj["features"]], "mem")
    back = ann.rasterize(0, 0, 1.0, 900)[:600].astype(bool)
    assert iou(back, m) > 0.9  # coarser, still faithful


def test_overlay_tints_the_mask(tmp_path):
    thumb = np.full((300, 400, 3), 255, np.uint8)
    low = np.zeros((150, 200), np.uint8)
    low[50:100, 50:150] = 255
    write_overlay(tmp_path / "o.png", thumb, 4.0, low, 8.0, 0.5)
    img = np.asarray(Image.open(tmp_path / "o.png"))
    assert img.shape == (300, 400, 3)
    assert img[150, 200, 0] > img[150, 200, 1] + 50  # red inside
    assert (img[10, 10] == 255).all()  # untouched outside


def test_geojson_regions_carry_qupath_measurements_and_read_back(tmp_path):
    """One annotation per region with its area and tumour probability; the file reads back to the mask."""
    prob = np.zeros((300, 400), np.uint8)
    prob[20:120, 30:130] = 200  # a 100 x 100 px square
    prob[60:80, 70:90] = 0  # with a 20 x 20 hole
    prob[150:250, 200:260] = 140  # a 100 x 60 bar, one hot pixel in it
    prob[200, 230] = 250
    geo = MapGeometry(4.0, (1600, 1200), 0.25)  # 4 level-0 px per map px at 0.25 um/px: 1 um per map px
    write_outputs(tmp_path, prob, None, geo, OutputSpec("m", 0.5), np.full((30, 40, 3), 255, np.uint8), 40.0)
    feats = json.loads((tmp_path / "tumor.geojson").read_text())["features"]
    assert len(feats) == 2
    by_area = sorted((f["properties"] for f in feats), key=lambda p: p["measurements"]["Area µm^2"])
    bar, square = (p["measurements"] for p in by_area)
    assert square["Area µm^2"] == pytest.approx(100 * 100 - 20 * 20, rel=1e-6)
    assert bar["Area µm^2"] == pytest.approx(100 * 60, abs=1.0)  # the simplified outline's area (0.35 px tolerance)
    for f in feats:  # the area is the written polygon's, exterior minus holes, in um^2
        rings = [np.array(r) / 4.0 for r in f["geometry"]["coordinates"]]
        areas = [abs(np.dot(r[:, 0], np.roll(r[:, 1], -1)) - np.dot(r[:, 1], np.roll(r[:, 0], -1))) / 2 for r in rings]
        assert f["properties"]["measurements"]["Area µm^2"] == pytest.approx(areas[0] - sum(areas[1:]), abs=0.02)
    assert square["Tumor probability mean"] == pytest.approx(200 / 255, abs=1e-4)
    assert square["Tumor probability max"] == pytest.approx(200 / 255, abs=1e-4)
    assert bar["Tumor probability max"] == pytest.approx(250 / 255, abs=1e-4)
    assert bar["Tumor probability mean"] == pytest.approx((140 * 5999 + 250) / 6000 / 255, abs=1e-4)
    for p in by_area:
        assert p["objectType"] == "annotation" and p["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    back = rasterise_geojson(tmp_path / "tumor.geojson", (1600, 1200), 4.0, prob.shape)
    np.testing.assert_array_equal(back, prob >= threshold_u8(0.5))
