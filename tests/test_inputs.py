"""Inputs and entry points shared by every command: `--shard` and Slurm arrays, unique names for
inputs of the same name, `--help` everywhere, `python -m histodg` and the console script."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from histodg.slides.inputs import parse_shard, resolve_inputs, take_shard


def test_shards_split_the_inputs(monkeypatch):
    jobs = list(range(10))
    assert parse_shard("2/3") == (1, 3)
    assert take_shard(jobs, (1, 3)) == [1, 4, 7]
    assert sorted(sum((take_shard(jobs, (i, 3)) for i in range(3)), [])) == jobs
    with pytest.raises(ValueError):
        parse_shard("4/3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    assert parse_shard(None) == (1, 4)


def test_a_stepped_slurm_array_does_every_input_once(monkeypatch):
    """--array=1-7:2 runs tasks 1, 3, 5, 7: shards 0-3 of 4, each input exactly once."""
    jobs = list(range(10))
    env = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7",
           "SLURM_ARRAY_TASK_STEP": "2"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    done = []
    for tid in (1, 3, 5, 7):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(tid))
        done += take_shard(jobs, parse_shard(None))
    assert sorted(done) == jobs
    # a resubmission of some tasks (--array=1,3 of an original 0-3) cannot know the original array
    for k, v in {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "3",
                 "SLURM_ARRAY_TASK_STEP": "1", "SLURM_ARRAY_TASK_ID": "3"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="pass --shard I/N"):
        parse_shard(None)
    assert parse_shard("4/4") == (3, 4)  # what the README's recipe passes: the task's own shard


def test_duplicate_names_are_made_unique(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.svs").write_bytes(b"")
    jobs = resolve_inputs([tmp_path / "a" / "x.svs", tmp_path / "b" / "x.svs"])
    assert [j.name for j in jobs] == ["a-x", "b-x"]


def test_help_everywhere(cli):
    from histodg.cli import main

    r = cli("--help")
    assert r.exit_code == 0 and "tile" in r.stdout and "info" in r.stdout
    assert cli("-h").exit_code == 0
    assert cli("--version").stdout.strip().startswith("histodg")
    for name in main.commands:
        for flag in ("--help", "-h"):
            r = cli(name, flag)
            assert r.exit_code == 0 and "Usage" in r.stdout, name


def test_python_dash_m_and_console_script():
    r = subprocess.run([sys.executable, "-m", "histodg", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "histodg" in r.stdout
    exe = Path(sys.executable).parent / "histodg"
    if exe.exists():
        r = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "Usage" in r.stdout
