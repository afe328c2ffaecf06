"""`predict --runtime onnx`: onnxruntime runs the network and gives torch's outputs, for every
BatchNorm route a slide can take (a DSBN slot, the shared slot adapted to the slide, tent), with the
domain-shift score measured the same; `auto` picks it for large slides only; where it cannot run,
one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from helpers import feature_moments
from histodg.inference import PredictOptions, Predictor, predict_slide
from histodg.inference.predictor import PredictError
from histodg.model.build import build_model
from histodg.model.checkpoint import load_checkpoint, save_checkpoint
from histodg.model.config import ModelConfig
from histodg.model.domain_bn import convert, domain, domain_layers, sync_shared
from histodg.model.shift import fit_reference
from histodg.slides.inputs import SlideJob

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TILE, MPP = 64, 1.0


@pytest.fixture(scope="module")
def he(data_dir) -> np.ndarray:
    with Image.open(data_dir / "he_carcinoma_1000.png") as im:
        return np.asarray(im.convert("RGB"))


def _moments(model, normalizer, rgb: np.ndarray):
    patches = np.stack([rgb[y:y + TILE, x:x + TILE] for y in range(0, 256, TILE) for x in range(0, 256, TILE)])
    return feature_moments(model, normalizer, patches)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, he):
    """A DSBN checkpoint (slots s1, s2 with statistics of their own) with a domain-shift reference."""
    path = tmp_path_factory.mktemp("ck") / "dsbn.pt"
    torch.manual_seed(3)
    model = build_model("unet", "resnet18", "none", 1)
    convert(model, 2)
    with torch.no_grad():
        for layer in domain_layers(model):
            layer.domain_mean.normal_(0, 0.2)
            layer.domain_var.uniform_(0.5, 2.0)
            layer.domain_weight.normal_(1, 0.2)
        sync_shared(model)
    config = ModelConfig(arch="unet", encoder="resnet18", mpp=MPP, tile_size=TILE, method="dsbn", domain_bn=["s1", "s2"])
    save_checkpoint(path, {"model_state": model.state_dict(), "model_config": config})
    pred = Predictor.from_checkpoint(path, PredictOptions(device="cpu", runtime="torch"))
    per = {}
    for k, (name, rgb) in enumerate((("s1", he[:256, :256]), ("s2", he[500:756, 500:756]))):
        with domain(pred.model, k):
            per[name] = {name: _moments(pred.model, pred.normalizer, rgb)}
    ck = load_checkpoint(path)
    ck["model_config"]["shift"] = fit_reference(per)
    save_checkpoint(path, ck)
    return path


def _slide(tmp_path, name: str, rgb: np.ndarray, scanner: str) -> SlideJob:
    Image.fromarray(np.ascontiguousarray(rgb)).save(tmp_path / f"{name}.png")
    return SlideJob(tmp_path / f"{name}.png", name, mpp=MPP, scanner=scanner)


def _predict(pred, jobs, out) -> dict:
    got = {}
    for job in jobs:
        r = predict_slide(pred, job, out)
        assert r.status == "done", r.error
        done = json.loads((out / job.name / "done.json").read_text())
        got[job.name] = (zarr.open_array(str(out / job.name / "prob.zarr"), mode="r")[:].astype(int), r.shift, done)
    return got


@pytest.mark.slow
@pytest.mark.parametrize("adapt", ["none", "tent"])
def test_onnx_gives_torchs_outputs_through_every_batchnorm_route(checkpoint, he, tmp_path, monkeypatch, adapt):
    """A known scanner (its DSBN slot), an unknown one (the shared slot re-estimated on the slide), tent
    (BatchNorm weights stepped on the slide): the same probabilities and shift score as torch; auto
    takes onnx for the large slide and torch for the small one."""
    from histodg.inference import predictor

    monkeypatch.setattr(predictor, "AUTO_ONNX_WINDOWS", 20)
    jobs = [_slide(tmp_path, "known", he[200:392, 300:492], "s2"), _slide(tmp_path, "unknown", he[500:692, 100:292], "new"),
            _slide(tmp_path, "small", he[:128, :128], "s1")]  # 25, 25 and 9 windows
    ref = _predict(Predictor.from_checkpoint(checkpoint, PredictOptions(device="cpu", runtime="torch", adapt=adapt)), jobs,
                   tmp_path / "torch")
    got = _predict(Predictor.from_checkpoint(checkpoint, PredictOptions(device="cpu", runtime="auto", adapt=adapt)), jobs,
                   tmp_path / "auto")
    runtimes = {name: got[name][2]["settings"]["runtime"] for name in got}
    assert runtimes == {"known": "onnx", "unknown": "onnx", "small": "torch"}
    assert {ref[name][2]["settings"]["runtime"] for name in ref} == {"torch"}
    for name in ("known", "unknown"):
        (a, shift_a, done_a), (b, shift_b, done_b) = ref[name], got[name]
        assert done_a["adaptation"] == done_b["adaptation"]
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 2e-3  # float32 rounding, at a grey level's edge
        assert shift_b["raw"] == pytest.approx(shift_a["raw"], rel=1e-4) and shift_b["windows"] == shift_a["windows"]
    assert "dsbn: the BatchNorm of s2" in got["known"][2]["adaptation"] or adapt == "tent"


def test_onnx_probabilities_follow_the_torch_models_batchnorm(checkpoint, he):
    """Probabilities within 1e-5 of torch's: the shared slot, each DSBN slot, and statistics changed in place."""
    pred = Predictor.from_checkpoint(checkpoint, PredictOptions(device="cpu", runtime="onnx", tta="none"))
    batch = torch.from_numpy(np.stack([he[y:y + TILE, x:x + TILE] for y, x in ((0, 0), (300, 200), (640, 640))]))

    def both():
        with pred.runtime_for(len(batch)) as name:
            onnx = pred.probabilities(batch)
        assert name == "onnx"
        return pred.probabilities(batch), onnx

    outputs = []
    for route in (None, 0, 1):
        with domain(pred.model, route) if route is not None else torch.no_grad():
            outputs.append(both())
    layer = domain_layers(pred.model)[0]
    with torch.no_grad():
        layer.running_mean.add_(0.5)  # as an adaptation would: in place
    outputs.append(both())
    for torch_p, onnx_p in outputs:
        torch.testing.assert_close(onnx_p, torch_p, rtol=0, atol=1e-5)
    assert all(not torch.allclose(outputs[0][0], o[0], atol=1e-3) for o in outputs[1:])  # every route changed the output


def test_where_onnx_cannot_run_it_is_one_line(checkpoint, cli, tmp_path, monkeypatch):
    with pytest.raises(PredictError, match="--runtime onnx: onnxruntime runs here on the CPU in float32"):
        Predictor.from_checkpoint(checkpoint, PredictOptions(device="cpu", runtime="onnx", amp="on"))
    from histodg.inference import onnx_net

    monkeypatch.setattr(onnx_net, "available", lambda: "onnxruntime is not installed (onnxruntime)")
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "a.png")
    r = cli("predict", checkpoint, tmp_path / "a.png", "-o", tmp_path / "out", "--runtime", "onnx")
    assert r.exit_code == 1 and r.stderr.strip().splitlines() == [
        f"error: {checkpoint}: --runtime onnx: onnxruntime is not installed (onnxruntime); use --runtime torch"]
    pred = Predictor.from_checkpoint(checkpoint, PredictOptions(device="cpu"))  # auto: torch, whatever the slide
    with pred.runtime_for(10**6) as name:
        assert name == "torch" and pred.onnx is None


def test_evaluate_on_stores_takes_onnx_for_all_the_patches_together_and_scores_the_same(checkpoint, cli, tmp_path,
                                                                                           monkeypatch):
    from helpers import make_store
    from histodg.evaluation.stores import evaluate_stores
    from histodg.inference import predictor

    stores = [make_store(tmp_path / f"{name}.zarr", n=12, scanner=scanner, seed=k, tint=(30 * k, -10 * k, 0))
              for k, (name, scanner) in enumerate((("a", "s1"), ("b", "s2"), ("c", "new")))]
    monkeypatch.setattr(predictor, "AUTO_ONNX_WINDOWS", 30)  # 36 patches in all, 12 a store
    scores = {}
    for runtime in ("torch", "auto"):
        pred = Predictor.from_checkpoint(checkpoint, PredictOptions(device="cpu", runtime=runtime, tta="none"))
        ev = evaluate_stores(pred, stores)
        assert not ev.errors and (pred.onnx is not None) == (runtime == "auto")
        scores[runtime] = {s.name: s for s in ev.images}
    assert len(scores["torch"]) == 3
    for name, s in scores["torch"].items():
        assert scores["auto"][name].dice == pytest.approx(s.dice, abs=2e-3), name
        assert scores["auto"][name].shift["raw"] == pytest.approx(s.shift["raw"], rel=1e-4), name
    r = cli("evaluate", tmp_path / "a.zarr", "--runtime", "onnx")  # a predictions folder: the option is the checkpoint's
    assert r.exit_code == 2 and "--runtime" in r.output
