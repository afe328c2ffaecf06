"""What stops a training run, and how the same command starts it again: a NaN loss, a full disk, a
failed checkpoint write, a run stopped before its first checkpoint, a patch that does not decode."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zarr

from helpers import make_store
from histodg.model.checkpoint import load_checkpoint


def _train_cmd(stores, out):
    return [sys.executable, "-m", "histodg", "train", str(stores), "-o", str(out), "--arch", "unet", "--encoder", "resnet18",
            "--encoder-weights", "none", "--domains", "organ", "--steps", "2", "--batch-size", "2", "--workers", "0",
            "--val-fraction", "0"]


def test_nan_loss_stops_with_step_and_domain_and_keeps_last_pt(tmp_path, cli, monkeypatch):
    from histodg.training.methods import METHODS
    from histodg.training.methods.erm import ERM

    class Explodes(ERM):
        """ERM whose 'stomach' loss turns NaN at the 4th step."""

        name = "explodes"
        calls = 0

        def loss(self, batches):
            Explodes.calls += 1
            loss, logs = super().loss(batches)
            if Explodes.calls >= 4:
                logs["domain_losses"][1] = float("nan")
                loss = loss * float("nan")
            return loss, logs

    monkeypatch.setitem(METHODS, "explodes", Explodes)
    root = tmp_path / "s"
    make_store(root / "a.zarr", n=8, organ="colon", seed=0)
    make_store(root / "b.zarr", n=8, organ="stomach", seed=1)
    r = cli("train", root, "-o", tmp_path / "run", "--arch", "unet", "--encoder", "resnet18", "--encoder-weights", "none",
            "--method", "explodes", "--epochs", "3", "--steps-per-epoch", "3", "--batch-size", "2", "--workers", "0",
            "--val-fraction", "0")
    assert r.exit_code == 1
    err = [x for x in r.stderr.splitlines() if x.startswith("error")]
    assert len(err) == 1 and "step 4" in err[0] and "domain stomach" in err[0] and "last.pt" in err[0]
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model_state"].values() if v.is_floating_point())


def test_a_full_disk_is_one_line_and_the_same_command_starts_the_run_again(tmp_path):
    """A file-size limit (what a full disk looks like to the writer: EFBIG/ENOSPC on write) stops
    the first checkpoint: one line, nothing half-written, and a plain rerun then trains."""
    import resource

    root = tmp_path / "s"
    make_store(root / "a.zarr", n=8, organ="colon", seed=0)
    make_store(root / "b.zarr", n=8, organ="stomach", seed=1)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))  # 4 MB: a checkpoint is ~50 MB

    r = subprocess.run(_train_cmd(root, out), capture_output=True, text=True, env=env, preexec_fn=small_disk)
    lines = [x for x in r.stderr.splitlines() if x.startswith("error")]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "run/best.pt: cannot be written" in lines[0] and "disk full" in lines[0] and "Traceback" not in r.stderr
    assert not list(out.glob("*.pt")) and not list(out.glob(".*tmp*"))  # nothing half-written
    r = subprocess.run(_train_cmd(root, out), capture_output=True, text=True, env=env)  # no --overwrite needed
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(out / "last.pt")["global_step"] == 2


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    from histodg.model import checkpoint

    path = tmp_path / "last.pt"
    checkpoint.save_checkpoint(path, {"model_state": {"w": torch.ones(3)}})
    before = path.read_bytes()

    def full_disk(obj, f):
        Path(f).write_bytes(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match="last.pt: cannot be written"):
        checkpoint.save_checkpoint(path, {"model_state": {"w": torch.zeros(3)}})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_the_start(tmp_path, cli):
    root = tmp_path / "s"
    make_store(root / "a.zarr", n=8, organ="colon", seed=0)
    out = tmp_path / "run"
    args = ["--arch", "unet", "--encoder", "resnet18", "--encoder-weights", "none", "--steps", "1", "--batch-size", "2",
            "--workers", "0", "--val-fraction", "0"]
    out.mkdir()
    (out / "config.json").write_text("{}")  # what a run killed inside its first epoch leaves
    (out / "metrics.jsonl").write_text("")
    r = cli("train", root, "-o", out, *args)  # no --overwrite, no "a run exists here"
    assert r.exit_code == 0, r.output
    assert load_checkpoint(out / "last.pt")["global_step"] == 1
    r = cli("train", root, "-o", out, *args)  # a run with a checkpoint is still protected
    assert r.exit_code == 1 and "a run exists here" in r.stderr


@pytest.mark.parametrize("workers", [0, 1])
def test_a_patch_that_does_not_decode_stops_training_with_one_line(tmp_path, cli, workers):
    """The shard index intact (so the store opens) but a chunk's bytes overwritten: the read in
    the DataLoader (in a worker process or not) fails with one line naming the store and patch."""
    from histodg.store.integrity import read_index, shard_file

    root = tmp_path / "s"
    store = make_store(root / "a.zarr", n=8, organ="colon", seed=0)
    f = shard_file(store / "images", 0)
    rows = zarr.open_array(str(store / "images"), mode="r").shards[0]
    data = bytearray(f.read_bytes())
    for offset, _ in read_index(f, rows)[:8]:
        data[int(offset):int(offset) + 16] = bytes(16)  # every chunk's blosc header
    f.write_bytes(bytes(data))
    r = cli("train", root, "-o", tmp_path / "run", "--arch", "unet", "--encoder", "resnet18", "--encoder-weights", "none",
            "--steps", "1", "--batch-size", "2", "--workers", str(workers), "--val-fraction", "0")
    assert r.exit_code == 1 and "Traceback" not in r.output
    err = [x for x in r.stderr.splitlines() if x.startswith("error")]
    assert len(err) == 1 and err[0].startswith(f"error: {store}: damaged: patch ") and "histodg info --check" in err[0]
