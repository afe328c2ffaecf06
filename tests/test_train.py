"""The training engine on small synthetic stores with tiny untrained models (64 px, CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from helpers import make_domains, make_store
from histodg.model.checkpoint import load_checkpoint, model_from_checkpoint
from histodg.training.config import TrainConfig
from histodg.training.trainer import Callbacks, Trainer, TrainError

TINY = dict(arch="unet", encoder="resnet18", encoder_weights="none", batch_size=4, workers=0, lr=1e-3, method="erm")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return make_domains(tmp_path_factory.mktemp("stores"))


def cfg(stores, out, **kw):
    return TrainConfig(stores=(str(stores),), out_dir=str(out), **{**TINY, **kw})


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def two_stages(stores, tmp_path_factory):
    """One organ -> scanner run (lung held out), with the weights each stage started from."""
    out, seen = tmp_path_factory.mktemp("two") / "run", {}

    def on_stage_start(stage, model, total):
        seen[stage.index] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    c = cfg(stores, out, pretrain="organ", finetune="scanner", epochs=2, val_domains=("lung",))
    result = Trainer(c, callbacks=Callbacks(on_stage_start=on_stage_start)).run()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return out, seen, result, lines


@pytest.mark.slow
def test_stage_two_starts_from_stage_ones_final_weights(two_stages):
    out, seen, _, _ = two_stages
    assert states_equal(seen[1], load_checkpoint(out / "stage1.pt")["model_state"])
    assert not states_equal(seen[0], seen[1])  # and stage 1 did train


@pytest.mark.slow
def test_each_stage_trains_on_its_axis_and_never_on_the_held_out_organ(two_stages):
    _, _, result, lines = two_stages
    s1, s2 = result["stages"]
    assert s1["axis"] == "organ" and set(s1["train_patches"]) == {"colon", "stomach"}
    assert s2["axis"] == "scanner" and set(s2["train_patches"]) == {"s1", "s2", "s3"}
    assert [(r["stage"], r["epoch"]) for r in lines] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert set(lines[0]["heldout"]["domains"]) == {"lung"} and set(lines[0]["val"]["domains"]) == {"colon", "stomach"}


@pytest.mark.slow
def test_stage_two_gets_a_fresh_optimizer_and_schedule(two_stages):
    lines = two_stages[3]
    assert lines[2]["lr"] > lines[1]["lr"]  # its first epoch has a high lr again


@pytest.mark.slow
def test_the_run_folder_has_every_output_and_best_pt_is_a_final_stage_model_predict_can_build(two_stages):
    out = two_stages[0]
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "curves.png", "result.json"):
        assert (out / name).is_file(), name
    best = load_checkpoint(out / "best.pt")
    mc = best["model_config"]
    assert mc["tile_size"] == 64 and mc["mpp"] == 1.0 and mc["classes"] == 1 and mc["arch"] == "unet"
    assert best["metrics"]["stage"] == 2
    model, config = model_from_checkpoint(best)
    assert config.tile_size == 64 and model(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)


@pytest.mark.slow
def test_the_shift_reference_covers_both_stages_training_domains_and_never_the_held_out_one(two_stages):
    out = two_stages[0]
    best, last = load_checkpoint(out / "best.pt"), load_checkpoint(out / "last.pt")
    for ck in (best, last):  # one calibration score per training slide; best.pt's for its own weights
        ref = ck["model_config"]["shift"]
        assert set(ref["domains"]) == {"colon", "stomach", "s1", "s2", "s3"}
        assert sum(d["slides"] for d in ref["domains"].values()) == len(ref["calibration"]) == 5
    same = states_equal(best["model_state"], last["model_state"])
    assert (best["model_config"]["shift"] == last["model_config"]["shift"]) == same


def test_the_model_card_keeps_the_held_out_organ_apart(two_stages):
    card = load_checkpoint(two_stages[0] / "best.pt")["model_config"]["trained_on"]
    assert {d["organ"] for d in card["held_out"]} == {"lung"} and all(d["held_out"] for d in card["held_out"])
    assert "lung" not in {d["organ"] for d in card["domains"]} and len(card["domains"]) == 5
    assert [s["axis"] for s in card["stages"]] == ["organ", "scanner"]


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one(stores, tmp_path):
    c = dict(pretrain="organ", finetune="scanner", epochs=2)
    Trainer(cfg(stores, tmp_path / "a", **c)).run()

    class Killed(Exception):
        pass

    epochs = []

    def kill_after_first_stage(record):
        epochs.append(record)
        if len(epochs) == 3:  # stage 2, epoch 1: last.pt was just written
            raise Killed

    with pytest.raises(Killed):
        Trainer(cfg(stores, tmp_path / "b", **c), callbacks=Callbacks(on_epoch=kill_after_first_stage)).run()
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    with pytest.raises(TrainError, match="--resume"):
        Trainer(cfg(stores, tmp_path / "b", **c)).run()  # never silently start over
    Trainer(cfg(stores, tmp_path / "b", **c), resume=True).run()
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["global_step"] == b["global_step"]
    assert states_equal(a["model_state"], b["model_state"])
    la = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "images_per_s")}  # noqa: E731
    assert [strip(r) for r in la] == [strip(r) for r in lb]
    with pytest.raises(TrainError, match="finished"):
        Trainer(cfg(stores, tmp_path / "b", **c), resume=True).run()


@pytest.mark.slow
def test_loss_goes_down_on_a_learnable_task(tmp_path):
    root = tmp_path / "s"
    for d in range(2):
        make_store(root / f"d{d}.zarr", n=32, organ=f"o{d}", seed=d, tint=(10 * d, 0, 0))
    r = Trainer(TrainConfig(stores=(str(root),), out_dir=str(tmp_path / "run"), **{**TINY, "lr": 3e-3},
                            epochs=8, steps_per_epoch=4, val_fraction=0.25)).run()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = lines[0]["train_loss"], lines[-1]["train_loss"]
    assert last < 0.75 * first
    assert lines[0]["val"]["mean_domain_dice_pixels"] < 0.5 < 0.8 < r["final"]["val"]["mean_domain_dice_pixels"]


@pytest.mark.slow
def test_cross_validation_gives_one_result_per_domain(stores, tmp_path):
    from histodg.training.crossval import run_cv

    summary = run_cv(cfg(stores, tmp_path / "cv", domains="scanner", epochs=1, cv=True))
    assert set(summary["folds"]) == {"s1", "s2", "s3"} and summary["axis"] == "scanner"
    for name, fold in summary["folds"].items():
        res = json.loads((tmp_path / "cv" / "cv" / name / "result.json").read_text())
        trained = res["stages"][0]["train_patches"]
        assert name not in trained and len(trained) == 2  # the fold's domain is held out
        assert 0 <= fold["dice"] <= 1
    dice = [f["dice"] for f in summary["folds"].values()]
    assert summary["dice_mean"] == pytest.approx(np.mean(dice)) and summary["dice_std"] == pytest.approx(np.std(dice))
    assert json.loads((tmp_path / "cv" / "cv_summary.json").read_text())["dice_mean"] == summary["dice_mean"]


@pytest.mark.slow
def test_cross_validation_after_pretraining(stores, tmp_path):
    from histodg.training.crossval import run_cv

    summary = run_cv(cfg(stores, tmp_path / "cv", pretrain="organ", finetune="scanner", steps=2, cv=True))
    assert set(summary["folds"]) == {"s1", "s2", "s3"}
    pre = tmp_path / "cv" / "cv" / "_pretrain"
    assert (pre / "result.json").is_file()
    fold_cfg = json.loads((tmp_path / "cv" / "cv" / "s1" / "config.json").read_text())
    assert fold_cfg["encoder_weights"] == str(pre / "last.pt") and fold_cfg["domains"] == "scanner"


def test_cli_train_and_methods(stores, tmp_path, cli):
    r = cli("train", stores, "-o", tmp_path / "run", "--arch", "unet", "--encoder", "resnet18", "--encoder-weights", "none",
            "--domains", "organ", "--steps", "2", "--batch-size", "2", "--workers", "0", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["global_step"] == 2
    r = cli("train", "-o", tmp_path / "run", "--resume")
    assert r.exit_code == 1 and "finished" in r.stderr
    r = cli("methods", "--json")
    assert "erm" in {m["name"] for m in json.loads(r.stdout)}
    assert [m["name"] for m in json.loads(r.stdout) if m["default"]] == ["dsbn"]
    assert "dsbn (the default): " in cli("methods").stdout
    assert "histodg methods" in cli("train", "--help").stdout


def _bad(tmp_path, cli, *stores_and_args, match):
    r = cli("train", *stores_and_args, "-o", tmp_path / "run", "--arch", "unet", "--encoder", "resnet18",
            "--encoder-weights", "none", "--steps", "1", "--workers", "0")
    assert r.exit_code != 0
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and match in lines[0], r.output
    assert not (tmp_path / "run" / "last.pt").exists()  # refused before any training
    return lines[0]


def test_bad_stores_are_refused_before_training(tmp_path, cli):
    a = make_store(tmp_path / "a.zarr", n=4, organ="colon")
    inc = make_store(tmp_path / "inc.zarr", n=4, organ="colon")
    zarr.open_group(str(inc), mode="r+").attrs["complete"] = False
    assert "inc.zarr" in _bad(tmp_path, cli, a, inc, match="incomplete")
    old = make_store(tmp_path / "old.zarr", n=4, organ="colon")
    zarr.open_group(str(old), mode="r+").attrs["format_version"] = 99
    _bad(tmp_path, cli, a, old, match="format version 99")
    small = make_store(tmp_path / "small.zarr", n=4, size=32, organ="colon")
    _bad(tmp_path, cli, a, small, match="mixed tile sizes")
    coarse = make_store(tmp_path / "coarse.zarr", n=4, organ="colon", mpp=2.0)
    _bad(tmp_path, cli, a, coarse, match="mixed resolutions")
    nomask = make_store(tmp_path / "nomask.zarr", n=4, organ="colon", masks=False)
    _bad(tmp_path, cli, a, nomask, match="has no masks")
    _bad(tmp_path, cli, a, "--domains", "scanner", match="no store has a known scanner")
    _bad(tmp_path, cli, a, "--val-domain", "liver", match="no store has this organ or scanner")
    _bad(tmp_path, cli, tmp_path / "missing.zarr", match="not a patch store")
    r = cli("train", a, "-o", tmp_path / "r", "--pretrain", "organ")
    assert r.exit_code == 2 and "--finetune" in r.stderr
    r = cli("train", a, "-o", tmp_path / "r", "--hp", "nope=1")
    assert r.exit_code == 2 and "no hyperparameter 'nope'" in r.stderr


def test_missing_weights_file_and_offline_imagenet(tmp_path, cli, monkeypatch):
    a = make_store(tmp_path / "a.zarr", n=4, organ="colon")
    r = cli("train", a, "-o", tmp_path / "run", "--arch", "unet", "--encoder", "resnet18",
            "--encoder-weights", tmp_path / "nope.pth", "--steps", "1", "--workers", "0")
    assert r.exit_code == 1 and "weights file not found" in r.stderr
    import segmentation_models_pytorch as smp

    def offline(*a, **k):
        raise OSError("Could not connect to huggingface.co")

    monkeypatch.setattr(smp, "create_model", offline)
    r = cli("train", a, "-o", tmp_path / "run2", "--arch", "unet", "--encoder", "resnet18", "--steps", "1", "--workers", "0")
    assert r.exit_code == 1 and "--encoder-weights none" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(stores, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "histodg",
           "train", str(stores), "-o", str(tmp_path / "run"), "--arch", "unet", "--encoder", "resnet18",
           "--encoder-weights", "none", "--domains", "scanner", "--epochs", "2", "--steps-per-epoch", "2",
           "--batch-size", "2", "--workers", "0", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert res["world_size"] == 2
    assert len(set(res["param_checksums"])) == 1  # gradients were synchronised: identical weights
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 alone wrote
    cfg_ = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg_["resolved"]["world_size"] == 2
    # each rank drew its own patches: 2 ranks x 3 domains x 2 patches per step
    assert json.loads(r.stdout[r.stdout.index("{"):])["global_step"] == 4


def test_the_loop_gives_methods_every_micro_batch_of_a_step_and_resets_the_optimizer_on_request(stores, tmp_path,
                                                                                                 monkeypatch):
    from histodg.training.methods import METHODS
    from histodg.training.methods.erm import ERM

    seen = {"steps": [], "stage": []}

    class Watching(ERM):
        name = "watching"

        def start_stage(self, total_steps):
            super().start_stage(total_steps)
            seen["stage"].append(total_steps)

        def begin_step(self, micro_batches):
            seen["steps"].append(len(micro_batches))
            self.calls = 0

        def loss(self, batches):
            self.calls += 1
            return super().loss(batches)

        def end_of_step(self):
            assert self.calls == 3  # every micro-batch's loss came after begin_step
            return len(seen["steps"]) == 2  # reset after the second step

    monkeypatch.setitem(METHODS, "watching", Watching)
    c = cfg(stores, tmp_path / "run", domains="scanner", steps=4, accumulate=3, method="watching", val_fraction=0)
    states = []
    Trainer(c, callbacks=Callbacks(on_epoch=lambda r: states.append(load_checkpoint(tmp_path / "run" / "last.pt")))).run()
    assert seen == {"steps": [3, 3, 3, 3], "stage": [4]}
    step_counts = {int(s["step"]) for s in states[-1]["optimizer_state"]["state"].values()}
    assert step_counts == {2}  # AdamW's state was cleared after step 2: two steps since


def test_augment_presets_are_recorded_and_old_run_configs_still_load(stores, tmp_path, cli):
    r = cli("train", stores, "-o", tmp_path / "run", "--arch", "unet", "--encoder", "resnet18", "--encoder-weights", "none",
            "--domains", "organ", "--steps", "2", "--batch-size", "2", "--workers", "0", "--augment", "strong",
            "--aug", "jpeg=50", "--json")
    assert r.exit_code == 0, r.output
    aug = load_checkpoint(tmp_path / "run" / "best.pt")["model_config"]["augmentation"]
    assert aug["preset"] == "strong" and aug["jpeg"] == 50 and aug["hed_scale"] == 0.3
    r = cli("train", stores, "-o", tmp_path / "bad", "--augment", "strong", "--aug", "nonsense=1")
    assert r.exit_code == 2 and "no such setting" in r.stderr
    old = {**cfg(stores, tmp_path / "o").to_dict(), "augment": True, "jitter": 0.3}  # a config.json of an older version
    old.pop("aug")
    c = TrainConfig.from_dict(old)
    assert c.augment == "light" and c.augmentation.jitter == 0.3 and c.augmentation.flips
    assert TrainConfig.from_dict({**old, "augment": False}).augment == "none"


def test_val_domain_unknown_is_refused(tmp_path, cli):
    a = make_store(tmp_path / "a.zarr", n=4, organ="colon")
    line = _bad(tmp_path, cli, a, "--val-domain", "unknown", match="not a domain name")
    assert "unknown" in line


def test_without_a_protocol_a_cosas_layout_trains_organs_then_both_tasks_together(stores):
    """Some stores name an organ, others only a scanner (COSAS): the default is organ pretraining,
    then the union, one domain per organ and per scanner, and no store is left out; stores that all
    name an organ (or none does) keep their one axis and one stage."""
    from histodg.training.data import load_stores
    from histodg.training.splits import plan_stages

    refs = load_stores([str(stores)])
    assert {s.organ for s in refs} - {"unknown"} and any(s.organ == "unknown" for s in refs)
    first, stage = plan_stages(refs, [None], (), 0.0, 0)
    assert (first.axis, stage.axis) == ("organ", "union")
    assert set(first.domain_names) == {s.organ for s in refs} - {"unknown"}
    organs = {s.organ for s in refs} - {"unknown"}
    scanners = {s.scanner for s in refs if s.organ == "unknown"}
    assert set(stage.domain_names) == organs | scanners
    assert sum(len(ps) for ps in stage.train.values()) == len(refs)  # every store trains
    with_organ = [s for s in refs if s.organ != "unknown"]
    assert [st.axis for st in plan_stages(with_organ, [None], (), 0.0, 0)] == ["organ"]
    scanner_only = [s for s in refs if s.organ == "unknown"]
    assert [st.axis for st in plan_stages(scanner_only, [None], (), 0.0, 0)] == ["scanner"]


def test_a_run_resumed_with_settings_that_plan_other_stages_is_refused(stores, tmp_path):
    """A run begun as one union stage (the default before the end of 2026-12-07) must not go on as
    organ pretraining then the union: its stages are compared with the plan, and it is refused."""

    class Killed(Exception):
        pass

    def kill(record):
        raise Killed

    with pytest.raises(Killed):
        Trainer(cfg(stores, tmp_path / "run", union=True, epochs=2), callbacks=Callbacks(on_epoch=kill)).run()
    with pytest.raises(TrainError, match=r"started with the stages union, and these settings plan organ -> union"):
        Trainer(cfg(stores, tmp_path / "run", epochs=2), resume=True).run()  # the new default plan
    Trainer(cfg(stores, tmp_path / "run", union=True, epochs=2), resume=True).run()  # as it began: goes on
    assert (tmp_path / "run" / "result.json").exists()
