"""Annotation readers and per-window rasterisation (pixel-exact where the geometry is known)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from histodg.slides.annotation_files import load_annotations, normalise_mask
from histodg.slides.annotations import AnnotationError, LabelMap, MaskAnnotations, PolygonAnnotations, fill_rings

SQUARE_WITH_HOLE = {
    "type": "Feature",
    "geometry": {
        "type": "Polygon",
        "coordinates": [
            [[100, 100], [300, 100], [300, 300], [100, 300], [100, 100]],
            [[150, 150], [250, 150], [250, 250], [150, 250], [150, 150]],
        ],
    },
    "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}},
}


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_polygon_with_hole_is_pixel_exact_at_native_scale(tmp_path):
    ann = load_annotations(_write(tmp_path, "a.geojson", SQUARE_WITH_HOLE), (1000, 1000))
    r = ann.rasterize(80, 90, 1.0, 256)  # window origin (80, 90), 1 level-0 px per pixel
    expected = np.zeros((256, 256), np.uint8)
    # pixel centres x + 0.5 in [100, 300) -> columns 20..219 (x0 = 80); rows 10..209 (y0 = 90)
    expected[10:210, 20:220] = 1
    expected[60:160, 70:170] = 0  # the hole [150, 250)
    np.testing.assert_array_equal(r, expected)


def test_polygon_with_hole_is_pixel_exact_downsampled(tmp_path):
    ann = load_annotations(_write(tmp_path, "a.geojson", SQUARE_WITH_HOLE), (1000, 1000))
    r = ann.rasterize(0, 0, 4.0, 128)  # 4 level-0 px per pixel: centres at 4j + 2
    expected = np.zeros((128, 128), np.uint8)
    expected[25:75, 25:75] = 1  # 4j + 2 in [100, 300) -> j in 25..74
    expected[37:62, 37:62] = 0  # 4j + 2 in [150, 250) -> j in 37..61
    np.testing.assert_array_equal(r, expected)


def test_rasteriser_matches_point_in_polygon_on_random_polygons():
    shapely = pytest.importorskip("shapely")
    from shapely.geometry import Polygon as SPoly

    rng = np.random.default_rng(1)
    jj, ii = np.meshgrid(np.arange(64.0), np.arange(64.0))
    for trial in range(100):
        n = int(rng.integers(3, 25))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(8, 30, n)
        ext = np.stack([32 + rad * np.cos(ang), 32 + rad * np.sin(ang)], 1)
        hole = np.stack([32 + 4 * np.cos(np.linspace(6, 0, 7)), 32 + 4 * np.sin(np.linspace(6, 0, 7))], 1)
        poly = SPoly(ext, [hole])
        if not poly.is_valid:
            continue
        got = fill_rings([ext, hole], 64, 64)
        want = shapely.contains_xy(poly, jj.ravel(), ii.ravel()).reshape(64, 64)
        on_edge = shapely.intersects_xy(poly.boundary, jj.ravel(), ii.ravel()).reshape(64, 64)
        assert ((got != want) & ~on_edge).sum() == 0, trial


def test_feature_collection_multipolygon_and_labels(tmp_path):
    fc = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": {"classification": {"name": "Stroma"}},
             "geometry": {"type": "MultiPolygon", "coordinates": [
                 [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]],
                 [[[20, 0], [30, 0], [30, 10], [20, 10], [20, 0]]]]}},
            {"type": "Feature", "properties": {"classification": {"name": "tumor"}},
             "geometry": {"type": "Polygon", "coordinates": [[[5, 5], [25, 5], [25, 8], [5, 8], [5, 5]]]}},
            {"type": "Feature", "properties": {"classification": {"name": "Other"}},
             "geometry": {"type": "Polygon", "coordinates": [[[0, 20], [5, 20], [5, 25], [0, 25]]]}},
            {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [1, 1]}},
        ],
    }
    p = _write(tmp_path, "fc.geojson", fc)
    labels = LabelMap.parse(["Tumor=1", "stroma=2"])
    ann = load_annotations(p, (100, 100), labels)
    r = ann.rasterize(0, 0, 1.0, 32)
    assert r[2, 2] == 2 and r[2, 25] == 2 and r[2, 15] == 0
    assert r[6, 7] == 1  # the smaller tumour polygon is painted over the larger stroma
    assert r[22, 2] == 0  # "Other" is unmapped
    assert ann.skipped["Other"] == 1 and ann.skipped["(unclassified)"] == 1
    assert labels.label_names() == {"0": "background", "1": "tumor", "2": "stroma"}
    # without a map every polygon is tumour
    r1 = load_annotations(p, (100, 100)).rasterize(0, 0, 1.0, 32)
    assert r1[22, 2] == 1 and set(np.unique(r1)) == {0, 1}


def test_erasers_and_ignore_are_painted_last():
    sq = lambda a, b: [np.array([[a, a], [b, a], [b, b], [a, b]], float)]  # noqa: E731
    from histodg.slides.annotations import Polygon

    ann = PolygonAnnotations([Polygon(sq(4, 8), 255), Polygon(sq(2, 6), 0), Polygon(sq(0, 10), 1)], "x")
    r = ann.rasterize(0, 0, 1.0, 12)
    assert r[1, 1] == 1 and r[3, 3] == 0 and r[7, 7] == 255 and r[5, 5] == 255


def test_asap_xml(tmp_path):
    xml = """<?xml version="1.0"?><ASAP_Annotations><Annotations>
      <Annotation Name="a" Type="Polygon" PartOfGroup="_0"><Coordinates>
        <Coordinate Order="0" X="10" Y="10"/><Coordinate Order="1" X="50" Y="10"/>
        <Coordinate Order="2" X="50" Y="50"/><Coordinate Order="3" X="10" Y="50"/></Coordinates></Annotation>
      <Annotation Name="b" Type="Polygon" PartOfGroup="_2"><Coordinates>
        <Coordinate Order="0" X="20" Y="20"/><Coordinate Order="1" X="30" Y="20"/>
        <Coordinate Order="2" X="30" Y="30"/><Coordinate Order="3" X="20" Y="30"/></Coordinates></Annotation>
    </Annotations></ASAP_Annotations>"""
    p = tmp_path / "a.xml"
    p.write_text(xml)
    ann = load_annotations(p, (100, 100), LabelMap.parse(["_0=1", "_2=0"]))
    r = ann.rasterize(0, 0, 1.0, 64)
    assert r[15, 15] == 1 and r[25, 25] == 0 and r[5, 5] == 0
    assert r.sum() == 40 * 40 - 10 * 10


def test_label_mask_image_at_a_downsample(tmp_path):
    lab = np.zeros((25, 40), np.uint8)  # a 160 x 100 slide at downsample 4
    lab[5:10, 10:20] = 255
    Image.fromarray(np.stack([lab] * 3, -1)).save(tmp_path / "m.png")  # 3-channel 0/255 (COSAS style)
    ann = load_annotations(tmp_path / "m.png", (160, 100))
    assert isinstance(ann, MaskAnnotations) and ann.ds_x == 4
    r = ann.rasterize(0, 0, 1.0, 100)
    assert r.max() == 1 and r[20:40, 40:80].all() and r.sum() == 20 * 40
    with pytest.raises(AnnotationError, match="not the same shape"):
        load_annotations(tmp_path / "m.png", (160, 300))


def test_mask_normalisation():
    assert set(np.unique(normalise_mask(np.array([[0, 255]], np.uint8))).tolist()) == {0, 1}
    np.testing.assert_array_equal(normalise_mask(np.array([[0, 1, 2, 255]], np.uint8)), [[0, 1, 2, 255]])
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)  # an anti-aliased (JPEG) binary mask
    assert set(np.unique(normalise_mask(grey)).tolist()) == {0, 1}


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ('{"type": "Topology"}', "not GeoJSON"),
        ('{"type": "FeatureCollection", "features": [{"type": "Feature"}]}', "feature 0 has no geometry"),
        ('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, '
         '"geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, "a"], [2, 2]]]}}]}', "malformed coordinates"),
        ('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, '
         '"geometry": {"type": "Polygon", "coordinates": [[[5000, 5000], [6000, 5000], [6000, 6000]]]}}]}', "no polygon overlaps"),
    ],
)
def test_malformed_geojson_gives_one_clear_error(tmp_path, text, message):
    p = tmp_path / "bad.geojson"
    p.write_text(text)
    with pytest.raises(AnnotationError) as info:
        load_annotations(p, (1000, 1000))
    assert message in str(info.value) and "bad.geojson" in str(info.value)


def test_label_option_parsing():
    with pytest.raises(ValueError, match="NAME=VALUE"):
        LabelMap.parse(["tumor"])
    with pytest.raises(ValueError, match="0-255"):
        LabelMap.parse(["tumor=300"])
    assert LabelMap.parse(["*=1"])("anything") == 1
