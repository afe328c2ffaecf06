"""`histodg predict --devices`: one worker process per device, slides handed out as they finish."""
from __future__ import annotations

import json
import queue
import shutil

import numpy as np
import pytest
import zarr

from helpers import tiny_checkpoint
from histodg.inference import PredictError
from histodg.inference.devices import _collect, parse_devices
from histodg.slides.inputs import SlideJob


@pytest.mark.slow
def test_two_cpu_workers_give_the_outputs_of_one_process(cli, cmu, tmp_path):
    ck = tiny_checkpoint(tmp_path / "ck.pt")
    d = tmp_path / "slides"
    d.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(cmu, d / f"{name}.svs")
    (d / "broken.svs").write_bytes(b"not a slide")
    r = cli("predict", ck, d, "-o", tmp_path / "two", "--devices", "cpu,cpu", "--json", "--tta", "none")
    assert r.exit_code == 1  # the broken input fails alone
    rows = {x["name"]: x for x in json.loads(r.stdout)}
    assert {n: rows[n]["status"] for n in rows} == {"a": "done", "b": "done", "c": "done", "broken": "failed"}
    assert rows["broken"]["error"].startswith(str(d / "broken.svs"))
    assert cli("predict", ck, d / "a.svs", "-o", tmp_path / "one", "--device", "cpu", "--tta", "none").exit_code == 0
    ref = zarr.open_array(str(tmp_path / "one" / "a" / "prob.zarr"), mode="r")[:].astype(int)
    for name in ("a", "b", "c"):
        got = zarr.open_array(str(tmp_path / "two" / name / "prob.zarr"), mode="r")[:].astype(int)
        # the same model on the same windows; workers run fewer torch threads, so float sums are
        # ordered differently: at most 1 grey level (of 255) apart, on a few pixels
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 1 and (got != ref).mean() < 0.01
        assert json.loads((tmp_path / "two" / name / "done.json").read_text())["settings"]["device"] == "cpu"


def test_device_lists():
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"] and parse_devices("cpu,cpu") == ["cpu", "cpu"]
    with pytest.raises(PredictError, match="expected a comma-separated list"):
        parse_devices(" , ")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(PredictError, match="no CUDA GPU"):
            parse_devices("all")


class _Proc:
    def __init__(self, pid, alive=True, exitcode=None):
        self.pid, self._alive, self.exitcode = pid, alive, exitcode

    def is_alive(self):
        return self._alive


class _View:
    def __init__(self):
        self.finished = []

    def start(self, job, total):
        pass

    def finish(self, job, res):
        self.finished.append((job.name, res.status, res.error))


def test_a_worker_that_dies_fails_its_slide_and_the_others_go_on(tmp_path):
    from histodg.inference.pipeline import PredictResult

    jobs = [SlideJob(tmp_path / f"{n}.svs", n) for n in "abc"]
    procs = [_Proc(101), _Proc(102, alive=False, exitcode=-9)]  # 102 was killed while on slide b
    results = queue.Queue()
    results.put(("start", 0, 101))
    results.put(("start", 1, 102))
    results.put(("done", 0, PredictResult("a", "a.svs", "done")))
    results.put(("start", 2, 101))
    results.put(("done", 2, PredictResult("c", "c.svs", "done")))
    view = _View()
    out = _collect(jobs, procs, results, ["cpu", "cpu"], view)
    assert [r.status for r in out] == ["done", "failed", "done"]
    assert out[1].error == f"{jobs[1].path}: the device worker predicting it died (exit code -9)"
    assert sorted(v[0] for v in view.finished) == ["a", "b", "c"]


def test_a_worker_that_cannot_load_the_model_stops_the_batch_with_its_device_and_reason(tmp_path):
    jobs = [SlideJob(tmp_path / "a.svs", "a")]
    results = queue.Queue()
    results.put(("error", None, ("cuda:1", "CUDA out of memory: tried to allocate 2.00 GiB")))
    with pytest.raises(PredictError) as info:
        _collect(jobs, [_Proc(101)], results, ["cuda:1"], _View())
    assert str(info.value) == "cuda:1: CUDA out of memory: tried to allocate 2.00 GiB"
