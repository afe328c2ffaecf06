"""`histodg predict --roi` (issue 29 §1): only the windows that touch the region run, every output is
0 outside it, done.json / summary / report give its area and the tumour inside it, a slide
without a region file in a --roi folder is predicted whole and says so, a rerun with another
region is refused, and `evaluate` scores inside the region."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from helpers import tiny_checkpoint
from histodg.evaluation.predictions import score_prediction
from histodg.slides.roi import Region

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
BED = (600, 800, 1600, 2000)  # level-0 x0, y0, x1, y1 of the drawn region (the real slide is 2220 x 2967)
ELSEWHERE = (100, 100, 400, 400)


def rect(box, name: str) -> dict:
    x0, y0, x1, y1 = box
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": [0, 0, 255]}}}


def geojson(path, *features) -> str:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": list(features)}))
    return str(path)


@pytest.fixture(scope="module")
def runs(cmu, tmp_path_factory):
    """The real slide predicted whole and inside the "Tumor bed" of a file that also holds another class."""
    from click.testing import CliRunner

    from histodg.cli import main

    root = tmp_path_factory.mktemp("roi")
    ck = tiny_checkpoint(root / "ck.pt", mpp=4.0, tile=64, head_logit=4.0)  # tumour wherever a window runs
    roi = geojson(root / "cmu.geojson", rect(BED, "Tumor bed"), rect(ELSEWHERE, "Other"))
    common = [str(ck), str(cmu), "--tta", "none", "--batch-size", "16", "--qc", "off"]
    for name, extra in (("whole", []), ("bed", ["--roi", roi, "--roi-class", "Tumor bed"])):
        r = CliRunner().invoke(main, ["predict", *common, "-o", str(root / name), *extra])
        assert r.exit_code == 0, r.output
    return root, ck, roi


def done_of(root, name: str) -> dict:
    return json.loads((root / name / "cmu_small_region" / "done.json").read_text())


def test_only_the_region_is_predicted_and_measured(runs):
    root, _, roi = runs
    whole, bed = done_of(root, "whole"), done_of(root, "bed")
    assert 0 < bed["windows"]["run"] < whole["windows"]["run"]
    prob = zarr.open_array(str(root / "bed" / "cmu_small_region" / "prob.zarr"), mode="r")[:]
    s = bed["output"]["level0_per_px"]
    cy, cx = (np.arange(prob.shape[0]) + 0.5) * s, (np.arange(prob.shape[1]) + 0.5) * s
    x0, y0, x1, y1 = BED
    inside = ((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]
    assert not prob[~inside].any()  # nothing outside, the "Other" annotation included
    whole_prob = zarr.open_array(str(root / "whole" / "cmu_small_region" / "prob.zarr"), mode="r")[:]
    assert np.array_equal(prob[inside], whole_prob[inside])  # inside, the prediction the whole slide gets
    mpp = bed["slide"]["mpp"]
    assert bed["roi"]["area_mm2"] == pytest.approx((x1 - x0) * (y1 - y0) * mpp**2 / 1e6, rel=1e-6)
    assert bed["roi"]["class"] == "Tumor bed" and bed["roi"]["file"] == roi and len(bed["roi"]["sha256"]) == 64
    # the tumour is counted on the 4 um/px map, the region on level 0: within a row and a column of map pixels
    margin = ((x1 - x0) + (y1 - y0) + s) * s * mpp**2 / 1e6
    assert 0 < bed["tumor_area_mm2"] == bed["roi"]["tumor_area_mm2"] <= bed["roi"]["area_mm2"] + margin
    assert bed["tumor_area_mm2"] < whole["tumor_area_mm2"] and whole["roi"] is None
    row = json.loads((root / "bed" / "summary.json").read_text())[0]
    assert row["roi_area_mm2"] == pytest.approx(bed["roi"]["area_mm2"])
    assert "region mm²" in (root / "bed" / "report.html").read_text()
    polygons = json.loads((root / "bed" / "cmu_small_region" / "tumor.geojson").read_text())["features"]
    xy = np.concatenate([np.asarray(f["geometry"]["coordinates"][0]) for f in polygons])
    assert xy[:, 0].min() >= x0 - s and xy[:, 0].max() <= x1 + s and xy[:, 1].min() >= y0 - s and xy[:, 1].max() <= y1 + s


def test_a_slide_without_a_region_file_is_predicted_whole_and_says_so(runs, cli, cmu, tmp_path):
    root, ck, _ = runs
    (tmp_path / "regions").mkdir()
    r = cli("predict", ck, cmu, "--tta", "none", "--qc", "off", "-o", tmp_path / "out", "--roi", tmp_path / "regions")
    assert r.exit_code == 0, r.output
    done = json.loads((tmp_path / "out" / "cmu_small_region" / "done.json").read_text())
    assert done["roi"]["file"] is None and "predicted whole" in done["roi"]["note"]
    assert done["windows"]["run"] == done_of(root, "whole")["windows"]["run"]
    assert "predicted whole" in json.loads((tmp_path / "out" / "summary.json").read_text())[0]["note"]


def test_a_rerun_with_another_region_is_refused(runs, cli, cmu, tmp_path):
    root, ck, roi = runs
    args = [ck, cmu, "--tta", "none", "--batch-size", "16", "--qc", "off", "-o", root / "bed", "--roi-class", "Tumor bed"]
    r = cli("predict", *args, "--roi", roi, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["status"] == "skipped"
    other = geojson(tmp_path / "cmu.geojson", rect((600, 800, 1200, 1500), "Tumor bed"))
    r = cli("predict", *args, "--roi", other)
    assert r.exit_code == 1 and "the region (--roi) differs" in r.stderr
    r = cli("predict", ck, cmu, "-o", tmp_path / "ln", "--roi", other, "--roi-class", "Lymph node")
    assert r.exit_code == 1 and "no annotation of class 'Lymph node'" in r.stderr and "Traceback" not in r.output
    r = cli("predict", ck, cmu, "-o", tmp_path / "x", "--roi-class", "Tumor bed")
    assert r.exit_code == 2 and "give --roi too" in r.output


def test_evaluate_scores_inside_the_region(runs, cli, tmp_path):
    root, _, _ = runs
    truth = geojson(tmp_path / "cmu_small_region.geojson", rect((0, 0, 1100, 2967), "Tumor"))  # the left half
    bed_dir = root / "bed" / "cmu_small_region"
    tp, p, t = score_prediction(bed_dir, truth)
    done = done_of(root, "bed")
    s, (h, w) = done["output"]["level0_per_px"], done["output"]["shape"]
    region = Region.load(done["roi"]["file"], tuple(done["slide"]["dimensions"]), "Tumor bed")
    inside = region.raster(0, 0, s, max(h, w))[:h, :w]
    cx = (np.arange(w) + 0.5) * s
    assert t == int((inside & (cx < 1100)[None, :]).sum())  # the truth counted inside the region only
    whole = score_prediction(root / "whole" / "cmu_small_region", truth)
    assert whole[2] > 2 * t  # the whole slide's truth is much more
    r = cli("evaluate", root / "bed", "--truth", tmp_path, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["images"][0]["dice"] == pytest.approx(2 * tp / (p + t), abs=1e-6)
