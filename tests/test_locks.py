"""Two processes on one batch never write the same output at once: per-output lock files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import BATCH_REPORT, outputs, tiny_checkpoint
from histodg.batch import Locked, output_lock
from histodg.store import open_store


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_live_holder_keeps_the_lock_and_a_dead_ones_is_taken_over(tmp_path):
    import socket

    out = tmp_path / "a.zarr"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "a.zarr.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        with pytest.raises(Locked, match=f"pid {sleeper.pid}"), output_lock(out):
            pass
    finally:
        sleeper.kill()
        sleeper.wait()
    dead = _dead_pid()
    (tmp_path / "a.zarr.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead}))
    with output_lock(out) as stale:
        assert stale["pid"] == dead
        assert json.loads((tmp_path / "a.zarr.lock").read_text())["pid"] == os.getpid()
        with pytest.raises(Locked), output_lock(out):  # held now, also against this process
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # released, no takeover guard left


def test_tile_skips_a_locked_store_and_says_so(cli, cmu, tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    import socket

    out = tmp_path / "out"
    out.mkdir()
    (out / "cmu_small_region.zarr.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
    try:
        r = cli("tile", cmu, "-o", out, "--tile-size", "256", "--json")
    finally:
        sleeper.kill()
        sleeper.wait()
    row = json.loads(r.stdout)[0]
    assert r.exit_code == 0 and row["status"] == "skipped"
    assert row["note"] == f"being written by another process (host {socket.gethostname()}, pid {sleeper.pid})"
    assert not (out / "cmu_small_region.zarr").exists()
    r = cli("tile", cmu, "-o", out, "--tile-size", "256", "--json")  # its holder is dead now
    row = json.loads(r.stdout)[0]
    assert row["status"] == "done" and "took over the lock" in row["note"]
    assert outputs(out) == ["cmu_small_region.zarr"]


def _start(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "histodg", *map(str, args), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _both(args):
    procs = [_start(args) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    return [json.loads(o) for o, _ in outs]


@pytest.fixture
def copies(cmu, tmp_path):
    d = tmp_path / "slides"
    d.mkdir()
    for name in "abcd":
        shutil.copy(cmu, d / f"{name}.svs")
    return d


def test_two_tile_processes_on_one_batch_make_every_store_once(cli, copies, tmp_path):
    args = ["tile", copies, "-o", tmp_path / "both", "--tile-size", "128", "--workers", "1"]
    rows = [r for out in _both(args) for r in out]
    assert sorted(r["name"] for r in rows if r["status"] == "done") == list("abcd")  # each made exactly once
    assert all(r["status"] in ("done", "skipped") for r in rows)
    assert cli("tile", copies / "a.svs", "-o", tmp_path / "ref", "--tile-size", "128").exit_code == 0
    ref = open_store(tmp_path / "ref" / "a.zarr")
    for name in "abcd":
        s = open_store(tmp_path / "both" / f"{name}.zarr")
        np.testing.assert_array_equal(s.images[:], ref.images[:])
        np.testing.assert_array_equal(s.coords, ref.coords)
    assert not [p for p in (tmp_path / "both").glob("*.lock*") if p.name not in BATCH_REPORT]  # output locks gone


def test_two_predict_processes_on_one_batch_make_every_output_once(copies, tmp_path):
    ck = tiny_checkpoint(tmp_path / "ck.pt")
    args = ["predict", ck, copies, "-o", tmp_path / "p", "--tta", "none"]
    rows = [r for out in _both(args) for r in out]
    assert sorted(r["name"] for r in rows if r["status"] == "done") == list("abcd")
    for name in "abcd":
        done = json.loads((tmp_path / "p" / name / "done.json").read_text())
        assert done["name"] == name and (tmp_path / "p" / name / "mask.ome.tiff").is_file()
    assert outputs(tmp_path / "p") == list("abcd")  # no lock left, nothing else
