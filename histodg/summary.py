"""`OUT_DIR/summary.csv` and `summary.json`: the batch report every batch command leaves on disk.

    summary = BatchSummary(out_dir, "predict")
    summary.add(result)            # after each input: the files are rewritten, so a killed batch keeps its rows

One row per input (the command, name, status, error line, counts, areas, seconds, when it
finished), failed inputs first, then by name. A rerun updates the rows it redid: an input that
ran (done or failed) replaces its row; one that was skipped keeps the row of the run that made
its output (its counts and times), and is added only when there is none. Several processes
(Slurm array tasks) writing into one OUT_DIR take turns through a lock file, so no row is lost.
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from . import HistodgError
from .files import NO_FOLLOW, csv_cell, read_json, write_json_atomic, write_text_atomic

JSON_NAME, CSV_NAME = "summary.json", "summary.csv"
# the first columns, in this order; any other field of a command's result follows
COLUMNS = ("command", "name", "status", "error", "note", "source", "patches", "windows", "tissue_area_mm2",
           "tumor_area_mm2", "bad_windows", "resumed", "seconds", "finished")


def result_row(command: str, result) -> dict:
    """A result as a flat row: nested values (timings) as JSON text, seconds rounded."""
    row = {"command": command, **asdict(result), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    qc = row.pop("qc", None)
    if isinstance(qc, dict):  # --qc counts as columns of their own: qc_excluded, qc_pen, ...
        row.update({f"qc_{k}": qc.get(k) for k in ("windows", "flagged", "excluded", "area_mm2") if k in qc})
        row.update({f"qc_{k}": int(v) for k, v in (qc.get("counts") or {}).items()})
    areas = row.pop("class_areas_mm2", None)
    if isinstance(areas, dict):  # a multi-class model's classes: area_mm2_<name> columns
        row.update({f"area_mm2_{name}": value for name, value in areas.items()})
    shift = row.pop("shift", None)
    if isinstance(shift, dict):  # the domain-shift score (predict): shift_score, shift_warn, ...
        row.update({f"shift_{k}": shift.get(k) for k in ("score", "warn", "nearest", "percentile")})
    row["seconds"] = round(float(row.get("seconds") or 0), 2)
    return {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for k, v in row.items()}


def ordered(rows: list[dict]) -> list[dict]:
    """Failed inputs first, then by command and name."""
    return sorted(rows, key=lambda r: (r.get("status") != "failed", str(r.get("command")), str(r.get("name"))))


def merged(old: list[dict], new: dict) -> list[dict]:
    """`old` with `new` in: it replaces the row of the same input unless it was only skipped."""
    key = (new["command"], new["name"])
    rows = [r for r in old if (r.get("command"), r.get("name")) != key]
    previous = next((r for r in old if (r.get("command"), r.get("name")) == key), None)
    keep = previous is not None and new["status"] == "skipped"
    return ordered(rows + [previous if keep else new])


def read_rows(out_dir) -> list[dict]:
    """The rows of `OUT_DIR/summary.json` ([] when there is none or it cannot be read)."""
    try:
        rows = read_json(Path(out_dir) / JSON_NAME)
    except (OSError, ValueError):
        return []
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def csv_text(rows: list[dict]) -> str:
    fields = list(COLUMNS) + sorted({k for r in rows for k in r} - set(COLUMNS))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else csv_cell(r.get(k)) for k in fields})
    return buf.getvalue()


@contextmanager
def _turn(out_dir: Path):
    """Hold OUT_DIR/.summary.lock (a POSIX lock: released when the process dies).

    The empty lock file stays behind on purpose: removing it would let a process that still waits
    on the old file and one that opens a new file both hold "the" lock at once."""
    # never through a link planted at that name (ELOOP); an OSError here is the summary's, not the batch's
    fd = os.open(out_dir / ".summary.lock", os.O_RDWR | os.O_CREAT | NO_FOLLOW, 0o666)
    with os.fdopen(fd, "r+") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


class BatchSummary:
    """The summary files of one batch, updated after each input."""

    def __init__(self, out_dir, command: str):
        self.out_dir, self.command = Path(out_dir), command
        lock = self.out_dir / ".summary.lock"
        if lock.is_symlink():  # refused before the batch starts, not after its first input
            raise HistodgError(lock, "is a link; histodg never writes through one: remove it")

    def add(self, result) -> list[dict]:
        """Record one input's result; returns every row of the summary."""
        with _turn(self.out_dir):
            rows = merged(read_rows(self.out_dir), result_row(self.command, result))
            write_json_atomic(self.out_dir / JSON_NAME, rows)
            write_text_atomic(self.out_dir / CSV_NAME, csv_text(rows))
        return rows

    def rows(self) -> list[dict]:
        return read_rows(self.out_dir)
