"""Training under torchrun, as a lab runs it on a GPU server, here with 2 CPU ranks on gloo:
the ranks agree, a killed run resumes exactly, `--cv` completes and writes once, rank 0 alone prints."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import make_domains

pytestmark = pytest.mark.slow

ARGS = ("--arch", "unet", "--encoder", "resnet18", "--encoder-weights", "none", "--batch-size", "2", "--device", "cpu",
        "--workers", "0", "--val-fraction", "0", "--domains", "scanner")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return make_domains(tmp_path_factory.mktemp("ddp"), organs=("colon",), scanners=("s1", "s2"), stores_per_domain=1, n=8)


def torchrun(*args, wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           "-m", "histodg", "train", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group: a kill reaches both ranks
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def kill_tree(pid: int) -> None:
    """SIGKILL torchrun and its ranks (each in a session of its own), as a node failure or `scancel` would."""
    from pathlib import Path

    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # its parent is torchrun: a rank
            os.kill(int(stat.parent.name), signal.SIGKILL)
    os.killpg(pid, signal.SIGKILL)


def checksums(run) -> list[str]:
    return json.loads((run / "result.json").read_text())["param_checksums"]


@pytest.mark.parametrize("method", ["erm", "dsbn"])
def test_ranks_agree_and_only_rank_0_prints(stores, tmp_path, method):
    out, err = torchrun(stores, "-o", tmp_path / "run", *ARGS, "--method", method, "--steps", "4", "--steps-per-epoch", "2")
    sums = checksums(tmp_path / "run")
    assert len(sums) == 2 and sums[0] == sums[1]  # DDP kept the ranks' weights equal
    assert out.count(f"run: {tmp_path / 'run'}") == 1  # the result, once
    assert err.count("stage 1 epoch 1/2") == 1 and err.count("stage 1 epoch 2/2") == 1  # epoch lines, once
    assert err.count("stage 1 (scanner): s1, s2") == 1  # the stage line too, not once per rank


def test_a_killed_run_resumes_to_exactly_the_uninterrupted_runs_weights(stores, tmp_path):
    """`--method stain` draws its stain jitter from each rank's global generator: a resume that gave
    every rank rank 0's state (as before) draws other jitter on rank 1 and ends elsewhere."""
    args = [*ARGS, "--method", "stain", "--steps", "9", "--steps-per-epoch", "3"]
    torchrun(stores, "-o", tmp_path / "whole", *args)
    run = tmp_path / "killed"
    proc = torchrun(stores, "-o", run, *args, wait=False)
    deadline = time.time() + 300
    while not (run / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_tree(proc.pid)
    proc.communicate()
    assert not (run / "result.json").exists(), "the run finished before it was killed"
    torchrun("-o", run, "--resume")
    assert checksums(run) == checksums(tmp_path / "whole")


def test_cv_under_torchrun_completes_and_rank_0_alone_writes(stores, tmp_path):
    out, err = torchrun(stores, "-o", tmp_path / "run", *ARGS, "--method", "erm", "--steps", "1", "--cv")
    summary = json.loads((tmp_path / "run" / "cv_summary.json").read_text())
    assert set(summary["folds"]) == {"s1", "s2"}
    assert out.count("cross-validation") == 1


def test_an_explicit_gpu_under_torchrun_is_refused_in_one_line(cli, stores, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    r = cli("train", stores, "-o", tmp_path / "run", "--arch", "unet", "--encoder", "resnet18", "--encoder-weights", "none",
            "--device", "cuda:0", "--steps", "1", "--domains", "scanner")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.strip().startswith("error: --device cuda:0: under torchrun each rank takes the GPU of its LOCAL_RANK")


def test_the_ranks_share_the_domain_description_and_it_is_the_one_process_one(stores, tmp_path):
    """Each rank describes half the training stores; gathered, it is what one process makes of the same weights."""
    import torch

    from histodg.model.checkpoint import load_checkpoint, model_from_checkpoint
    from histodg.model.normalize import Normalizer
    from histodg.training.config import TrainConfig
    from histodg.training.data import load_stores
    from histodg.training.shift_reference import shift_reference
    from histodg.training.splits import plan_stages

    torchrun(stores, "-o", tmp_path / "run", *ARGS, "--method", "erm", "--steps", "2")
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    model, mc = model_from_checkpoint(ckpt)
    cfg = TrainConfig.from_dict(ckpt["train_config"])
    stages = plan_stages(load_stores(cfg.stores), cfg.stage_axes, cfg.val_domains, cfg.val_fraction, cfg.seed)
    norm = mc.normalization
    alone = shift_reference(model, Normalizer(norm.mean, norm.std, "cpu"), stages, torch.device("cpu"))
    assert mc.shift == alone and set(alone["domains"]) == {"s1", "s2"} and alone["precision"] == "float32"


def test_a_locked_run_folder_stops_every_rank_not_only_rank_0(stores, tmp_path):
    """Rank 0 alone takes the lock; its refusal must reach the others, which would wait at a barrier for ever."""
    import socket

    from histodg.locks import _boot_id, _start_time

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        holder = {"host": socket.gethostname(), "pid": sleeper.pid, "start": _start_time(sleeper.pid), "boot": _boot_id()}
        (tmp_path / "run.lock").write_text(json.dumps(holder))
        proc = torchrun(stores, "-o", tmp_path / "run", *ARGS, "--method", "erm", "--steps", "2", wait=False)
        out, err = proc.communicate(timeout=180)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert proc.returncode != 0
    assert err.count(f"pid {sleeper.pid}): wait for it to finish, or write elsewhere") == 2  # both ranks said why


def test_a_ddp_timeout_that_is_no_number_is_one_line(cli, stores, tmp_path, monkeypatch):
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "HISTODG_DDP_TIMEOUT_MIN": "2h"}.items():
        monkeypatch.setenv(k, v)
    r = cli("train", stores, "-o", tmp_path / "run", *ARGS, "--method", "erm", "--steps", "1")
    assert r.exit_code == 1 and r.stderr.strip() == "error: HISTODG_DDP_TIMEOUT_MIN: '2h' is not a number of minutes above 0"
