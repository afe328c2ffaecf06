"""`histodg adapt`: a model fitted to an unlabelled target domain (global re-styling, masked local
feature alignment, target BatchNorm statistics), written as an ordinary checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_store, stem_input, tissue_field
from histodg.adaptation.align import masked_alignment
from histodg.adaptation.batchnorm import reestimate_batchnorm
from histodg.adaptation.config import AdaptConfig
from histodg.adaptation.runner import Patches, adapt
from histodg.adaptation.styles import fda
from histodg.inference import PredictOptions, Predictor, predict_slide
from histodg.model.build import build_model
from histodg.model.checkpoint import load_checkpoint, save_checkpoint
from histodg.model.config import ModelConfig
from histodg.model.normalize import Normalizer
from histodg.slides.inputs import SlideJob
from histodg.store import open_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TARGET_TINT = (-45, -55, 25)  # darker, bluer: another scanner


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Source stores (labelled, scanner s1), target stores (no masks, scanner s9), and a tiny
    checkpoint whose BatchNorm statistics are the source's."""
    root = tmp_path_factory.mktemp("uda")
    for k in range(2):
        make_store(root / "source" / f"s1-{k}.zarr", 16, scanner="s1", seed=k)
        make_store(root / "target" / f"s9-{k}.zarr", 16, scanner="s9", seed=10 + k, tint=TARGET_TINT, masks=False)
    torch.manual_seed(0)
    model = build_model("unet", "resnet18", "none", 1)
    mc = ModelConfig(arch="unet", encoder="resnet18", mpp=1.0, tile_size=64)
    norm = Normalizer(mc.normalization.mean, mc.normalization.std, "cpu")
    reestimate_batchnorm(model, norm, Patches([open_store(p) for p in sorted((root / "source").glob("*.zarr"))], False),
                         32, 8, "cpu")
    save_checkpoint(root / "ck.pt", {"model_state": model.state_dict(), "model_config": mc})
    return root


def _run(data, out, **hp):
    return adapt(AdaptConfig(checkpoint=str(data / "ck.pt"), source=(str(data / "source"),), target=(str(data / "target"),),
                             out_dir=str(out), hparams=hp, steps=6, batch_size=4, lr=1e-4, device="cpu"))


def test_fda_swaps_the_low_frequencies_and_keeps_the_rest():
    rng = np.random.default_rng(0)
    src = torch.from_numpy(rng.uniform(0, 255, (2, 3, 32, 32))).float()
    tgt = src * 0.5 + 60  # another brightness and contrast: its mean (the lowest frequency) differs
    out = fda(src, tgt, beta=0.1)
    torch.testing.assert_close(out.mean((2, 3)), tgt.mean((2, 3)), rtol=0, atol=0.5)  # the target's mean colour
    assert (out - src).abs().mean() < (tgt - src).abs().mean()  # the source's content


def test_the_alignment_acts_on_the_channels_with_the_largest_gap():
    torch.manual_seed(0)
    fs = torch.randn(4, 8, 6, 6, requires_grad=True)
    ft = torch.randn(4, 8, 6, 6)
    ft[:, 2] += 3.0  # channel 2: a large gap
    loss, gaps = masked_alignment([fs], [ft], mask_ratio=0.125)  # one channel of eight
    loss.backward()
    g = fs.grad.abs().sum((0, 2, 3))
    assert g[2] > 0 and float(g.sum() - g[2]) == 0.0 and gaps[0] > 0


@pytest.mark.slow
def test_adapt_moves_batchnorm_toward_the_target_and_writes_a_checkpoint_predict_loads(data, tmp_path):
    full = _run(data, tmp_path / "full")
    gap = full["target_bn_gap"]
    assert gap["after"] < 0.2 * gap["before"]  # the statistics are now (close to) the target's
    ck = load_checkpoint(tmp_path / "full" / "best.pt")
    mc = ck["model_config"]
    assert mc["adaptation"]["target_domain"] == "s9" and mc["adaptation"]["settings"]["global"] is True
    assert set(mc["shift"]["domains"]) == {"s1", "s9"}
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(r["local_loss"] > 0 for r in lines)
    # without the final re-estimation the two parts still move the statistics toward the target's;
    # with both parts off (source fine-tuning only) they stay where they were
    parts = _run(data, tmp_path / "parts", bn=False)["target_bn_gap"]
    off = _run(data, tmp_path / "off", bn=False, **{"global": False, "local": False})["target_bn_gap"]
    assert parts["after"] < 0.9 * parts["before"]
    assert off["after"] > 0.95 * off["before"] and parts["after"] < off["after"]
    Image.fromarray(tissue_field(160, 200, seed=2)).save(tmp_path / "slide.png")
    pred = Predictor.from_checkpoint(tmp_path / "full" / "best.pt", PredictOptions(device="cpu"))
    r = predict_slide(pred, SlideJob(tmp_path / "slide.png", "slide", mpp=1.0), tmp_path / "pred")
    assert r.status == "done" and json.loads((tmp_path / "pred" / "slide" / "done.json").read_text())["shift"]


@pytest.mark.slow
def test_cli_adapt_tiles_slide_targets_and_refuses_a_finished_run(data, tmp_path, cli):
    Image.fromarray(np.clip(tissue_field(200, 260, seed=4).astype(int) + TARGET_TINT, 0, 255).astype(np.uint8)).save(
        tmp_path / "new.png")
    args = ["adapt", str(data / "ck.pt"), "--source", str(data / "source"), "--target", str(tmp_path / "new.png"),
            "--mpp-override", "1.0", "-o", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--device", "cpu",
            "--hp", "style=fda", "--hp", "local=false"]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "target" / "new.zarr").is_dir() and (tmp_path / "run" / "best.pt").is_file()
    again = cli(*args)
    assert again.exit_code == 1 and "--overwrite" in again.output and "Traceback" not in again.output
    bad = cli(*args[:-4], "--hp", "style=sepia", "--overwrite")
    assert bad.exit_code == 2 and "style=sepia" in bad.output


@pytest.mark.slow
def test_adapting_a_dsbn_model_trains_and_reestimates_each_source_domains_own_batchnorm(tmp_path):
    """A DSBN checkpoint (the default method): each source patch goes through its domain's slot
    while adapting, and at the end each slot's statistics are its own source patches' under the
    adapted weights, the shared slot's the target's. Before, the source went through the shared
    slot and the slots kept statistics of the weights before adaptation."""
    from histodg.model import domain_bn

    for k in range(2):
        make_store(tmp_path / "source" / f"s1-{k}.zarr", 16, scanner="s1", seed=k)
        make_store(tmp_path / "source" / f"s2-{k}.zarr", 16, scanner="s2", seed=20 + k, tint=(30, -20, -30))
        make_store(tmp_path / "target" / f"s9-{k}.zarr", 16, scanner="s9", seed=10 + k, tint=TARGET_TINT, masks=False)
    torch.manual_seed(0)
    model = build_model("unet", "resnet18", "none", 1)
    mc = ModelConfig(arch="unet", encoder="resnet18", mpp=1.0, tile_size=64, domain_bn=["s1", "s2"])
    norm = Normalizer(mc.normalization.mean, mc.normalization.std, "cpu")
    domain_bn.convert(model, 2)
    stores = {d: Patches([open_store(p) for p in sorted((tmp_path / "source").glob(f"{d}-*.zarr"))], True) for d in ("s1", "s2")}
    for k, d in enumerate(("s1", "s2")):
        x = torch.from_numpy(stores[d].get(stores[d].spread(32))[0]).permute(0, 3, 1, 2)
        domain_bn.estimate_slot(model, k, [norm(x[a:a + 8]) for a in range(0, 32, 8)])
    domain_bn.sync_shared(model)
    save_checkpoint(tmp_path / "ck.pt", {"model_state": model.state_dict(), "model_config": mc})
    before = {k: v.clone() for k, v in model.state_dict().items()}

    adapt(AdaptConfig(checkpoint=str(tmp_path / "ck.pt"), source=(str(tmp_path / "source"),),
                      target=(str(tmp_path / "target"),), out_dir=str(tmp_path / "run"), steps=4, batch_size=4,
                      lr=1e-3, device="cpu", hparams={"global": False}))
    state = load_checkpoint(tmp_path / "run" / "best.pt")["model_state"]
    adapted = build_model("unet", "resnet18", "none", 1)
    domain_bn.load_model_state(adapted, state)
    adapted.eval()
    key = "encoder.bn1"
    for k in range(2):  # each slot's affine parameters were trained (its patches went through it)
        assert not torch.equal(state[f"{key}.domain_weight"][k], before[f"{key}.domain_weight"][k])
    torch.testing.assert_close(state[f"{key}.weight"], state[f"{key}.domain_weight"].mean(0))  # shared: the mixture
    for k, d in enumerate(("s1", "s2")):  # a slot's statistics: its own source patches, with the adapted weights
        x = torch.from_numpy(stores[d].get(stores[d].spread(256))[0]).permute(0, 3, 1, 2)
        f = stem_input(adapted, norm(x))
        torch.testing.assert_close(state[f"{key}.domain_mean"][k], f.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    target = Patches([open_store(p) for p in sorted((tmp_path / "target").glob("*.zarr"))], False)
    f = stem_input(adapted, norm(torch.from_numpy(target.get(target.spread(256))[0]).permute(0, 3, 1, 2)))
    torch.testing.assert_close(state[f"{key}.running_mean"], f.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)  # shared: target


def test_the_mean_teacher_labels_only_confident_pixels_and_follows_the_model_by_its_average():
    from histodg.adaptation.self_training import MeanTeacher

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 1), torch.nn.BatchNorm2d(1), torch.nn.Dropout2d(0.9))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
        model[1].weight.fill_(5.0)
    teacher = MeanTeacher(model, ema=0.9, threshold=0.9, own_statistics=True)
    x = torch.zeros(2, 3, 4, 4)
    x[:, :, 0] = 4.0   # row 0: far above the batch mean: confident tumour
    x[:, :, 1] = -4.0  # row 1: far below: confident background
    x[:, :, 2:] = 0.1  # rows 2-3: near the mean: not confident
    bn = teacher.teacher[1]
    before = (bn.running_mean.clone(), bn.running_var.clone())
    labels, share = teacher.pseudo_labels(x, classes=1)
    # the batch's own statistics (own_statistics): z = (v - mean) / std, the sigmoid of it
    v = x[:, 0] * 3
    p = torch.sigmoid(5 * (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + bn.eps))
    want = torch.where(torch.maximum(p, 1 - p) >= 0.9, (p > 0.5).to(torch.uint8), torch.full_like(p, 255, dtype=torch.uint8))
    assert torch.equal(labels, want)  # dropout (p 0.9) was off: no random zeros
    assert (labels[:, 0] == 1).all() and (labels[:, 1] == 0).all() and (labels[:, 2:] == 255).all()
    assert share == pytest.approx(0.5)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    w0 = teacher.teacher[0].weight.clone()
    with torch.no_grad():
        model[0].weight.fill_(3.0)
        model[1].running_mean.fill_(7.0)
    teacher.update(model)
    torch.testing.assert_close(teacher.teacher[0].weight, 0.9 * w0 + 0.1 * 3.0)
    assert float(teacher.teacher[1].running_mean) == 7.0 and not teacher.teacher[0].weight.requires_grad


def test_self_training_trains_on_the_teachers_pseudo_labels_and_says_so(data, tmp_path):
    base = dict(bn=False, **{"global": False, "local": False})
    plain = _run(data, tmp_path / "plain", **base)
    st = _run(data, tmp_path / "st", self_train=True, threshold=0.6, **base)
    lines = [json.loads(x) for x in (tmp_path / "st" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["self_loss"] > 0 and 0 < r["pseudo_share"] <= 1 for r in lines)
    assert "self_loss" not in json.loads((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[0])
    assert st["settings"]["self_train"] is True and st["settings"]["threshold"] == 0.6
    a = load_checkpoint(tmp_path / "plain" / "best.pt")["model_state"]
    b = load_checkpoint(tmp_path / "st" / "best.pt")["model_state"]
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())  # the pseudo-label loss moved the model
    assert plain["settings"]["self_train"] is False


def test_a_bad_self_training_setting_is_one_clear_error(data, tmp_path):
    with pytest.raises(ValueError, match="threshold"):
        AdaptConfig(checkpoint=str(data / "ck.pt"), source=("s",), target=("t",), out_dir=str(tmp_path), hparams={"threshold": "1.5"})
    with pytest.raises(ValueError, match="self_augment"):
        AdaptConfig(checkpoint=str(data / "ck.pt"), source=("s",), target=("t",), out_dir=str(tmp_path),
                    hparams={"self_augment": "wild"})
