"""The Slurm recipes of examples/slurm run as array tasks would run them: each histodg command
line parses, and the tasks' shards together cover the inputs exactly once."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from histodg.cli import main
from histodg.slides.inputs import parse_shard, resolve_inputs, take_shard

SLURM = Path(__file__).resolve().parents[1] / "examples" / "slurm"


def _array(script: Path) -> list[int]:
    m = re.search(r"^#SBATCH --array=(\d+)-(\d+)$", script.read_text(), re.M)
    return list(range(int(m.group(1)), int(m.group(2)) + 1)) if m else [0]


def _run(script: Path, tmp_path: Path, task: int, env: dict) -> list[list[str]]:
    """Run the script with fake `histodg` and `torchrun` that record their arguments."""
    bin_dir, log = tmp_path / "bin", tmp_path / f"calls{task}.jsonl"
    bin_dir.mkdir(exist_ok=True)
    for name in ("histodg", "torchrun"):
        shim = bin_dir / name
        shim.write_text(f"#!{sys.executable}\nimport json, sys\n"
                        f"open({str(log)!r}, 'a').write(json.dumps([{name!r}, *sys.argv[1:]]) + '\\n')\n")
        shim.chmod(0o755)
    slurm = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_CPUS_PER_TASK": "8", "SLURM_JOB_ID": "1"}
    r = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, **env, **slurm, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr
    return [json.loads(x) for x in log.read_text().splitlines()]


def _histodg_args(call: list[str]) -> list[str]:
    if call[0] == "torchrun":  # torchrun ... -m histodg ARGS
        return call[call.index("-m") + 2:]
    return call[1:]


def _parse(args: list[str]) -> dict:
    """What Click makes of a histodg command line (options checked, nothing run)."""
    cmd = main.commands[args[0]]
    return cmd.make_context(args[0], args[1:], resilient_parsing=False).params


@pytest.fixture
def manifest(tmp_path):
    m = tmp_path / "slides.csv"
    m.write_text("path,organ\n" + "".join(f"case{i:02d}.svs,colon\n" for i in range(21)))
    return m


@pytest.mark.parametrize("script", ["tile.sbatch", "predict.sbatch"])
def test_array_tasks_cover_every_slide_once(script, manifest, tmp_path):
    taken = []
    for task in _array(SLURM / script):
        calls = _run(SLURM / script, tmp_path, task, {"MANIFEST": str(manifest)})
        assert len(calls) == 1
        params = _parse(_histodg_args(calls[0]))
        jobs = take_shard(resolve_inputs(params["inputs"]), parse_shard(params["shard"]))
        taken += [j.name for j in jobs]
    assert sorted(taken) == [f"case{i:02d}" for i in range(21)]  # every slide, exactly once


def test_a_resubmission_of_some_tasks_redoes_exactly_their_slides(manifest, tmp_path):
    script = SLURM / "tile.sbatch"
    first = {}
    for task in _array(script):
        params = _parse(_histodg_args(_run(script, tmp_path, task, {"MANIFEST": str(manifest)})[0]))
        first[task] = [j.name for j in take_shard(resolve_inputs(params["inputs"]), parse_shard(params["shard"]))]
    # sbatch --array=2,5 tile.sbatch: Slurm numbers the tasks 2 and 5 again
    for task in (2, 5):
        again = tmp_path / f"resubmitted{task}"
        again.mkdir()
        params = _parse(_histodg_args(_run(script, again, task, {"MANIFEST": str(manifest)})[0]))
        assert [j.name for j in take_shard(resolve_inputs(params["inputs"]), parse_shard(params["shard"]))] == first[task]


def test_the_training_job_starts_or_resumes_with_torchrun(tmp_path):
    script = SLURM / "train.sbatch"
    calls = _run(script, tmp_path, 0, {})
    assert calls[0][0] == "torchrun" and "--nproc-per-node" in calls[0]
    params = _parse(_histodg_args(calls[0]))
    assert params["pretrain"] == "organ" and params["finetune"] == "scanner" and not params["resume"]
    (tmp_path / "runs" / "cosas").mkdir(parents=True)
    (tmp_path / "runs" / "cosas" / "last.pt").write_bytes(b"")
    (tmp_path / "calls0.jsonl").unlink()
    params = _parse(_histodg_args(_run(script, tmp_path, 0, {})[0]))
    assert params["resume"]
