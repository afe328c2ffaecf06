"""The window pipeline of one slide: reader threads -> model -> stitching, overlapped.

`workers` reader threads fill uint8 batch buffers (pinned on CUDA) ahead of the model; the main
thread copies a batch to the device (non-blocking), runs the model (normalisation, autocast and
the Gaussian weights on the device) and stitches the previous batch while the device works on
this one. A window that cannot be read is skipped and recorded; more than `max_bad_fraction`
of them fails the slide. With artefact QC (`--qc`, `slides.qc`) the reader threads flag each
window; under `exclude` a window with pen, blur or a fold is not stitched (glass is only
counted: the plan runs every window touching tissue, and a mostly empty one may hold the edge
of a tumour).
"""
from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from ..batch import bad_window, check_bad_windows, gc_paused
from ..constants import qc_flag_names
from ..qc_report import QCReport
from ..slides.plan import WindowPlan
from ..slides.window_reader import WindowReader
from .stitching import ChunkAccumulator


class WindowRunner:
    """Runs `windows` (indices into `plan`) through `predictor` into `acc`."""

    def __init__(self, predictor, slide, plan: WindowPlan, count: int, acc: ChunkAccumulator, progress=None, qc=None):
        self.pred, self.slide, self.plan, self.acc, self.progress = predictor, slide, plan, acc, progress
        self.qc = qc
        self.reader = WindowReader(slide, plan, qc, predictor.options.read.excludes)
        self.flags: dict[int, int] = {}  # window -> its QC flags (flagged windows only)
        self.left_out: set[int] = set()  # windows --qc exclude leaves out (the reader says which)
        o = predictor.options
        self.n, self.batch_size, self.workers = count, o.batch_size, o.read.workers
        self.batches = [(i, min(i + o.batch_size, count)) for i in range(0, count, o.batch_size)]
        self.per_task = max(1, math.ceil(o.batch_size / o.read.workers))
        self.bad: list[dict] = []
        self.clock = {"reading": 0.0, "waiting_for_reads": 0.0, "model": 0.0, "stitching": 0.0}
        n_buffers = 2 + max(2, o.read.workers)
        self.free = deque(predictor.new_batch() for _ in range(min(n_buffers, len(self.batches) + 1)))
        self.inflight: deque = deque()
        self.next_batch = 0

    # -- reader threads --------------------------------------------------------------------------
    def _read(self, buf_np, i0: int, i1: int, base: int):
        t = time.perf_counter()
        failed, flags, left_out = [], {}, []
        for i in range(i0, i1):
            w = self.reader.read(i)
            if w.error is not None:
                buf_np[i - base] = 255
                failed.append((i, w.error))
                continue
            buf_np[i - base] = w.image
            if w.flags:
                flags[i] = w.flags
            if w.excluded:
                left_out.append(i)
        return failed, flags, left_out, time.perf_counter() - t

    def _fill(self, pool) -> None:
        """Hand free buffers to the readers for the next batches."""
        while self.free and self.next_batch < len(self.batches):
            buf = self.free.popleft()
            b0, b1 = self.batches[self.next_batch]
            arr = buf.numpy()
            futs = [pool.submit(self._read, arr, s, min(s + self.per_task, b1), b0) for s in range(b0, b1, self.per_task)]
            self.inflight.append((self.next_batch, buf, futs))
            self.next_batch += 1

    def _collect_reads(self, futs) -> dict[int, str]:
        t = time.perf_counter()
        failed = {}
        for fut in futs:
            errs, flags, left_out, secs = fut.result()
            self.clock["reading"] += secs
            failed.update(errs)
            self.flags.update(flags)
            self.left_out.update(left_out)
        self.clock["waiting_for_reads"] += time.perf_counter() - t
        for i, reason in failed.items():
            self.bad.append(bad_window(self.plan.level0_xy[i], reason))
        check_bad_windows(self.slide.path, self.bad, self.n, self.pred.options.read.max_bad_fraction)
        return failed

    def excluded(self, i: int) -> bool:
        """Whether --qc exclude leaves window i out of the map."""
        return i in self.left_out

    def qc_report(self, examined: int) -> tuple[QCReport, list[int]] | None:
        """What the QC found on the `examined` windows, and the windows it left out (plan indices);
        None with QC off."""
        if self.qc is None:
            return None
        report = QCReport.of_windows(examined, ((f, not self.excluded(i)) for i, f in self.flags.items()),
                                     self.qc.describe())
        return report, sorted(self.left_out)

    def excluded_list(self, excluded: list[int]) -> list[dict]:
        """done.json's list of the first 100 windows QC left out: level-0 x, y and their flags."""
        xy = self.plan.level0_xy
        return [{"x": int(xy[i][0]), "y": int(xy[i][1]), "flags": qc_flag_names(self.flags[i])} for i in excluded[:100]]

    # -- the model and stitching -----------------------------------------------------------------
    def _launch(self, bno: int, buf):
        """Start the model on a batch; returns its output's copy to the host, in flight (`HostCopy`)."""
        b0, b1 = self.batches[bno]
        t = time.perf_counter()
        copy = self.pred.transfers.to_host(self.pred.weighted(buf[: b1 - b0]))
        self.clock["model"] += time.perf_counter() - t
        return copy

    def _stitch(self, bno: int, buf, copy, failed: dict) -> None:
        t = time.perf_counter()
        host = copy.wait()  # the output has landed: only now is it read, and the input buffer reused
        self.clock["model"] += time.perf_counter() - t
        t = time.perf_counter()
        b0, b1 = self.batches[bno]
        res, T, g = host.numpy(), self.pred.tile, self.pred.gaussian
        for i in range(b0, b1):
            x, y = (int(v) for v in self.plan.windows[i])
            if i in failed or self.excluded(i):
                self.acc.skip(x, y, (T, T))
            else:
                self.acc.add(x, y, res[i - b0], g)
        self.clock["stitching"] += time.perf_counter() - t
        self.free.append(buf)
        if self.progress:
            self.progress(advance=b1 - b0)

    def run(self) -> list[dict]:
        """Every window read, predicted and stitched; returns the unreadable ones (level-0 x, y, reason)."""
        pending = None
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="histodg-predict") as pool, gc_paused():
            self._fill(pool)
            while self.inflight:
                bno, buf, futs = self.inflight.popleft()
                failed = self._collect_reads(futs)
                copy = self._launch(bno, buf)
                if pending is not None:
                    self._stitch(*pending)
                pending = (bno, buf, copy, failed)
                self._fill(pool)
            if pending is not None:
                self._stitch(*pending)
        return self.bad
