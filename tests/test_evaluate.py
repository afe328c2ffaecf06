"""`histodg evaluate`: Dice / IoU per image, per domain, overall; on stores and on predictions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from helpers import DarkModel, make_store, raw_config, tiny_checkpoint, uniform_store
from histodg.evaluation.predictions import evaluate_predictions
from histodg.evaluation.scoring import Evaluation, binarise_truth, domain_of
from histodg.inference import PredictOptions, Predictor, ReadOptions, predict_slide
from histodg.slides.inputs import SlideJob

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# -- the numbers ----------------------------------------------------------------------------------------
def test_dice_and_iou_against_hand_computed_cases():
    ev = Evaluation()
    a = ev.add("a", "colon", inter=30, n_pred=40, n_true=50)  # Dice 60/90, IoU 30/60
    b = ev.add("b", "colon", inter=0, n_pred=0, n_true=0)  # both empty: a perfect score
    c = ev.add("c", "lung", inter=0, n_pred=10, n_true=0)  # found something where there is nothing
    d = ev.add("d", "lung", inter=0, n_pred=0, n_true=25)  # missed everything
    assert (a.dice, a.iou) == (pytest.approx(2 / 3), pytest.approx(0.5))
    assert (b.dice, b.iou) == (1.0, 1.0) and (c.dice, c.iou) == (0.0, 0.0) and (d.dice, d.iou) == (0.0, 0.0)
    t = ev.table()
    assert t["domains"]["colon"]["dice"] == pytest.approx((2 / 3 + 1) / 2)
    assert t["domains"]["colon"]["iou"] == pytest.approx(0.75)
    assert t["domains"]["lung"]["dice"] == 0.0 and t["domains"]["lung"]["images"] == 2
    assert t["overall"]["dice"] == pytest.approx((2 / 3 + 1) / 4)  # the mean over images, not pixels
    assert t["overall"]["dice_pixels"] == pytest.approx(60 / (50 + 75))
    assert t["mean_domain_dice"] == pytest.approx(((2 / 3 + 1) / 2 + 0) / 2)
    assert [r["name"] for r in t["images"]] == ["a", "b", "c", "d"]


def test_truth_labels_and_domains():
    np.testing.assert_array_equal(binarise_truth(np.array([0, 1, 2, 255])), [0, 1, 1, 255])
    assert domain_of("colon", "s1") == "colon" and domain_of("unknown", "s1") == "s1"
    assert domain_of("colon", "s1", "scanner") == "s1" and domain_of(None, None) == "unknown"


# -- stores -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    make_store(root / "colon-a.zarr", n=6, organ="colon", seed=1)
    make_store(root / "colon-b.zarr", n=6, organ="colon", seed=2)
    make_store(root / "s2-a.zarr", n=6, scanner="s2", seed=3)
    uniform_store(root / "s2-empty.zarr", scanner="s2")
    return root


def _true_px(path: Path) -> tuple[int, int]:
    m = zarr.open_group(str(path), mode="r")["masks"][:]
    return int((m == 1).sum()), int(m.size)


def _everything(cli, stores, tmp_path) -> tuple[dict, dict, dict]:
    """`evaluate --json` of a model that calls every pixel tumour: the table, its rows, and each scored
    store's expected Dice (every pixel predicted: 2|T| / (|all| + |T|))."""
    everything = tiny_checkpoint(tmp_path / "all.pt", mpp=1.0, head_logit=10.0)
    r = cli("evaluate", everything, stores, "--json")
    assert r.exit_code == 0, r.output
    t = json.loads(r.stdout)
    expected = {}
    for name in ("colon-a", "colon-b", "s2-a"):
        n_true, n_all = _true_px(stores / f"{name}.zarr")
        expected[name] = 2 * n_true / (n_all + n_true)
    return t, {x["name"]: x for x in t["images"]}, expected


def test_evaluate_scores_each_store_as_a_model_of_known_output_predicts_it(cli, stores, tmp_path):
    _, rows, expected = _everything(cli, stores, tmp_path)
    assert set(rows) == {"colon-a", "colon-b", "s2-a", "s2-empty"}
    for name, dice in expected.items():
        n_true, n_all = _true_px(stores / f"{name}.zarr")
        assert (rows[name]["true_px"], rows[name]["predicted_px"]) == (n_true, n_all)
        assert rows[name]["dice"] == pytest.approx(dice) and rows[name]["iou"] == pytest.approx(n_true / n_all)
    assert rows["s2-empty"]["dice"] == 0.0  # predicted tumour on an image without any


def test_evaluate_averages_images_per_domain_on_the_axis_each_store_knows(cli, stores, tmp_path):
    t, rows, expected = _everything(cli, stores, tmp_path)
    assert rows["colon-a"]["domain"] == "colon" and rows["s2-a"]["domain"] == "s2"
    assert t["domains"]["colon"]["dice"] == pytest.approx((expected["colon-a"] + expected["colon-b"]) / 2)
    assert t["domains"]["s2"]["dice"] == pytest.approx(expected["s2-a"] / 2)  # with s2-empty's 0
    assert t["overall"]["dice"] == pytest.approx(sum(expected.values()) / 4)


def test_an_empty_prediction_of_an_empty_image_is_perfect_and_the_axis_can_be_forced(cli, stores, tmp_path):
    nothing = tiny_checkpoint(tmp_path / "none.pt", mpp=1.0, head_logit=-10.0)
    r = cli("evaluate", nothing, stores / "s2-empty.zarr", stores / "colon-a.zarr", "--domain-axis", "scanner", "--json")
    t = json.loads(r.stdout)
    rows = {x["name"]: x for x in t["images"]}
    assert rows["s2-empty"]["dice"] == 1.0 and rows["s2-empty"]["iou"] == 1.0
    assert rows["colon-a"]["dice"] == 0.0 and rows["colon-a"]["domain"] == "unknown"  # no scanner recorded
    assert t["overall"]["dice"] == 0.5
    r = cli("evaluate", nothing, stores)  # the rich tables
    assert r.exit_code == 0 and "per domain" in r.stdout and "overall" in r.stdout and "s2-empty" in r.stdout


def test_evaluate_stores_reports_bad_inputs_and_goes_on(cli, stores, tmp_path):
    everything = tiny_checkpoint(tmp_path / "all.pt", mpp=1.0, head_logit=10.0)
    no_masks = make_store(tmp_path / "nomask.zarr", n=2, masks=False)
    other_mpp = make_store(tmp_path / "coarse.zarr", n=2, mpp=2.0)
    r = cli("evaluate", everything, stores / "colon-a.zarr", no_masks, other_mpp, tmp_path / "missing.zarr", "--json")
    assert r.exit_code == 1
    assert [x["name"] for x in json.loads(r.stdout)["images"]] == ["colon-a"]
    assert "no masks" in r.stderr and "um/px" in r.stderr and "missing.zarr" in r.stderr


# -- predictions against annotations ------------------------------------------------------------------
@pytest.fixture(scope="module")
def predictions(tmp_path_factory):
    """Two predicted images: 'rect' predicts x 64-192, y 64-128 (8192 px); 'blank' predicts nothing."""
    root = tmp_path_factory.mktemp("pred")
    rect = np.full((256, 256, 3), (235, 190, 215), np.uint8)
    rect[64:128, 64:192] = (70, 20, 110)
    Image.fromarray(rect).save(root / "rect.png")
    Image.fromarray(np.full((256, 256, 3), (235, 190, 215), np.uint8)).save(root / "blank.png")
    pred = Predictor(DarkModel(), raw_config(mpp=1.0), PredictOptions(read=ReadOptions(qc="off")))  # flat colours, not tissue: no QC
    for name in ("rect", "blank"):
        r = predict_slide(pred, SlideJob(root / f"{name}.png", name, mpp=1.0, organ="colon"), root / "out")
        assert r.status == "done", r.error
    return root


def _rectangle(x0, y0, x1, y1, cls="Tumor"):
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "annotation", "classification": {"name": cls}}}


def test_cli_evaluate_predictions_against_geojson(cli, predictions, tmp_path):
    truth = tmp_path / "truth"
    truth.mkdir()
    # truth: x 64-192, y 64-160 (12288 px) and a 'Stroma' region to leave out; blank: nothing
    fc = {"type": "FeatureCollection", "features": [_rectangle(64, 64, 192, 160), _rectangle(0, 200, 50, 250, "Stroma")]}
    (truth / "rect.geojson").write_text(json.dumps(fc))
    (truth / "blank.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    r = cli("evaluate", predictions / "out", "--truth", truth, "--label", "tumor=1", "--json")
    assert r.exit_code == 0, r.output
    t = json.loads(r.stdout)
    rows = {x["name"]: x for x in t["images"]}
    assert rows["rect"]["intersection"] == 8192 and rows["rect"]["predicted_px"] == 8192 and rows["rect"]["true_px"] == 12288
    assert rows["rect"]["dice"] == pytest.approx(2 * 8192 / (8192 + 12288)) == pytest.approx(0.8)
    assert rows["rect"]["iou"] == pytest.approx(8192 / 12288)
    assert rows["blank"]["dice"] == 1.0  # nothing predicted, nothing there
    assert t["domains"]["colon"]["images"] == 2  # the organ recorded by predict
    assert t["overall"]["dice"] == pytest.approx(0.9) and t["overall"]["iou"] == pytest.approx((2 / 3 + 1) / 2)
    # without the label map every polygon is tumour: the Stroma box now counts as missed truth
    r = cli("evaluate", predictions / "out" / "rect", "--truth", truth, "--json")
    row = json.loads(r.stdout)["images"][0]
    assert row["true_px"] == 12288 + 2500 and row["dice"] == pytest.approx(2 * 8192 / (8192 + 14788))


def test_evaluate_predictions_with_a_manifest_and_mask_images(predictions, tmp_path):
    mask = np.zeros((256, 256), np.uint8)
    mask[64:128, 64:128] = 255  # half of the predicted rectangle
    Image.fromarray(mask).save(tmp_path / "rect_mask.png")
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(tmp_path / "blank_mask.png")
    (tmp_path / "truth.csv").write_text("path,annotation,organ,scanner\n"
                                        f"{predictions / 'rect.png'},rect_mask.png,unknown,s1\n"
                                        f"{predictions / 'blank.png'},blank_mask.png,unknown,s2\n")
    ev = evaluate_predictions([predictions / "out"], tmp_path / "truth.csv")
    t = ev.table()
    rows = {x["name"]: x for x in t["images"]}
    assert rows["rect"]["dice"] == pytest.approx(2 * 4096 / (8192 + 4096)) and rows["rect"]["domain"] == "colon"
    ev = evaluate_predictions([predictions / "out"], tmp_path / "truth.csv", domain_axis="scanner")
    assert set(ev.table()["domains"]) == {"s1", "s2"}
    # a stricter threshold than the prediction's own changes nothing for a confident model
    assert evaluate_predictions([predictions / "out" / "rect"], tmp_path / "rect_mask.png", threshold=0.9).images[0].dice == \
        pytest.approx(2 / 3)


def test_evaluate_predictions_errors(cli, predictions, tmp_path):
    unfinished = tmp_path / "preds" / "half"
    (unfinished / "prob.zarr").mkdir(parents=True)
    r = cli("evaluate", tmp_path / "preds", predictions / "out" / "rect", "--truth", tmp_path / "nothing-here")
    assert r.exit_code == 1 and "not found" in r.output
    (tmp_path / "truth").mkdir()
    r = cli("evaluate", tmp_path / "preds", predictions / "out" / "rect", "--truth", tmp_path / "truth", "--json")
    assert r.exit_code == 1
    assert "unfinished prediction" in r.stderr and "no ground truth named after rect" in r.stderr
    r = cli("evaluate", predictions / "out")
    assert r.exit_code == 2 and "--truth" in r.output


@pytest.mark.parametrize("option", [("--label", "tumor=1"), ("--objects", "annotation,detection")])
def test_evaluate_with_a_checkpoint_refuses_the_options_of_predictions(cli, stores, tmp_path, option):
    """--label / --objects say how to read annotations; with a checkpoint the stores' masks are the
    truth, so they were parsed and silently ignored before (issue 32 §1)."""
    ck = tiny_checkpoint(tmp_path / "all.pt", mpp=1.0, head_logit=10.0)
    r = cli("evaluate", ck, stores, *option)
    assert r.exit_code == 2 and f"{option[0]}: for scoring predictions" in r.output
    assert cli("evaluate", ck, stores, "--json").exit_code == 0  # the defaults alone are no choice


@pytest.mark.parametrize("option", [("--tta", "none"), ("--batch-size", "4"), ("--device", "cpu"), ("--adapt", "bn")])
def test_evaluate_on_predictions_refuses_the_options_of_a_checkpoint_run(cli, predictions, option):
    r = cli("evaluate", predictions / "out", "--truth", predictions / "truth", *option)
    assert r.exit_code == 2 and f"{option[0]}: for a checkpoint run on stores" in r.output


def test_a_damaged_probability_map_is_one_line_and_the_rest_is_scored(cli, predictions, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(predictions / "out", out)
    truth = tmp_path / "truth"
    truth.mkdir()
    for name in ("rect", "blank"):
        (truth / f"{name}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [_rectangle(64, 64, 192, 160)]}))
    chunks = sorted(p for p in (out / "rect" / "prob.zarr").rglob("*") if p.is_file() and p.name != "zarr.json")
    assert chunks
    chunks[0].write_bytes(b"\x00" * 7)  # a chunk that no codec can decode
    r = cli("evaluate", out, "--truth", truth, "--json")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"error: {out / 'rect' / 'prob.zarr'}: damaged: the region at (0, 0) cannot be read" in r.stderr
    assert [x["name"] for x in json.loads(r.stdout)["images"]] == ["blank"]
