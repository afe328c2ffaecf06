"""`histodg predict --devices cuda:0,cuda:1,...`: one worker process per device, slides handed
out one at a time from a shared queue (a fast device takes more of them), one result each.

    results = predict_on_devices("best.pt", options, jobs, out_dir, ["cuda:0", "cuda:1"], view)

Each worker loads the checkpoint on its own device and runs `predict_slide` on the slides it
takes, so outputs are the same as from one process (per-output locks keep two workers, or two
batches, off the same slide). A worker that dies (killed, out of memory) fails the slide it had
with one line; the other workers go on with the rest. `--devices cpu,cpu` runs the same code
on a CPU.
"""
from __future__ import annotations

import os
import queue
from dataclasses import replace
from pathlib import Path

from .options import PredictOptions
from .pipeline import PredictResult
from .predictor import PredictError


def parse_devices(text: str) -> list[str]:
    """'cuda:0,cuda:1' or 'cpu,cpu' -> a list; 'all' -> every CUDA GPU of this machine."""
    if text.strip().lower() == "all":
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise PredictError("--devices", "all: no CUDA GPU is available (use --devices cpu,cpu to run on the CPU)")
        return [f"cuda:{i}" for i in range(n)]
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise PredictError("--devices", f"{text!r}: expected a comma-separated list such as cuda:0,cuda:1")
    return devices


def _worker(checkpoint: str, options: PredictOptions, out_dir: str, jobs, results, threads: int) -> None:
    """One device's process: load the model, then predict slides until the queue says stop."""
    import torch

    from ..batch import release_memory
    from ..device import bind_device
    from .pipeline import predict_slide
    from .predictor import Predictor

    torch.set_num_threads(threads)
    try:
        bind_device(options.device)  # this worker's GPU before anything touches CUDA (no context on GPU 0)
        predictor = Predictor.from_checkpoint(checkpoint, options)
    except Exception as exc:  # a model that cannot load on this device: the main process says so
        results.put(("error", None, (options.device, str(exc))))  # (where, why): no string to split again
        return
    while (item := jobs.get()) is not None:
        index, job = item
        results.put(("start", index, os.getpid()))
        results.put(("done", index, predict_slide(predictor, job, Path(out_dir))))
        release_memory()


def predict_on_devices(checkpoint, options: PredictOptions, jobs: list, out_dir, devices: list[str], view) -> list:
    """Predict `jobs` with one worker process per device; results in the order of `jobs`."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    todo, results = ctx.Queue(), ctx.Queue()
    for item in enumerate(jobs):
        todo.put(item)
    for _ in devices:
        todo.put(None)
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    procs = [ctx.Process(target=_worker, args=(str(checkpoint), replace(options, device=d), str(out_dir), todo, results,
                                               threads), daemon=True) for d in devices]
    for p in procs:
        p.start()
    try:
        return _collect(jobs, procs, results, devices, view)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)


def _collect(jobs, procs, results, devices, view) -> list:
    done: dict[int, PredictResult] = {}
    running: dict[int, int] = {}  # job index -> pid of the worker on it
    while len(done) < len(jobs):
        try:
            kind, index, payload = results.get(timeout=1.0)
        except queue.Empty:
            _fail_lost(jobs, procs, running, done, view)
            if not any(p.is_alive() for p in procs) and len(done) < len(jobs):
                _fail_rest(jobs, done, view, "every device worker stopped")
            continue
        if kind == "error":
            where, why = payload
            raise PredictError(where, why)
        if kind == "start":
            running[index] = payload
            view.start(jobs[index], len(jobs))
        else:
            running.pop(index, None)
            done[index] = payload
            view.finish(jobs[index], payload)
    return [done[i] for i in range(len(jobs))]


def _fail_lost(jobs, procs, running, done, view) -> None:
    """Slides whose worker died: failed, with the exit code."""
    dead = {p.pid: p.exitcode for p in procs if not p.is_alive()}
    for index, pid in list(running.items()):
        if pid in dead:
            job = jobs[index]
            r = PredictResult(job.name, str(job.path), "failed",
                              error=f"{job.path}: the device worker predicting it died (exit code {dead[pid]})")
            running.pop(index)
            done[index] = r
            view.finish(job, r)


def _fail_rest(jobs, done, view, why: str) -> None:
    for index, job in enumerate(jobs):
        if index not in done:
            done[index] = r = PredictResult(job.name, str(job.path), "failed", error=f"{job.path}: not predicted: {why}")
            view.finish(job, r)
