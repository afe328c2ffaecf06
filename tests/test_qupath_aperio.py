"""What QuPath and Aperio ImageScope write, read as they mean it: classes, object types, holes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from histodg.slides.annotation_files import annotation_format, load_annotations
from histodg.slides.annotations import LabelMap


def _square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _feature(box, props, **extra):
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(*box)]}, "properties": props,
            **extra}


# one square per way QuPath writes an object (0.4+ unless said), in a row of 10 px squares
QUPATH_OBJECTS = [
    _feature((0, 0, 10, 10), {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]},
                              "isLocked": True, "measurements": {"Area µm^2": 25.0}}),
    _feature((10, 0, 20, 10), {"objectType": "annotation", "classification": {"names": ["Tumor", "Positive"],
                                                                              "color": [250, 0, 0]}}),
    _feature((20, 0, 30, 10), {"objectType": "annotation", "classification": "Stroma"}),
    _feature((30, 0, 40, 10), {"objectType": "detection", "classification": {"name": "Tumor"},
                               "measurements": [{"name": "Nucleus: Area", "value": 20.1}]}),
    _feature((40, 0, 50, 10), {"objectType": "cell", "classification": {"name": "Tumor"}}),
    _feature((50, 0, 60, 10), {"objectType": "tile", "isLocked": True, "classification": {"name": "Tumor"}}),
    _feature((60, 0, 70, 10), {"classification": {"name": "Tumor"}}, id="PathDetectionObject"),  # QuPath 0.2
]


def _row(ann):
    r = ann.rasterize(0, 0, 1.0, 72)
    return [int(r[5, 5 + 10 * i]) for i in range(7)]


@pytest.mark.parametrize("wrap", ["collection", "list", "one feature"])
def test_qupath_classes_and_object_types(tmp_path, wrap):
    objects = QUPATH_OBJECTS if wrap != "one feature" else QUPATH_OBJECTS[1:2]
    data = {"type": "FeatureCollection", "features": objects} if wrap == "collection" else (
        objects if wrap == "list" else objects[0])
    p = tmp_path / "qupath.geojson"
    p.write_text(json.dumps(data))
    labels = LabelMap.parse(["tumor=1", "stroma=2"])
    ann = load_annotations(p, (100, 100), labels)
    if wrap == "one feature":  # a derived class with no "name": found by its first name
        assert _row(ann)[:2] == [0, 1]
        return
    # annotations only: detections, cells, tiles (and a QuPath 0.2 detection) are not annotations
    assert _row(ann) == [1, 1, 2, 0, 0, 0, 0]
    assert ann.skipped == {"detection object": 2, "cell object": 1, "tile object": 1}
    # asked for, detections and cells count too; the derived class can be mapped whole
    labels = LabelMap.parse(["tumor=1", "tumor: positive=3", "stroma=2"], "annotation,detection,cell")
    assert _row(load_annotations(p, (100, 100), labels)) == [1, 3, 2, 1, 1, 0, 1]


def test_objects_option_is_validated_and_recorded(cli, cmu, tmp_path):
    with pytest.raises(ValueError, match="--objects"):
        LabelMap.parse([], "annotation,polygon")
    ann = tmp_path / "cmu_small_region.geojson"
    ann.write_text(json.dumps({"type": "FeatureCollection", "features": [
        _feature((0, 0, 1200, 1200), {"objectType": "annotation", "classification": {"name": "Tumor"}}),
        _feature((1200, 1200, 2200, 2900), {"objectType": "detection", "classification": {"name": "Tumor"}})]}))
    args = ["tile", cmu, "-o", tmp_path / "s", "--annotations", ann, "--tile-size", "128", "--mpp", "2"]
    r = cli(*args, "--objects", "annotation,detection")
    assert r.exit_code == 0, r.stderr
    attrs = json.loads((tmp_path / "s" / "cmu_small_region.zarr" / "zarr.json").read_text())["attributes"]
    assert attrs["annotation_objects"] == ["annotation", "detection"]
    r = cli(*args)  # the default reads annotations only: another store
    assert r.exit_code == 1 and "the --objects differ" in r.stderr
    assert cli(*args, "--objects", "polygon").exit_code == 2


APERIO = """<?xml version="1.0" encoding="UTF-8"?>
<Annotations MicronsPerPixel="0.499">
  <Annotation Id="1" Name="Tumor" LineColor="255" Visible="1">
    <Attributes><Attribute Name="Description" Id="0" Value=""/></Attributes>
    <Regions>
      <RegionAttributeHeaders><AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/></RegionAttributeHeaders>
      <Region Id="1" Type="0" NegativeROA="0" Text="">
        <Vertices><Vertex X="10" Y="10" Z="0"/><Vertex X="90" Y="10" Z="0"/><Vertex X="90" Y="90" Z="0"/>
          <Vertex X="10" Y="90" Z="0"/></Vertices></Region>
      <Region Id="2" Type="0" NegativeROA="1" Text="">
        <Vertices><Vertex X="40" Y="40" Z="0"/><Vertex X="60" Y="40" Z="0"/><Vertex X="60" Y="60" Z="0"/>
          <Vertex X="40" Y="60" Z="0"/></Vertices></Region>
      <Region Id="3" Type="3" NegativeROA="0"><Vertices><Vertex X="0" Y="0"/><Vertex X="5" Y="5"/></Vertices></Region>
    </Regions>
  </Annotation>
  <Annotation Id="2" Name="" LineColor="65280">
    <Regions>
      <Region Id="4" Type="1" NegativeROA="0"><Vertices><Vertex X="100" Y="10"/><Vertex X="140" Y="10"/>
        <Vertex X="140" Y="50"/><Vertex X="100" Y="50"/></Vertices></Region>
      <Region Id="5" Type="2" NegativeROA="0"><Vertices><Vertex X="100" Y="60"/><Vertex X="140" Y="100"/></Vertices>
      </Region>
    </Regions>
  </Annotation>
</Annotations>"""


def test_aperio_xml_regions_holes_and_classes(tmp_path):
    p = tmp_path / "slide.xml"
    p.write_text(APERIO)
    ann = load_annotations(p, (200, 200), LabelMap.parse(["tumor=1", "65280=2"]))
    r = ann.rasterize(0, 0, 1.0, 160)
    assert r[20, 20] == 1 and r[50, 50] == 0  # the negative region is a hole
    assert int((r == 1).sum()) == 80 * 80 - 20 * 20
    assert r[30, 120] == 2 and int((r[:55, 95:145] == 2).sum()) == 40 * 40  # rectangle, by its LineColor
    ellipse = int((r[55:105, 95:145] == 2).sum())
    assert abs(ellipse - np.pi * 20 * 20) < 0.02 * np.pi * 20 * 20  # a 20 px-radius circle
    assert r[2, 2] == 0 and ann.skipped == {"arrow region": 1}
    # without a map every region is tumour; an unmapped class is skipped by its name
    assert set(np.unique(load_annotations(p, (200, 200)).rasterize(0, 0, 1.0, 160))) == {0, 1}
    only = load_annotations(p, (200, 200), LabelMap.parse(["tumor=1"]))
    assert only.skipped["65280"] == 1


def test_formats_are_told_apart_by_content_not_name(tmp_path):
    (tmp_path / "aperio.annotations").write_text(APERIO)
    (tmp_path / "qupath.txt").write_text(json.dumps(QUPATH_OBJECTS))
    (tmp_path / "geo.xml").write_text(json.dumps(QUPATH_OBJECTS[:1]))  # misnamed: still GeoJSON
    assert [annotation_format(tmp_path / n) for n in ("aperio.annotations", "qupath.txt", "geo.xml")] == [
        "xml", "geojson", "geojson"]
    r = load_annotations(tmp_path / "aperio.annotations", (200, 200)).rasterize(0, 0, 1.0, 32)
    assert r[20, 20] == 1
    r = load_annotations(tmp_path / "geo.xml", (100, 100)).rasterize(0, 0, 1.0, 16)
    assert r[5, 5] == 1 and r[12, 12] == 0


def test_predict_geojson_tiles_are_a_measurement_map_of_the_probability(cli, cmu, tmp_path):
    import zarr

    from helpers import tiny_checkpoint

    ck = tiny_checkpoint(tmp_path / "ck.pt")
    r = cli("predict", ck, cmu, "-o", tmp_path / "p", "--geojson-tiles")
    assert r.exit_code == 0, r.output
    out = tmp_path / "p" / "cmu_small_region"
    done = json.loads((out / "done.json").read_text())
    assert "tiles.geojson" in done["files"] and done["settings"]["geojson_tiles"] is True
    feats = json.loads((out / "tiles.geojson").read_text())["features"]
    assert feats
    side = done["output"]["level0_per_px"] * (64 - done["settings"]["overlap_px"])  # the window stride, level 0
    prob = zarr.open_array(str(out / "prob.zarr"), mode="r")[:]
    scale = done["output"]["level0_per_px"]
    for f in feats:
        props = f["properties"]
        assert props["objectType"] == "tile" and props["isLocked"] is True
        m = props["measurements"]
        assert m["Tumor probability"] + m["Background probability"] == pytest.approx(1, abs=1e-3)
        (x0, y0), _, (x1, y1) = f["geometry"]["coordinates"][0][:3]
        assert x1 - x0 <= side + 1e-6 and x0 % side == pytest.approx(0, abs=1e-6)
        cell = prob[round(y0 / scale):round(y1 / scale), round(x0 / scale):round(x1 / scale)]
        assert m["Tumor probability"] == pytest.approx(cell.mean() / 255, abs=2e-4)  # the map's mean over the tile
    # every predicted window lies in tiles, and tiles are not read back as annotations
    assert len(feats) >= done["windows"]["run"] // 4
    ann = load_annotations(out / "tiles.geojson", (2220, 2967))
    assert ann.skipped == {"tile object": len(feats)}
    assert cli("predict", ck, cmu, "-o", tmp_path / "p").exit_code == 1  # without tiles: other settings
