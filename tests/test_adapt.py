"""`--adapt bn`: BatchNorm statistics re-estimated on each slide, the checkpoint's put back after."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from helpers import make_store, tiny_checkpoint, tissue_field
from histodg.constants import ADAPT_MODES
from histodg.inference import PredictError, PredictOptions, Predictor, predict_slide
from histodg.inference.adapt import ADAPTERS, adapted_batchnorm
from histodg.model.batchnorm import batchnorm_layers
from histodg.slides.inputs import SlideJob

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def two_slides(tmp_path):
    """The same field twice: as scanned, and darker and bluer (another scanner)."""
    rgb = tissue_field(200, 260, seed=3)
    shifted = np.clip(rgb.astype(np.float32) * (0.8, 0.85, 1.0) - (10, 10, 0), 0, 255).astype(np.uint8)
    paths = []
    for name, img in (("plain", rgb), ("shifted", shifted)):
        Image.fromarray(img).save(tmp_path / f"{name}.png")
        paths.append(SlideJob(tmp_path / f"{name}.png", name, mpp=4.0))
    return paths


def test_the_statistics_are_the_batches_and_the_checkpoints_come_back(tmp_path):
    pred = Predictor.from_checkpoint(tiny_checkpoint(tmp_path / "ck.pt"), PredictOptions(device="cpu", adapt="bn"))
    before = {k: v.clone() for k, v in pred.model.state_dict().items()}
    batch = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8)
    first = batchnorm_layers(pred.model)[0]  # the stem's BatchNorm sees the normalised image through conv1
    with adapted_batchnorm(pred, [batch[:4], batch[4:]]) as n:
        assert n == len(batchnorm_layers(pred.model)) > 10
        with torch.no_grad():
            x = pred.normalizer(batch.permute(0, 3, 1, 2))
            feats = pred.model.encoder.conv1(x)
        np.testing.assert_allclose(first.running_mean.numpy(), feats.mean((0, 2, 3)).numpy(), rtol=1e-4, atol=1e-5)
        assert not torch.equal(first.running_mean, before["encoder.bn1.running_mean"])
    after = pred.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # every weight and buffer as in the checkpoint


def _predict_in_order(ck, jobs, out, adapt: str) -> dict:
    """Predict `jobs` in this order with one Predictor; each slide's prob.zarr."""
    pred = Predictor.from_checkpoint(ck, PredictOptions(device="cpu", adapt=adapt, batch_size=4, tta="none"))
    for job in jobs:
        r = predict_slide(pred, job, out)
        assert r.status == "done", r.error
    return {j.name: zarr.open_array(str(out / j.name / "prob.zarr"), mode="r")[:] for j in jobs}


@pytest.mark.slow
def test_slides_adapt_alone_whatever_the_order(tmp_path, two_slides):
    ck = tiny_checkpoint(tmp_path / "ck.pt", seed=1)
    a, b = _predict_in_order(ck, two_slides, tmp_path / "ab", "bn"), _predict_in_order(ck, two_slides[::-1], tmp_path / "ba", "bn")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    plain = _predict_in_order(ck, two_slides, tmp_path / "none", "none")
    assert np.abs(a["shifted"].astype(int) - plain["shifted"].astype(int)).max() > 5  # the statistics did change it
    done = json.loads((tmp_path / "ab" / "shifted" / "done.json").read_text())
    assert done["adaptation"].startswith("bn: statistics of") and done["settings"]["adapt"] == "bn"
    assert "adaptation" in done["timings"]  # the adapter's note says it estimated statistics: its time is timed
    assert "adaptation" not in json.loads((tmp_path / "none" / "shifted" / "done.json").read_text())["timings"]


def test_every_adapt_mode_but_none_has_a_test_time_adapter():
    assert ADAPT_MODES == ("none", *ADAPTERS)


def test_a_rerun_with_another_adapt_is_refused(tmp_path, two_slides):
    ck = tiny_checkpoint(tmp_path / "ck.pt")
    job = two_slides[0]
    assert predict_slide(Predictor.from_checkpoint(ck, PredictOptions(device="cpu", adapt="bn")), job, tmp_path).status == "done"
    r = predict_slide(Predictor.from_checkpoint(ck, PredictOptions(device="cpu")), job, tmp_path)
    assert r.status == "failed" and "adapt 'bn' -> 'none'" in r.error


def test_a_model_without_batchnorm_is_refused_with_one_line(tmp_path, cli):
    from histodg.model.build import build_model
    from histodg.model.checkpoint import save_checkpoint
    from histodg.model.config import ModelConfig

    model = build_model("fpn", "mit_b0", "none", 1)  # LayerNorm encoder, GroupNorm decoder
    assert not batchnorm_layers(model)
    ck = tmp_path / "mit.pt"
    save_checkpoint(ck, {"model_state": model.state_dict(), "model_config": ModelConfig(arch="fpn", encoder="mit_b0", mpp=4.0,
                                                                                         tile_size=64)})
    for adapt in ("bn", "tent"):
        with pytest.raises(PredictError, match=f"--adapt {adapt}: this model .* has no BatchNorm layers"):
            Predictor.from_checkpoint(ck, PredictOptions(device="cpu", adapt=adapt))
    store = make_store(tmp_path / "s.zarr", n=4, size=64, mpp=4.0)
    r = cli("evaluate", ck, store, "--adapt", "bn")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and "no BatchNorm layers" in r.stderr


def test_evaluate_adapts_per_store(tmp_path, cli):
    ck = tiny_checkpoint(tmp_path / "ck.pt", mpp=1.0, seed=2)
    store = make_store(tmp_path / "s.zarr", n=16, size=64, mpp=1.0, tint=(40, -20, 0))
    res = {}
    for adapt in ("none", "bn"):
        r = cli("evaluate", ck, store, "--adapt", adapt, "--json")
        assert r.exit_code == 0, r.output
        res[adapt] = json.loads(r.stdout)["images"][0]
    assert res["none"]["predicted_px"] != res["bn"]["predicted_px"]


def test_tent_lowers_the_entropy_on_the_slide_and_puts_every_weight_back(tmp_path):
    from histodg.inference.adapt import window_batches
    from histodg.inference.tent import TENT_STEPS, adapted_tent, mean_entropy

    pred = Predictor.from_checkpoint(tiny_checkpoint(tmp_path / "ck.pt", mpp=1.0, seed=2), PredictOptions(device="cpu", adapt="tent"))
    before = {k: v.clone() for k, v in pred.model.state_dict().items()}
    rgb = tissue_field(128, 256, seed=5)
    batches = list(window_batches(lambda i: rgb[:, i * 32:i * 32 + 64], np.arange(7), 4))

    def entropy():
        with torch.no_grad():
            return float(np.mean([mean_entropy(pred.model(pred.normalizer(b.permute(0, 3, 1, 2))), 1) for b in batches]))

    with adapted_batchnorm(pred, batches):
        after_bn = entropy()
    with adapted_tent(pred, batches) as losses:
        after_tent = entropy()
        bn_weight = batchnorm_layers(pred.model)[0].weight.detach().clone()
    assert len(losses) == TENT_STEPS and losses[-1] < losses[0]
    assert after_tent < after_bn  # the steps lowered the entropy on the slide's windows
    assert not torch.equal(bn_weight, before["encoder.bn1.weight"])  # by moving the BatchNorm weights
    after = pred.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # and every weight and buffer came back
    assert all(p.grad is None for p in pred.model.parameters())
    with adapted_tent(pred, batches) as again:
        assert again == losses  # deterministic: the same slide, the same steps


@pytest.mark.slow
def test_predict_with_tent_records_it_and_slides_stay_independent(tmp_path, two_slides):
    ck = tiny_checkpoint(tmp_path / "ck.pt", seed=1)
    a = _predict_in_order(ck, two_slides, tmp_path / "ab", "tent")
    b = _predict_in_order(ck, two_slides[::-1], tmp_path / "ba", "tent")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    done = json.loads((tmp_path / "ab" / "shifted" / "done.json").read_text())
    assert done["adaptation"].startswith("tent: statistics of") and "10 entropy steps" in done["adaptation"]
    assert done["settings"]["adapt"] == "tent"
