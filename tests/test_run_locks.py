"""One writer per output folder, and locks that heal: a second writer refused while the first
lives, locks a crash or a kill left behind taken over, locks that appear whole or not at all, a
SIGTERM that ends a run through its `finally`. Each case failed before histodg guarded against it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from helpers import TINY_TRAIN as TRAIN
from helpers import make_domains, make_store, tiny_checkpoint, tissue_field


def _aged(lock: Path, text: str, seconds: float = 3600) -> None:
    import os
    import time

    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(text)
    os.utime(lock, (time.time() - seconds, time.time() - seconds))


@pytest.fixture
def live_holder():
    """A live process of this host, as a lock names it."""
    import subprocess
    import sys

    from histodg.locks import _boot_id, _start_time

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    import socket

    yield {"host": socket.gethostname(), "pid": p.pid, "start": _start_time(p.pid), "boot": _boot_id()}
    p.kill()
    p.wait()


def held(folder: Path, holder: dict) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.with_name(folder.name + ".lock").write_text(json.dumps(holder))


def test_a_second_train_into_a_run_folder_is_refused_while_the_first_runs(cli, tmp_path):
    import os
    import subprocess
    import sys
    import time

    stores = make_domains(tmp_path / "stores", organs=("colon",), scanners=("s1", "s2"), stores_per_domain=1, n=4)
    run = tmp_path / "run"
    args = ["train", stores, "-o", run, *TRAIN[:-2], "--steps", "400", "--domains", "scanner"]
    first = subprocess.Popen([sys.executable, "-m", "histodg", *map(str, args)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (run / "config.json").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, first.stderr.read().decode()
        r = cli("train", stores, "-o", run, *TRAIN, "--domains", "scanner", "--overwrite")
    finally:
        first.kill()
        first.wait()
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.strip() == (f"error: {run}: being written by another process (host {__import__('socket').gethostname()}, "
                                f"pid {first.pid}): wait for it to finish, or write elsewhere")


def test_adapt_into_a_folder_another_adapt_writes_is_refused(cli, tmp_path, live_holder):
    ck = tiny_checkpoint(tmp_path / "ck.pt", mpp=1.0)
    make_store(tmp_path / "src" / "a.zarr", n=2)
    make_store(tmp_path / "tgt" / "b.zarr", n=2, masks=False)
    held(tmp_path / "run", live_holder)
    r = cli("adapt", ck, "--source", tmp_path / "src", "--target", tmp_path / "tgt", "-o", tmp_path / "run",
            "--steps", "1", "--device", "cpu")
    assert r.exit_code == 1 and f"pid {live_holder['pid']}): wait for it to finish" in r.stderr
    assert not (tmp_path / "run").exists()


def test_synth_into_a_folder_another_synth_writes_is_refused(cli, tmp_path, live_holder):
    held(tmp_path / "data", live_holder)
    r = cli("synth", tmp_path / "data", "--cases", "1")
    assert r.exit_code == 1 and f"pid {live_holder['pid']}): wait for it to finish" in r.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("text", ["", '{"host": "x", "pi'], ids=["empty", "half-written"])
def test_an_unreadable_lock_left_by_a_crash_is_taken_over(tmp_path, text):
    from histodg.batch import output_lock

    _aged(tmp_path / "a.zarr.lock", text)
    with output_lock(tmp_path / "a.zarr") as stale:
        assert stale == {"unreadable": True}
    assert not (tmp_path / "a.zarr.lock").exists()


def test_a_recent_unreadable_lock_may_be_a_writer_of_older_histodg_and_is_left(tmp_path):
    from histodg.locks import Locked, output_lock

    (tmp_path / "a.zarr.lock").write_text("")
    with pytest.raises(Locked, match="unreadable and recent"), output_lock(tmp_path / "a.zarr"):
        pass


def test_a_lock_whose_pid_now_belongs_to_another_process_is_taken_over(tmp_path, live_holder):
    from histodg.batch import output_lock

    held(tmp_path / "a.zarr", {**live_holder, "start": "1"})  # the pid lives, but started later than the holder did
    with output_lock(tmp_path / "a.zarr") as stale:
        assert stale["pid"] == live_holder["pid"]
    held(tmp_path / "b.zarr", {**live_holder, "boot": "another-boot"})  # written before the machine last started
    with output_lock(tmp_path / "b.zarr") as stale:
        assert stale["pid"] == live_holder["pid"]


def test_a_lock_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    import histodg.locks as locks

    def crash(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(locks.os, "link", crash)  # killed between writing the holder and putting the lock in place
    with pytest.raises(KeyboardInterrupt), locks.output_lock(tmp_path / "a.zarr"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no lock, no temporary


def test_tile_reports_a_stale_lock_taken_over_in_its_row(cli, tmp_path):
    Image.fromarray(tissue_field(128, 128)).save(tmp_path / "img.png")
    _aged(tmp_path / "out" / "img.zarr.lock", "")
    r = cli("tile", tmp_path / "img.png", "-o", tmp_path / "out", "--mpp-override", "1", "--tile-size", "64", "--json")
    row = json.loads(r.stdout)[0]
    assert r.exit_code == 0 and row["status"] == "done" and row["note"] == "took over a lock left unreadable by a crash"


def test_a_predict_killed_early_leaves_nothing_that_stops_the_rerun(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    ck = tiny_checkpoint(tmp_path / "ck.pt", mpp=1.0)
    Image.fromarray(tissue_field(512, 512)).save(tmp_path / "img.png")
    args = [sys.executable, "-m", "histodg", "predict", ck, tmp_path / "img.png", "--mpp-override", "1", "-o",
            tmp_path / "p", "--device", "cpu", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not (tmp_path / "p" / "img.lock").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)  # a fraction of a second into the slide
    first.wait()
    again = subprocess.run(list(map(str, args)), capture_output=True, text=True, env=env, timeout=300)
    row = json.loads(again.stdout)[0]
    assert again.returncode == 0 and row["status"] == "done", again.stderr
    assert not (tmp_path / "p" / "img.lock").exists()


def test_the_lock_of_dot_is_named_from_the_resolved_folder(tmp_path, monkeypatch):
    from histodg.locks import lock_path, output_lock

    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    assert lock_path(Path(".")) == tmp_path / "run.lock" == lock_path(tmp_path / "x" / ".." / "run")
    assert lock_path(Path("/")) == Path("/.histodg.lock")
    with output_lock(Path(".")):
        assert (tmp_path / "run.lock").is_file()


def test_a_filesystem_without_hard_links_still_gets_whole_locks(tmp_path, monkeypatch):
    import errno
    import os

    import histodg.locks as locks

    def no_links(*a):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(locks.os, "link", no_links)
    with locks.output_lock(tmp_path / "a.zarr") as stale:
        assert stale is None and json.loads((tmp_path / "a.zarr.lock").read_text())["pid"] == os.getpid()
        with pytest.raises(locks.Locked):
            with locks.output_lock(tmp_path / "a.zarr"):
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sigterm_ends_a_run_through_its_finally_and_leaves_no_lock(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    stores = make_domains(tmp_path / "stores", organs=("colon",), scanners=("s1", "s2"), stores_per_domain=1, n=4)
    run = tmp_path / "run"
    args = [sys.executable, "-m", "histodg", "train", stores, "-o", run, *TRAIN[:-2], "--steps", "400", "--domains", "scanner"]
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (run / "config.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "run.lock").exists()
    proc.send_signal(signal.SIGTERM)  # Slurm's time limit, scancel
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "stopped (SIGTERM); rerun the same command to resume" in err, err[-2000:]
    assert "Traceback" not in err and not (tmp_path / "run.lock").exists()
