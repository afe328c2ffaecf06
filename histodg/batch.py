"""The batch loop of `tile` and `predict`: one result per input, a bad input fails alone.

    results = run_jobs(jobs, lambda job, progress: tile_slide(job, out, opts, progress), view)

`run_one(job, progress)` returns a `BatchResult` and never raises for bad input: it runs its
work inside `recorded(result, path)`, which turns a `HistodgError` or an `OSError` into the
result's one-line `error` and records the time taken, and holds `output_lock(out)` while it
writes an output (another process's lock makes the input "skipped", with a note). A `view` (the CLI's progress bars, or
nothing) is told when each input starts, how far it got and how it ended.
"""
from __future__ import annotations

import errno
import time
from contextlib import contextmanager
from dataclasses import dataclass

from . import HistodgError
from .locks import Locked, held_by, output_lock, stale_note


@dataclass
class BatchResult:
    """One input of a batch: what happened to it. Commands add their own counts and paths."""

    name: str
    source: str
    status: str  # "done" | "skipped" | "failed"
    bad_windows: int = 0
    seconds: float = 0.0
    error: str | None = None  # one line naming the file and the problem
    resumed: bool = False  # an unfinished output was found and finished or redone
    note: str | None = None  # what the summary says of an input that did not fail (a lock, ...)


QC_SUMMARY_KEYS = ("windows", "flagged", "excluded", "counts", "area_mm2")  # what a result carries of --qc


def qc_summary(report: dict | None) -> dict | None:
    """The part of a QC report (a store's qc_report, done.json's qc) a batch result and its summary row carry."""
    return None if not report else {k: report[k] for k in QC_SUMMARY_KEYS if k in report}


# errors of writing, not of the input: the line names the output
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def error_line(exc: Exception, path, out=None) -> str:
    """The one line a bad input gives: `<path>: <reason>`; for a full disk (or another write
    error that names no file) `<out>: <reason> (writing the output of <path>)`."""
    if isinstance(exc, HistodgError):
        return str(exc)
    reason = getattr(exc, "strerror", None) or exc
    if getattr(exc, "errno", None) in WRITE_ERRNOS and out is not None:
        return f"{exc.filename or out}: {reason} (writing the output of {path})"
    return f"{exc.filename or path}: {reason}" if isinstance(exc, OSError) else f"{path}: {reason}"


@contextmanager
def recorded(result: BatchResult, path, out=None):
    """Run one input's work (its output going to `out`): bad input becomes `result.error`
    (status stays "failed" unless the work set it), and `result.seconds` is the time taken,
    whatever happened."""
    t0 = time.perf_counter()
    try:
        yield result
    except Locked as exc:  # another process is making this output: not a failure, not ours to do
        result.status, result.note = "skipped", held_by(exc.holder)
    except (HistodgError, OSError) as exc:
        result.status, result.error = "failed", error_line(exc, path, out)
    finally:
        result.seconds = time.perf_counter() - t0


@contextmanager
def collected(errors: list[str], path):
    """Run one item's work; a bad input adds its one line to `errors` instead of raising."""
    try:
        yield
    except (HistodgError, OSError) as exc:
        errors.append(error_line(exc, path))


def bad_window(xy, reason: str) -> dict:
    """How a window that could not be read is recorded (stores' bad_windows, done.json)."""
    return {"x": int(xy[0]), "y": int(xy[1]), "reason": reason}


def check_bad_windows(path, bad: list[dict], total: int, max_fraction: float) -> None:
    """Fail the slide (SlideError) when more than `max_fraction` of its `total` windows are bad."""
    from . import SlideError

    if total and len(bad) > max_fraction * total:
        raise SlideError(path, f"{len(bad)} of {total} windows ({len(bad) / total:.0%}) cannot be decoded, more than "
                               f"--max-bad-fraction {max_fraction:g}; first: {bad[0]['reason']}")


class QuietView:
    """A view that shows nothing (library use)."""

    def start(self, job, total_jobs: int) -> None:
        pass

    def progress(self, total=None, done=None, advance=None) -> None:
        pass

    def finish(self, job, result: BatchResult) -> None:
        pass


@contextmanager
def claimed(result: BatchResult, job, out):
    """Start an input's work on its output `out`: an input that could not be resolved fails here
    (`job.problem`), and the output's lock is held inside (`output_lock`; a lock taken over from
    a dead process goes into `result.note`)."""
    if job.problem:
        raise HistodgError(job.path, job.problem)
    with output_lock(out) as stale:
        result.note = stale_note(stale) or result.note
        yield


def run_jobs(jobs, run_one, view=None) -> list[BatchResult]:
    """Every job in order, each through `run_one(job, view.progress)`; one result each."""
    view = view or QuietView()
    results = []
    for job in jobs:
        view.start(job, len(jobs))
        result = run_one(job, view.progress)
        release_memory()
        results.append(result)
        view.finish(job, result)
    return results


def release_memory() -> None:
    """Hand what a finished slide freed back to the system, so a batch's memory stays flat.

    glibc keeps freed heap pages of the reader threads' arenas mapped; over a batch of slides
    that looked like a leak (`predict`: resident memory 1029 -> 1352 MB over 20 slides, and its
    peak 1887 -> 2311 MB; with this call 857 -> 878 MB, peaks flat; BENCHMARKS.md). A cyclic
    collection first, so what only a cycle held is freed too. Not glibc (macOS, musl): the
    collection only."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def gc_paused():
    """No cyclic garbage collection while windows stream through a slide (the loops make no cycles).

    A full collection walks every object of the process (zarr, numpy, torch ...) holding the GIL,
    which stalls the reader threads; on 2 cores it cost more than writing the store.
    """
    import gc

    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
