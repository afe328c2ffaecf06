"""The domain-shift score (`model.shift`): training domains described in the checkpoint, each
predicted slide scored against them, calibrated on the training slides, warned about."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import feature_moments, tiny_checkpoint
from histodg.inference import PredictOptions, Predictor, ReadOptions, predict_slide
from histodg.model.checkpoint import load_checkpoint, save_checkpoint
from histodg.model.shift import FeatureMeter, Moments, divergence, fit_reference, slide_shift
from histodg.slides.inputs import SlideJob
from histodg.summary import read_rows
from histodg.training.augment import stain_jitter

NO_QC = ReadOptions(qc="off")  # these tests measure the shift score alone, on every window

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TILE, MPP = 64, 1.0


def _patches(rgb: np.ndarray, step: int = TILE) -> np.ndarray:
    h, w = rgb.shape[:2]
    out = [rgb[y:y + TILE, x:x + TILE] for y in range(0, h - TILE + 1, step) for x in range(0, w - TILE + 1, step)]
    return np.stack([p for p in out if (p.mean(-1) < 200).mean() > 0.5])  # tissue patches


def _moments(model, normalizer, patches: np.ndarray) -> Moments:
    return feature_moments(model, normalizer, patches)


@pytest.fixture(scope="module")
def he(data_dir) -> np.ndarray:
    with Image.open(data_dir / "he_carcinoma_1000.png") as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, he):
    """A tiny checkpoint whose training domains are the real H&E image's halves, a quarter a slide."""
    path = tiny_checkpoint(tmp_path_factory.mktemp("ck") / "ck.pt", mpp=MPP, tile=TILE, seed=2)
    pred = Predictor.from_checkpoint(path, PredictOptions(device="cpu"))
    q = {"top": he[:500], "bottom": he[500:]}
    per = {d: {f"{d}-{k}": _moments(pred.model, pred.normalizer, _patches(half[:, k * 500:(k + 1) * 500]))
               for k in (0, 1)} for d, half in q.items()}
    ck = load_checkpoint(path)
    ck["model_config"]["shift"] = fit_reference(per)
    save_checkpoint(path, ck)
    return path


def _slide(tmp_path, name: str, rgb: np.ndarray) -> SlideJob:
    Image.fromarray(np.ascontiguousarray(rgb)).save(tmp_path / f"{name}.png")
    return SlideJob(tmp_path / f"{name}.png", name, mpp=MPP)


def _restained(rgb: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float()
    y = stain_jitter(x, torch.tensor([[1.5, 0.6, 1.0]]), torch.tensor([[0.05, -0.05, 0.0]]), None)
    return y[0].permute(1, 2, 0).clamp(0, 255).round().byte().numpy()


def test_divergence_is_zero_on_itself_and_grows_with_the_gap():
    rng = np.random.default_rng(0)
    mean, var = [rng.normal(size=8)], [rng.uniform(0.5, 2, 8)]
    assert divergence(mean, var, mean, var) == pytest.approx(0.0, abs=1e-12)
    gaps = [divergence([mean[0] + d], var, mean, var) for d in (0.1, 0.5, 1.0)]
    assert 0 < gaps[0] < gaps[1] < gaps[2]
    assert divergence(mean, [var[0] * 4], mean, var) == pytest.approx(divergence(mean, var, mean, [var[0] * 4]))


def test_the_reference_pools_domains_and_calibrates_each_slide_left_out(checkpoint):
    ref = load_checkpoint(checkpoint)["model_config"]["shift"]
    assert set(ref["domains"]) == {"top", "bottom"} and all(d["slides"] == 2 for d in ref["domains"].values())
    assert [len(m) for m in ref["domains"]["top"]["mean"]] == [64, 64, 128, 256, 512]  # resnet18's stages
    assert len(ref["calibration"]) == 4 and ref["calibration"] == sorted(ref["calibration"]) and ref["calibration"][0] > 0


@pytest.mark.slow
def test_a_restained_or_rescaled_slide_scores_higher_and_a_flipped_one_the_same(tmp_path, checkpoint, he):
    pred = Predictor.from_checkpoint(checkpoint, PredictOptions(device="cpu", batch_size=8, read=NO_QC, tta="flip"))
    crop = he[:512, :512]
    small = np.asarray(Image.fromarray(he[:1000, :1000]).resize((512, 512), Image.BILINEAR))  # about half the resolution
    variants = {"plain": crop, "flipped": crop[::-1, ::-1], "restained": _restained(crop), "rescaled": small}
    shift = {}
    for name, rgb in variants.items():
        r = predict_slide(pred, _slide(tmp_path, name, rgb), tmp_path / "out")
        assert r.status == "done", r.error
        shift[name] = r.shift
        assert json.loads((tmp_path / "out" / name / "done.json").read_text())["shift"] == r.shift
    assert shift["plain"]["windows"] > 30 and shift["plain"]["calibration_slides"] == 4
    assert not shift["plain"]["warn"] and shift["plain"]["nearest"] == "top"  # the crop is the top-left quarter
    assert shift["flipped"]["score"] == pytest.approx(shift["plain"]["score"], rel=1e-2)  # --tta flip measures every flip
    assert shift["restained"]["score"] > 3 * shift["plain"]["score"]
    assert shift["rescaled"]["score"] > 1.5 * shift["plain"]["score"]


@pytest.mark.slow
def test_predict_warns_per_slide_and_the_summary_and_report_carry_the_score(tmp_path, checkpoint, he, cli):
    crop = he[:384, :384]
    blue = np.clip(crop.astype(np.float32) * (0.6, 0.7, 1.0), 0, 255).astype(np.uint8)  # a scanner with a strong blue cast
    plain, foreign = _slide(tmp_path, "plain", crop), _slide(tmp_path, "foreign", blue)
    r = cli("predict", checkpoint, plain.path, foreign.path, "-o", tmp_path / "out", "--device", "cpu", "--mpp-override", MPP,
            "--qc", "off")
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in read_rows(tmp_path / "out")}
    assert rows["foreign"]["shift_warn"] is True and rows["plain"]["shift_warn"] is False
    assert rows["foreign"]["shift_score"] > 1 > rows["plain"]["shift_score"]
    assert rows["foreign"]["shift_nearest"] in ("top", "bottom") and 0 <= rows["plain"]["shift_percentile"] <= 100
    warned = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "foreign: domain shift" in warned[0] and "nearest training domain" in warned[0], r.output
    header = next(line for line in r.output.splitlines() if "input" in line and "status" in line)
    assert "shift" in header, r.output  # a column of the summary table
    assert "shift_score" in (tmp_path / "out" / "summary.csv").read_text().splitlines()[0]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "domain shift" in html and html.count('class="n warn"') == 1
    # a rerun skips both slides and still reports their scores (from done.json)
    again = cli("predict", checkpoint, plain.path, foreign.path, "-o", tmp_path / "out", "--device", "cpu",
                "--mpp-override", MPP, "--qc", "off", "--json")
    got = {x["name"]: x for x in json.loads(again.stdout)}
    assert {x["status"] for x in got.values()} == {"skipped"}
    assert got["foreign"]["shift"]["score"] == rows["foreign"]["shift_score"] and got["foreign"]["shift"]["warn"]


def test_no_reference_no_score(tmp_path, he):
    pred = Predictor.from_checkpoint(tiny_checkpoint(tmp_path / "old.pt", mpp=MPP, tile=TILE),
                                     PredictOptions(device="cpu", read=NO_QC))
    r = predict_slide(pred, _slide(tmp_path, "s", he[:256, :256]), tmp_path / "out")
    assert r.status == "done" and r.shift is None and pred.meter is None
    assert json.loads((tmp_path / "out" / "s" / "done.json").read_text())["shift"] is None


@pytest.mark.slow
def test_adapt_bn_scores_the_unadapted_model(tmp_path, checkpoint, he):
    """With --adapt bn the score comes from the adaptation windows through the checkpoint's
    statistics: on a slide whose every tissue window adapts, the same as without --adapt, with
    --tta flip (every flip measured, the default) as without."""
    job = _slide(tmp_path, "s", _restained(he[:256, :256]))
    got = {}
    for tta in ("flip", "none"):
        for adapt in ("none", "bn"):
            pred = Predictor.from_checkpoint(checkpoint, PredictOptions(device="cpu", adapt=adapt, batch_size=8, read=NO_QC,
                                                                        tta=tta))
            r = predict_slide(pred, job, tmp_path / tta / adapt)
            assert r.status == "done", r.error
            got[tta, adapt] = r.shift
        assert got[tta, "bn"]["windows"] == got[tta, "none"]["windows"] <= 64
        assert got[tta, "bn"]["raw"] == pytest.approx(got[tta, "none"]["raw"], rel=1e-3)
    assert got["flip", "none"]["raw"] != pytest.approx(got["none", "none"]["raw"], rel=1e-3)  # the flips were measured


def test_slide_shift_without_calibration_reports_raw_only():
    m = Moments([10.0], [np.ones(4)], [np.full(4, 2.0)])
    ref = fit_reference({"only": {"a": m}})
    assert ref["calibration"] == []  # one slide of one domain: nothing to leave it out against
    out = slide_shift(ref, m, 3)
    assert out["score"] is None and out["warn"] is False and out["raw"] == pytest.approx(0.0, abs=1e-9)


def _store(path, patches: np.ndarray):
    from histodg.store import StoreAttrs, StoreWriter

    attrs = StoreAttrs(tile_size=TILE, mpp=MPP, labels={"0": "background", "1": "tumor"})
    w = StoreWriter(path, attrs, len(patches), True).create()
    for i, p in enumerate(patches):
        w.append(w.encode(p, np.zeros((TILE, TILE), np.uint8)), (i * TILE, 0), 1.0, plan_done=i + 1)
    w.finish()
    return path


def test_evaluate_on_stores_reports_each_stores_shift_score(tmp_path, checkpoint, he, cli):
    plain = _patches(he[:500, :500])  # the patches of a training slide (the top-left quarter)
    blue = np.clip(plain.astype(np.float32) * (0.6, 0.7, 1.0), 0, 255).astype(np.uint8)  # a scanner with a blue cast
    a, b = _store(tmp_path / "plain.zarr", plain), _store(tmp_path / "foreign.zarr", blue)
    r = cli("evaluate", checkpoint, a, b, "--device", "cpu", "--tta", "none", "--batch-size", "5", "--json")
    assert r.exit_code == 0, r.output
    got = {x["name"]: x["shift"] for x in json.loads(r.stdout)["images"]}
    assert got["foreign"]["warn"] and got["foreign"]["score"] > 1 > got["plain"]["score"] and not got["plain"]["warn"]
    assert got["plain"]["nearest"] == "top" and got["plain"]["windows"] == len(plain)
    # the score of exactly the store's patches through the checkpoint (no batch padding counted)
    pred = Predictor.from_checkpoint(checkpoint, PredictOptions(device="cpu"))
    expected = slide_shift(load_checkpoint(checkpoint)["model_config"]["shift"], _moments(pred.model, pred.normalizer, plain),
                           len(plain))
    assert got["plain"]["raw"] == pytest.approx(expected["raw"], rel=1e-4)
    table = cli("evaluate", checkpoint, a, b, "--device", "cpu", "--tta", "none")  # the rich tables: a column, one warning
    assert table.exit_code == 0, table.output
    warned = [line for line in table.output.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "foreign: domain shift" in warned[0], table.output
    assert "shift" in next(line for line in table.output.splitlines() if "Dice" in line and "IoU" in line)


def test_the_meter_says_who_measures_through_its_contexts_and_a_slide_ends_them():
    import segmentation_models_pytorch as smp

    model = smp.Unet("resnet18", encoder_weights=None, classes=1).eval()
    meter, x = FeatureMeter(model), torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        with meter.one_slide():
            model(x)
            with meter.flip(first=False):  # a flipped copy: measured, its images not counted again
                model(x.flip(3))
            assert meter.images == 2
            meter.measured_apart()  # an adapter measured the unadapted model itself
            model(x)
            with meter.measuring():
                model(x)
            assert meter.images == 4  # the adapted pass was not measured, the adapter's own was
            first = meter.take()
        assert meter.active and meter.counting  # the next slide starts measuring again
        with meter.one_slide():
            model(x)
            assert meter.images == 2 and meter.take().count[0] == first.count[0] / 3  # 1 pass of 3 measured
    meter.remove()
