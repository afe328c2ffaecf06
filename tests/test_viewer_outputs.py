"""What `histodg predict` writes for a viewer (issue 29 §2): qc.geojson, prob.ome.tiff, the flat layout,
and every GeoJSON checked against what QuPath's import reads (FeatureCollection, objectType,
classification {name, color}, measurements as a map, Polygon / MultiPolygon rings closed and
oriented as RFC 7946 asks: exteriors counter-clockwise, holes clockwise, in x-right y-up terms)."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import zarr

from helpers import tiny_checkpoint
from histodg.synth.artefacts import draw_artefacts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
OBJECT_TYPES = ("annotation", "detection", "tile", "cell")


def _area(ring) -> float:
    r = np.asarray(ring, np.float64)
    return 0.5 * float(np.sum(r[:-1, 0] * r[1:, 1] - r[1:, 0] * r[:-1, 1]))


def check_qupath_geojson(path: Path, bounds: tuple[int, int]) -> list[dict]:
    """Every feature as QuPath's GeoJSON import reads it; returns the features."""
    fc = json.loads(path.read_text())
    assert fc["type"] == "FeatureCollection" and isinstance(fc["features"], list), path
    w, h = bounds
    for f in fc["features"]:
        assert f["type"] == "Feature"
        props = f["properties"]
        assert props["objectType"] in OBJECT_TYPES
        if "classification" in props or props["objectType"] == "annotation":
            c = props["classification"]
            assert isinstance(c["name"], str) and c["name"]
            assert len(c["color"]) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c["color"])
        measurements = props.get("measurements", {})
        assert isinstance(measurements, dict)  # a map of name -> number
        assert all(isinstance(k, str) and isinstance(v, (int, float)) and np.isfinite(v) for k, v in measurements.items())
        geom = f["geometry"]
        assert geom["type"] in ("Polygon", "MultiPolygon")
        for polygon in geom["coordinates"] if geom["type"] == "MultiPolygon" else [geom["coordinates"]]:
            for k, ring in enumerate(polygon):
                assert len(ring) >= 4 and ring[0] == ring[-1], "a ring is closed"
                assert (_area(ring) > 0) == (k == 0), "exterior counter-clockwise, holes clockwise (RFC 7946)"
                xy = np.asarray(ring)
                assert xy.min() >= 0 and (xy[:, 0] <= w).all() and (xy[:, 1] <= h).all()
    return fc["features"]


@pytest.fixture(scope="module")
def predicted(cmu, tmp_path_factory):
    """The real slide with a pen stroke, a blurred block and a fold drawn on, predicted with a model
    that says tumour everywhere, twice: the default layout with tiles.geojson, and the flat layout
    with prob.ome.tiff."""
    from click.testing import CliRunner

    from histodg.cli import main
    from histodg.slides.opening import open_slide

    root = tmp_path_factory.mktemp("viewer")
    with open_slide(cmu) as s:
        art, where = draw_artefacts(s.read_region((0, 0), 0, s.dimensions))
    cv2.imwrite(str(root / "artefacts.png"), cv2.cvtColor(art, cv2.COLOR_RGB2BGR))
    ck = tiny_checkpoint(root / "ck.pt", mpp=0.5, tile=128, head_logit=4.0)
    common = [str(ck), str(root / "artefacts.png"), "--mpp-override", "0.499", "--overlap", "0", "--batch-size", "16",
              "--tta", "none"]
    for folder, extra in (("folders", ["--geojson-tiles"]), ("flat", ["--layout", "flat", "--outputs", "prob-tiff"])):
        r = CliRunner().invoke(main, ["predict", *common, "-o", str(root / folder), *extra])
        assert r.exit_code == 0, r.output
    return root, where, art.shape[1::-1]


def test_every_geojson_is_what_qupath_imports(predicted):
    root, _, bounds = predicted
    kinds = {"tumor.geojson": "annotation", "qc.geojson": "annotation", "tiles.geojson": "tile"}
    for name, kind in kinds.items():
        features = check_qupath_geojson(root / "folders" / "artefacts" / name, bounds)
        assert features and {f["properties"]["objectType"] for f in features} == {kind}, name
    for name in ("artefacts.geojson", "artefacts.qc.geojson"):
        assert check_qupath_geojson(root / "flat" / name, bounds)


def test_qc_geojson_outlines_each_artefact_in_its_class(predicted):
    root, where, bounds = predicted
    features = check_qupath_geojson(root / "folders" / "artefacts" / "qc.geojson", bounds)
    by_class: dict[str, list] = {}
    for f in features:
        by_class.setdefault(f["properties"]["classification"]["name"], []).append(f)
    assert {"QC pen", "QC blur", "QC dark"} <= set(by_class)
    done = json.loads((root / "folders" / "artefacts" / "done.json").read_text())
    for flag in ("pen", "blur", "dark"):
        assert sum(f["properties"]["measurements"]["Windows"] for f in by_class[f"QC {flag}"]) == done["qc"]["counts"][flag]
        assert all(f["properties"]["measurements"]["Excluded from prediction"] == 1 for f in by_class[f"QC {flag}"])
    # the blur regions are the union of the windows QC flagged for blur, and those lie on the blurred block
    h, w = where["blur"].shape
    raster, boxes = np.zeros((h, w), np.uint8), np.zeros((h, w), bool)
    for f in by_class["QC blur"]:
        cv2.fillPoly(raster, [np.round(np.asarray(f["geometry"]["coordinates"][0])).astype(np.int32)], 1)
    for win in done["qc"]["excluded_list"]:
        if "blur" in win["flags"]:
            boxes[win["y"]:win["y"] + 128, win["x"]:win["x"] + 128] = True
    drawn = raster.astype(bool)
    assert boxes.sum() > 0 and (drawn & boxes).sum() / (drawn | boxes).sum() > 0.95
    assert where["blur"][drawn].mean() > 0.8  # on the block, not elsewhere


def test_prob_tiff_is_the_probability_map_as_a_pyramid(predicted):
    root, _, (w, h) = predicted
    prob = zarr.open_array(str(root / "flat" / "artefacts" / "prob.zarr"), mode="r")[:]
    with tifffile.TiffFile(root / "flat" / "artefacts.prob.ome.tiff") as tf:
        levels = tf.series[0].levels
        level0 = levels[0].asarray()
        assert tf.is_ome and level0.shape == (h, w) and level0.dtype == np.uint8 and len(levels) >= 2
        # the model sees the slide at its own pixels (0.5 against 0.499 um/px is within tolerance): 1 to 1
        assert prob.shape == level0.shape and np.array_equal(level0, prob)
        assert level0.max() == round(255 / (1 + np.exp(-4.0)))  # sigmoid(4) x 255: the probability, not a 0/255 mask
        assert levels[1].asarray().shape == ((h + 1) // 2, (w + 1) // 2)
    with tifffile.TiffFile(root / "flat" / "artefacts.ome.tiff") as tf:
        assert set(np.unique(tf.series[0].levels[0].asarray())) <= {0, 255}


def test_the_flat_layout_puts_the_viewer_files_beside_the_folders(predicted, cli):
    root, _, _ = predicted
    flat = root / "flat"
    for name in ("artefacts.ome.tiff", "artefacts.geojson", "artefacts.qc.geojson", "artefacts.prob.ome.tiff"):
        assert (flat / name).is_file(), name
    folder = flat / "artefacts"
    assert {"done.json", "prob.zarr", "overlay.png"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "tumor.geojson").exists() and not (folder / "mask.ome.tiff").exists()
    done = json.loads((folder / "done.json").read_text())
    assert "../artefacts.geojson" in done["files"] and done["settings"]["layout"] == "flat"
    ck = root / "ck.pt"
    args = [ck, root / "artefacts.png", "--mpp-override", "0.499", "--overlap", "0", "--batch-size", "16", "--tta", "none",
            "-o", flat, "--outputs", "prob-tiff"]
    r = cli("predict", *args, "--layout", "flat", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["status"] == "skipped"
    r = cli("predict", *args)  # the folders layout into a flat output: other settings, refused
    assert r.exit_code == 1 and "layout" in r.stderr
    mine = flat / "notes.geojson"
    mine.write_text("{}")  # a file of the user's beside the folders is never touched
    r = cli("predict", *args, "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (flat / "artefacts.geojson").exists() and not (flat / "artefacts.ome.tiff").exists()
    assert (folder / "tumor.geojson").is_file() and (folder / "prob.ome.tiff").is_file() and mine.read_text() == "{}"
