"""`--method dsbn`: one set of BatchNorm statistics and affine parameters per training domain
(`model.domain_bn`), each domain's images routed to its own in training and in predict."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from helpers import make_store, stem_input, tissue_field
from histodg.inference import PredictOptions, Predictor, predict_slide
from histodg.model import domain_bn
from histodg.model.build import build_model
from histodg.model.checkpoint import load_checkpoint
from histodg.slides.inputs import SlideJob
from histodg.training.config import TrainConfig
from histodg.training.trainer import Callbacks, Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = dict(arch="unet", encoder="resnet18", encoder_weights="none", batch_size=4, workers=0, lr=1e-3, method="dsbn")


def test_each_domain_keeps_its_own_statistics_and_its_images_go_through_them():
    torch.manual_seed(0)
    model = build_model("unet", "resnet18", "none", 1)
    assert domain_bn.convert(model, 2) == len(domain_bn.domain_layers(model)) > 10
    bn = model.encoder.bn1
    x = torch.cat([torch.randn(3, 3, 32, 32), 2 + 3 * torch.randn(3, 3, 32, 32)])  # domain 0, then a shifted domain 1
    model.train()
    with domain_bn.domain(model, (3, 3)):
        model(x)
    for k, part in enumerate((x[:3], x[3:])):  # momentum 0.1 from 0 (mean) and 1 (var): this domain's moments only
        f = stem_input(model, part)
        torch.testing.assert_close(bn.domain_mean[k], 0.1 * f.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.domain_var[k], 0.9 + 0.1 * f.var((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert (bn.domain_mean[0] - bn.domain_mean[1]).abs().max() > 0.1
    torch.testing.assert_close(bn.running_mean, torch.zeros_like(bn.running_mean))  # the shared slot was not used
    domain_bn.sync_shared(model)
    torch.testing.assert_close(bn.running_mean, bn.domain_mean.mean(0))
    model.eval()
    with torch.no_grad():
        with domain_bn.domain(model, (3, 3)):
            both = model(x)
        with domain_bn.domain(model, 1):
            alone = model(x[3:])
        with domain_bn.domain(model, 0):
            wrong = model(x[3:])
    torch.testing.assert_close(both[3:], alone)  # an image of domain 1 goes through slot 1, whatever is beside it
    assert (wrong - alone).abs().max() > 1e-3  # and slot 0 would have given another answer
    assert not bn.weight.requires_grad and bn.domain_weight.requires_grad  # only the slots are trained


def _stores(root):
    """Two organs (stage 1), three scanners (stage 2), tinted apart."""
    for j, organ in enumerate(("colon", "stomach")):
        for s in range(2):
            make_store(root / f"organ-{organ}-{s}.zarr", 12, organ=organ, seed=10 * j + s, tint=(0, 12 * j, 0))
    for j, scanner in enumerate(("s1", "s2", "s3")):
        for s in range(2):
            make_store(root / f"scanner-{scanner}-{s}.zarr", 12, scanner=scanner, seed=50 + 10 * j + s,
                       tint=(25 * j, -15 * j, 10 * j))
    return root


@pytest.mark.slow
def test_dsbn_trains_resumes_and_predicts_each_slide_with_its_domains_batchnorm(tmp_path):
    stores = _stores(tmp_path / "stores")
    c = dict(pretrain="organ", finetune="scanner", epochs=1, val_fraction=0.25, **TINY)
    Trainer(TrainConfig(stores=(str(stores),), out_dir=str(tmp_path / "a"), **c)).run()

    class Killed(Exception):
        pass

    def stop_after_stage_1(record):
        raise Killed

    with pytest.raises(Killed):  # killed with 2 organ slots saved; stage 2 has 3 scanners
        Trainer(TrainConfig(stores=(str(stores),), out_dir=str(tmp_path / "b"), **c),
                callbacks=Callbacks(on_epoch=stop_after_stage_1)).run()
    assert domain_bn.slots_in_state(load_checkpoint(tmp_path / "b" / "last.pt")["model_state"]) == 2
    Trainer(TrainConfig(stores=(str(stores),), out_dir=str(tmp_path / "b"), **c), resume=True).run()
    a, b = load_checkpoint(tmp_path / "a" / "best.pt"), load_checkpoint(tmp_path / "b" / "best.pt")
    assert a["model_config"]["domain_bn"] == ["s1", "s2", "s3"] and domain_bn.slots_in_state(a["model_state"]) == 3
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])
    val = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()][-1]["val"]
    assert set(val["domains"]) == {"s1", "s2", "s3"}  # each scored (through its own slot)
    assert set(a["model_config"]["shift"]["domains"]) == {"colon", "stomach", "s1", "s2", "s3"}

    rgb = tissue_field(200, 260, seed=3)
    Image.fromarray(rgb).save(tmp_path / "slide.png")
    pred = Predictor.from_checkpoint(tmp_path / "a" / "best.pt", PredictOptions(device="cpu"))
    probs, notes = {}, {}
    for scanner in ("s1", "s3", "unknown"):
        out = tmp_path / "pred" / scanner
        predict_slide(pred, SlideJob(tmp_path / "slide.png", "slide", scanner=scanner, mpp=1.0), out)
        notes[scanner] = json.loads((out / "slide" / "done.json").read_text())["adaptation"]
        probs[scanner] = zarr.open_array(str(out / "slide" / "prob.zarr"), mode="r")[:]
    assert notes["s1"] == "dsbn: the BatchNorm of s1" and notes["s3"] == "dsbn: the BatchNorm of s3"
    assert notes["unknown"].startswith("bn: statistics of") and "not one of the model's domains" in notes["unknown"]
    before = {k: v.clone() for k, v in pred.model.state_dict().items()}
    assert not all(np.array_equal(probs["s1"], probs[k]) for k in ("s3", "unknown"))  # the slot changes the answer
    again = tmp_path / "pred" / "again"
    predict_slide(pred, SlideJob(tmp_path / "slide.png", "slide", scanner="s1", mpp=1.0), again)
    assert np.array_equal(zarr.open_array(str(again / "slide" / "prob.zarr"), mode="r")[:], probs["s1"])
    assert all(torch.equal(v, pred.model.state_dict()[k]) for k, v in before.items())  # nothing left adapted


def test_train_at_its_defaults_is_dsbn_on_the_offline_imagenet_efficientnet(tmp_path, cli):
    """The defaults are the DG benchmark's best: FPN, EfficientNet-Lite0 with ImageNet weights from
    the installed package (no download), --method dsbn with one slot per training domain."""
    make_store(tmp_path / "s" / "a.zarr", 4, scanner="s1")
    make_store(tmp_path / "s" / "b.zarr", 4, scanner="s2", seed=1)
    r = cli("train", str(tmp_path / "s"), "-o", str(tmp_path / "run"), "--domains", "scanner", "--steps", "1",
            "--batch-size", "2", "--workers", "0", "--val-fraction", "0")
    assert r.exit_code == 0, r.output
    mc = load_checkpoint(tmp_path / "run" / "best.pt")["model_config"]
    assert (mc["arch"].lower(), mc["encoder"], mc["method"]) == ("fpn", "tu-efficientnet_lite0", "dsbn")
    assert mc["domain_bn"] == ["s1", "s2"]
    assert domain_bn.slots_in_state(load_checkpoint(tmp_path / "run" / "best.pt")["model_state"]) == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["encoder_weights"] == "imagenet"


def test_the_default_method_on_an_encoder_without_batchnorm_says_to_add_method_erm(tmp_path, cli):
    """Refused in one line before the run folder is touched: an older run there survives even --overwrite."""
    make_store(tmp_path / "s" / "a.zarr", 4, scanner="s1")
    make_store(tmp_path / "s" / "b.zarr", 4, scanner="s2", seed=1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    (tmp_path / "run" / "last.pt").write_bytes(b"an older run")
    args = ("train", str(tmp_path / "s"), "-o", str(tmp_path / "run"), "--encoder", "mit_b0", "--encoder-weights", "none",
            "--domains", "scanner", "--steps", "1", "--workers", "0", "--val-fraction", "0", "--overwrite")
    r = cli(*args)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert "--method dsbn: " in lines[0] and "dsbn is the default method: add --method erm" in lines[0], lines[0]
    assert "mit_b0" in lines[0]
    explicit = cli(*args, "--method", "dsbn")  # typed by the user: the same one line, which claims no default
    assert explicit.exit_code == 1 and [x for x in explicit.stderr.splitlines() if x.strip()] == lines
    assert (tmp_path / "run" / "last.pt").read_bytes() == b"an older run"
    r = cli(*args, "--method", "erm")
    assert r.exit_code == 0, r.output
    assert load_checkpoint(tmp_path / "run" / "best.pt")["model_config"]["method"] == "erm"


def test_a_model_without_batchnorm_is_refused_in_one_line(tmp_path, cli):
    make_store(tmp_path / "s" / "a.zarr", 4, scanner="s1")
    make_store(tmp_path / "s" / "b.zarr", 4, scanner="s2", seed=1)
    r = cli("train", str(tmp_path / "s"), "-o", str(tmp_path / "run"), "--method", "dsbn", "--encoder", "mit_b0",
            "--encoder-weights", "none", "--domains", "scanner", "--steps", "1", "--workers", "0", "--val-fraction", "0")
    assert r.exit_code == 1 and "--method dsbn" in r.output and "no BatchNorm layers" in r.output
    assert "Traceback" not in r.output


def test_held_out_slides_are_validated_as_predict_runs_them_each_with_its_own_statistics(tmp_path):
    """A DSBN run's held-out domain (`--val-domain`, `--cv`) is scored as `histodg predict` runs a
    slide of an unknown domain: the shared BatchNorm with statistics estimated on that slide alone,
    not the training domains' mixture. Checked against the estimate written out by hand in plain
    torch, per slide, on the final weights."""
    stores = tmp_path / "stores"
    for j, scanner in enumerate(("s1", "s2")):
        for s in range(2):
            make_store(stores / f"{scanner}-{s}.zarr", 12, scanner=scanner, seed=10 * j + s, tint=(20 * j, 0, -10 * j))
    for s, tint in enumerate(((90, -60, 70), (-50, 40, 100))):  # two held-out slides, unlike each other
        make_store(stores / f"s9-{s}.zarr", 8, scanner="s9", seed=70 + s, tint=tint)
    c = dict(TINY, domains="scanner", steps=3, val_fraction=0, val_domains=("s9",))
    Trainer(TrainConfig(stores=(str(stores),), out_dir=str(tmp_path / "run"), **c)).run()
    held = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]["heldout"]

    from histodg.evaluation.metrics import dice_from
    from histodg.model.checkpoint import model_from_checkpoint
    from histodg.model.normalize import Normalizer
    from histodg.store import open_store

    model, config = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "last.pt"))
    norm = Normalizer(config.normalization.mean, config.normalization.std, "cpu")
    layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    counts = {"own": np.zeros(3), "mixture": np.zeros(3)}
    with torch.no_grad():
        for s in range(2):
            store = open_store(stores / f"s9-{s}.zarr")
            x = norm(torch.from_numpy(np.asarray(store.images[:])).permute(0, 3, 1, 2).float())
            y = torch.from_numpy(np.asarray(store.masks[:])) == 1
            model.eval()
            mixture = model(x)[:, 0] > 0
            for m in layers:  # 8 patches (fewer than 64): all of them, one batch of 8
                m.reset_running_stats()
                m.momentum = None
            model.train()
            model(x)
            model.eval()
            own = model(x)[:, 0] > 0
            for key, pred in (("own", own), ("mixture", mixture)):
                counts[key] += [(pred & y).sum().item(), pred.sum().item(), y.sum().item()]
            model, _ = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "last.pt"))  # the checkpoint's statistics again
            layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert held["domains"]["s9"]["dice_pixels"] == pytest.approx(dice_from(*counts["own"]), abs=1e-6)
    assert abs(dice_from(*counts["own"]) - dice_from(*counts["mixture"])) > 0.01  # and that is not the mixture's score


def test_sds_with_dsbn_routes_each_domain_through_its_own_slot_in_every_pass():
    """`--method sds --hp dsbn=true`: SDS's loss and its pooled pass without gradients (`begin_step`)
    go through the domain slots, each domain's BatchNorm statistics from its own patches only; the
    pooled pass leaves every slot's statistics as they were; the shared slot is their mixture after
    the step. Without dsbn the model keeps plain BatchNorm."""
    from histodg.model.normalize import Normalizer
    from histodg.training.methods import METHODS, SegTask, parse_hparams

    sds = METHODS["sds"]
    assert not sds.uses_domain_bn(parse_hparams(sds, {})) and sds.uses_domain_bn(parse_hparams(sds, {"dsbn": "true"}))
    assert METHODS["dsbn"].uses_domain_bn(None) and not METHODS["erm"].uses_domain_bn(None)
    torch.manual_seed(0)
    model = build_model("unet", "resnet18", "none", 1)
    hp = parse_hparams(sds, {"dsbn": "true", "shallow": "false"})  # no random input perturbation: moments checkable
    method = sds(model, 2, hp, SegTask(), Normalizer((0.5,) * 3, (0.25,) * 3, "cpu"))
    assert domain_bn.slots(model) == 2
    method.train()
    x = [torch.randn(2, 3, 32, 32), 2 + 3 * torch.randn(2, 3, 32, 32)]
    y = [(torch.rand(2, 32, 32) > 0.5).long() for _ in x]
    batches = [(x[0], y[0]), (x[1], y[1])]
    bn = model.encoder.bn1
    method.start_stage(1)
    method.begin_step([batches, batches])  # the pass without gradients over 2 micro-batches
    torch.testing.assert_close(bn.domain_mean, torch.zeros_like(bn.domain_mean))  # restored
    loss, logs = method.loss(batches)
    loss.backward()
    for k in range(2):
        f = stem_input(model, x[k])
        torch.testing.assert_close(bn.domain_mean[k], 0.1 * f.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert bn.domain_weight.grad is not None and bn.weight.grad is None
    assert float(logs["feat_align"]) >= 0
    method.end_of_step()
    torch.testing.assert_close(bn.running_mean, bn.domain_mean.mean(0))
    plain = build_model("unet", "resnet18", "none", 1)
    sds(plain, 2, parse_hparams(sds, {}), SegTask(), None)
    assert domain_bn.slots(plain) == 0


@pytest.mark.slow
def test_sds_on_dsbn_trains_writes_its_slots_and_predicts_through_them(tmp_path, cli):
    stores = _stores(tmp_path / "stores")
    r = cli("train", str(stores), "-o", str(tmp_path / "run"), "--arch", "unet", "--encoder", "resnet18",
            "--encoder-weights", "none", "--method", "sds", "--hp", "dsbn=true", "--pretrain", "organ", "--finetune",
            "scanner", "--steps", "2", "--batch-size", "2", "--workers", "0", "--val-fraction", "0.25")
    assert r.exit_code == 0, r.output
    ck = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ck["model_config"]["method"] == "sds" and ck["model_config"]["domain_bn"] == ["s1", "s2", "s3"]
    assert domain_bn.slots_in_state(ck["model_state"]) == 3
    rgb = tissue_field(120, 160, seed=3)
    Image.fromarray(rgb).save(tmp_path / "slide.png")
    pred = Predictor.from_checkpoint(tmp_path / "run" / "best.pt", PredictOptions(device="cpu"))
    predict_slide(pred, SlideJob(tmp_path / "slide.png", "slide", scanner="s2", mpp=1.0), tmp_path / "pred")
    done = json.loads((tmp_path / "pred" / "slide" / "done.json").read_text())
    assert done["adaptation"] == "dsbn: the BatchNorm of s2" and done["settings"]["dsbn_route"] == "s2"


def test_sds_on_an_encoder_without_batchnorm_is_refused_in_one_line(tmp_path, cli):
    make_store(tmp_path / "s" / "a.zarr", 4, scanner="s1")
    make_store(tmp_path / "s" / "b.zarr", 4, scanner="s2", seed=1)
    r = cli("train", str(tmp_path / "s"), "-o", str(tmp_path / "run"), "--method", "sds", "--hp", "dsbn=true",
            "--encoder", "mit_b0", "--encoder-weights", "none", "--domains", "scanner", "--steps", "1", "--workers", "0",
            "--val-fraction", "0")
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert "--method sds: " in lines[0] and "no BatchNorm layers" in lines[0] and "default" not in lines[0]


@pytest.mark.slow
def test_a_cosas_layout_without_a_protocol_gives_every_organ_and_scanner_its_slot_and_predict_uses_them(tmp_path):
    """The default protocol of a COSAS layout (by organ, then both tasks together): a slot per training organ
    and scanner in the checkpoint; predict sends a slide of a known organ through its organ's slot,
    one of a known scanner through its scanner's, anything else through the shared slot, and
    done.json names the slot."""
    stores = _stores(tmp_path / "stores")
    Trainer(TrainConfig(stores=(str(stores),), out_dir=str(tmp_path / "run"), steps=2, val_fraction=0, **TINY)).run()
    ck = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ck["model_config"]["domain_bn"] == ["colon", "stomach", "s1", "s2", "s3"]
    assert domain_bn.slots_in_state(ck["model_state"]) == 5
    assert set(ck["model_config"]["shift"]["domains"]) == {"colon", "stomach", "s1", "s2", "s3"}
    Image.fromarray(tissue_field(120, 160, seed=3)).save(tmp_path / "slide.png")
    pred = Predictor.from_checkpoint(tmp_path / "run" / "best.pt", PredictOptions(device="cpu", tta="none"))
    probs = {}
    for name, organ, scanner in (("stomach", "stomach", "unknown"), ("s2", "lung", "s2"), ("shared", "lung", "s9")):
        out = tmp_path / "pred" / name
        predict_slide(pred, SlideJob(tmp_path / "slide.png", "slide", organ=organ, scanner=scanner, mpp=1.0), out)
        done = json.loads((out / "slide" / "done.json").read_text())
        assert done["settings"]["dsbn_route"] == name
        probs[name] = zarr.open_array(str(out / "slide" / "prob.zarr"), mode="r")[:]
    assert not np.array_equal(probs["stomach"], probs["s2"]) and not np.array_equal(probs["stomach"], probs["shared"])


def test_a_union_stage_after_organ_pretraining_keeps_the_organ_slots_and_starts_the_others_from_shared():
    torch.manual_seed(0)
    model = build_model("unet", "resnet18", "none", 1)
    domain_bn.convert(model, 2)
    bn = model.encoder.bn1
    with torch.no_grad():
        for k in range(2):
            bn.domain_weight[k].fill_(k + 2.0)
            bn.domain_mean[k].fill_(k + 5.0)
        bn.weight.fill_(-1.0)
        bn.running_var.fill_(7.0)
    assert domain_bn.carry_slots(model, ["colon", "stomach"], ["colon", "stomach", "s1"])
    assert domain_bn.slots(model) == 3
    torch.testing.assert_close(bn.domain_weight[:, 0], torch.tensor([2.0, 3.0, -1.0]))  # colon, stomach, s1 = shared
    torch.testing.assert_close(bn.domain_mean[:, 0], torch.tensor([5.0, 6.0, 0.0]))
    torch.testing.assert_close(bn.domain_var[2], torch.full_like(bn.domain_var[2], 7.0))
    assert bn.domain_weight.requires_grad
    # nothing to carry: no name recurs (organ -> scanner keeps its slots as they are), or already carried (a resume)
    assert not domain_bn.carry_slots(model, ["colon", "stomach"], ["s1", "s2", "s3"])
    assert not domain_bn.carry_slots(model, ["colon", "stomach"], ["colon", "stomach", "s1"])


def test_organ_pretraining_then_a_union_stage_starts_each_organ_slot_from_stage_1s(tmp_path, cli):
    """`--pretrain organ --finetune union`: stage 2 has a slot per organ and scanner, each organ's
    starting where stage 1 left it (stage1.pt), so the organ slides keep what stage 1 learnt."""
    stores = _stores(tmp_path / "stores")
    at_start = {}

    def on_stage_start(stage, model, total):
        bn = getattr(model, "module", model).encoder.bn1
        at_start[stage.index] = (list(stage.domain_names), bn.domain_weight.detach().clone(), bn.weight.detach().clone())

    cfg = TrainConfig(stores=(str(stores),), out_dir=str(tmp_path / "run"), steps=2, val_fraction=0, pretrain="organ",
                      finetune="union", **TINY)
    Trainer(cfg, callbacks=Callbacks(on_stage_start=on_stage_start)).run()
    stage1 = load_checkpoint(tmp_path / "run" / "stage1.pt")
    assert stage1["model_config"]["domain_bn"] == ["colon", "stomach"]  # stage 1's own slots, named
    names, weight, _ = at_start[1]
    assert names == ["colon", "stomach", "s1", "s2", "s3"] and weight.shape[0] == 5
    torch.testing.assert_close(weight[:2], stage1["model_state"]["encoder.bn1.domain_weight"])
    torch.testing.assert_close(weight[2], stage1["model_state"]["encoder.bn1.weight"])  # a new scanner: the shared slot
    assert load_checkpoint(tmp_path / "run" / "best.pt")["model_config"]["domain_bn"] == names
    r = cli("train", stores, "-o", tmp_path / "cli", "--pretrain", "organ", "--finetune", "diagonal")
    assert r.exit_code == 2 and "union" in r.output  # the choice is offered on the command line
