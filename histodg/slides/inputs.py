"""INPUTS of `tile` and `predict` -> one job per slide or image.

An input is a slide or image file, a folder of them (top level only), a CSV manifest
(columns `path` and optionally `annotation, organ, scanner, mpp, name`; other columns are kept
as metadata; relative paths are relative to the manifest), or a COSAS-layout folder:
``<task_dir>/<domain>/image/*.png`` with ``mask/`` beside ``image/``. In the COSAS layout each
domain folder names the organ or the scanner of its images (`domain_axis`).
"""
from __future__ import annotations

import csv
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import HistodgError
from ..constants import UNKNOWN
from ..files import read_csv_rows, safe_name

SLIDE_SUFFIXES = {
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm",
    ".png", ".jpg", ".jpeg", ".bmp",
}
MANIFEST_COLUMNS = ("path", "annotation", "organ", "scanner", "mpp", "name")


class InputError(HistodgError):
    """An input path or manifest cannot be used."""


@dataclass(frozen=True)
class SlideJob:
    path: Path
    name: str
    annotation: Path | None = None
    organ: str = UNKNOWN
    scanner: str = UNKNOWN
    mpp: float | None = None
    meta: dict = field(default_factory=dict, hash=False, compare=False)
    problem: str | None = None  # why this input cannot be used: it fails alone, with this line
    region: Path | None = None  # predict --roi: the region file of this slide (slides.roi)


def unusable(path: Path) -> str | None:
    """Why `path` cannot be opened as an input, checked before anything reads it (a FIFO would
    block the batch on open), or None."""
    if path.is_symlink() and not path.exists():
        return f"a dangling symlink (to {os.readlink(path)})"
    if not path.exists():
        return "no such file or folder"
    if not (path.is_file() or path.is_dir()):
        return "not a regular file (a pipe, socket or device)"
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied)"
    return None


def failed_job(path: Path, problem: str) -> SlideJob:
    return SlideJob(path, safe_name(path.stem), problem=problem)


def is_cosas_domain(d: Path) -> bool:
    return (d / "image").is_dir() and (d / "mask").is_dir()


def guess_domain_axis(task_dir: Path) -> str | None:
    name = task_dir.name.lower()
    if "organ" in name or name in ("task1", "task_1", "task-1"):
        return "organ"
    if "scanner" in name or name in ("task2", "task_2", "task-2"):
        return "scanner"
    return None


def cosas_jobs(task_dir: Path, domain_axis: str | None, organ: str, scanner: str) -> list[SlideJob]:
    """Jobs for a COSAS task folder (or a single domain folder)."""
    domains = [task_dir] if is_cosas_domain(task_dir) else sorted(d for d in task_dir.iterdir() if is_cosas_domain(d))
    axis = domain_axis or guess_domain_axis(task_dir if len(domains) > 1 or domains[0] != task_dir else task_dir.parent)
    if axis is None:
        raise InputError(task_dir, "COSAS layout found but its domains could be organs or scanners: pass --domain-axis organ|scanner")
    jobs = []
    for d in domains:
        images = sorted(p for p in (d / "image").iterdir() if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file())
        masks = {p.stem: p for p in (d / "mask").iterdir() if p.is_file()}
        for img in images:
            mask = masks.get(img.stem) or masks.get(f"{img.stem}_mask") or masks.get(f"{img.stem}-mask")
            values = {"organ": organ, "scanner": scanner, axis: d.name}
            jobs.append(
                SlideJob(
                    path=img,
                    name=safe_name(f"{d.name}-{img.stem}"),
                    annotation=mask,
                    organ=values["organ"],
                    scanner=values["scanner"],
                    meta={"domain": d.name, "domain_axis": axis, **({} if mask else {"missing_mask": True})},
                )
            )
    return jobs


def manifest_jobs(path: Path, organ: str, scanner: str) -> list[SlideJob]:
    try:
        rows = read_csv_rows(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"cannot read the manifest ({exc})") from None
    if not rows:
        raise InputError(path, "manifest has no rows")
    header = [h.strip().lower() for h in rows[0].keys() if h]
    if "path" not in header:
        raise InputError(path, f"manifest needs a 'path' column (found: {', '.join(header) or 'none'})")
    jobs = []
    for i, raw in enumerate(rows, start=2):
        try:
            jobs.append(_manifest_row(raw, i, path, organ, scanner))
        except InputError as exc:  # a bad row fails alone
            jobs.append(SlideJob(path, safe_name(f"{path.stem}-line{i}"), problem=exc.reason))
    return jobs


def _manifest_row(raw: dict, i: int, path: Path, organ: str, scanner: str) -> SlideJob:
    if None in raw:  # csv puts the fields past the header under None
        raise InputError(path, f"line {i}: {len(raw[None])} more field(s) than the header (an unquoted comma?)")
    row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}  # short rows: empty fields
    if not row.get("path"):
        raise InputError(path, f"line {i}: empty path")
    base = path.parent
    p = Path(row["path"])
    p = p if p.is_absolute() else base / p
    ann = row.get("annotation")
    ann_path = None
    if ann:
        ann_path = Path(ann) if Path(ann).is_absolute() else base / ann
    mpp = None
    if row.get("mpp"):
        try:
            mpp = float(row["mpp"])
        except ValueError:
            raise InputError(path, f"line {i}: mpp {row['mpp']!r} is not a number") from None
    meta = {k: v for k, v in row.items() if k not in MANIFEST_COLUMNS and k}
    return SlideJob(path=p, name=safe_name(row.get("name") or p.stem), annotation=ann_path,
                    organ=row.get("organ") or organ, scanner=row.get("scanner") or scanner, mpp=mpp, meta=meta)


def resolve_inputs(
    inputs,
    organ: str = UNKNOWN,
    scanner: str = UNKNOWN,
    domain_axis: str | None = None,
    annotations: Path | None = None,
    mpp: float | None = None,
) -> list[SlideJob]:
    """All jobs, named uniquely, in a stable order."""
    jobs: list[SlideJob] = []
    for item in inputs:
        p = Path(item)
        try:
            jobs.extend(_input_jobs(p, organ, scanner, domain_axis))
        except (InputError, OSError) as exc:  # this input fails alone; the others still run
            jobs.append(failed_job(p, _reason(exc)))
    if annotations is not None:
        jobs = attach_annotations(jobs, Path(annotations))
    if mpp is not None:
        jobs = [replace(j, mpp=j.mpp if j.mpp is not None else mpp) for j in jobs]
    return uniquify(jobs)


def _reason(exc: Exception) -> str:
    if isinstance(exc, InputError):
        return exc.reason
    return f"{getattr(exc, 'strerror', None) or exc}"


def _input_jobs(p: Path, organ: str, scanner: str, domain_axis: str | None) -> list[SlideJob]:
    """The jobs of one input path; an unusable input raises InputError."""
    problem = unusable(p)
    if problem:
        raise InputError(p, problem)
    if p.is_file() and p.suffix.lower() == ".csv":
        return manifest_jobs(p, organ, scanner)
    if p.is_dir() and p.suffix.lower() != ".zarr" and (
        is_cosas_domain(p) or any(is_cosas_domain(d) for d in p.iterdir() if d.is_dir())
    ):
        return cosas_jobs(p, domain_axis, organ, scanner)
    if p.is_dir() and not (p.suffix.lower() == ".dcm" or any(p.glob("*.dcm"))):
        # every entry named like a slide is an input, also the ones that cannot be opened (named,
        # not skipped in silence); sub-folders are not
        entries = sorted(f for f in p.iterdir() if f.suffix.lower() in SLIDE_SUFFIXES and not f.is_dir())
        if not entries:
            raise InputError(p, "folder holds no slides or images")
        return [failed_job(f, why) if (why := unusable(f)) else SlideJob(f, safe_name(f.stem), organ=organ, scanner=scanner)
                for f in entries]
    return [SlideJob(p, safe_name(p.stem), organ=organ, scanner=scanner)]


ANNOTATION_SUFFIXES = (".geojson", ".json", ".xml", ".png", ".tif", ".tiff")


def find_annotation(folder: Path, stem: str) -> Path | None:
    """The annotation file named after `stem` in `folder` (`<stem>.geojson`, `<stem>_mask.png`, ...)."""
    for name in (stem, f"{stem}_mask", f"{stem}-mask"):
        for suffix in ANNOTATION_SUFFIXES:
            cand = folder / f"{name}{suffix}"
            if cand.is_file():
                return cand
    return None


def attach_annotations(jobs: list[SlideJob], ann: Path) -> list[SlideJob]:
    """--annotations: one file for one slide, or a folder matched by slide name."""
    return _attach_files(jobs, ann, "annotation", "annotation", "annotations")


def _attach_files(jobs: list[SlideJob], path: Path, field: str, what: str, plural: str) -> list[SlideJob]:
    """Set each job's `field` to its file: `path` itself for one slide, or the file named after the
    slide in the folder `path` (a slide without one keeps what it had)."""
    if path.is_file():
        if len(jobs) != 1:
            raise InputError(path, f"one {what} file for {len(jobs)} slides: pass a folder of {plural} named after the slides")
        one: dict[str, Any] = {field: path}
        return [replace(jobs[0], **one)]
    if not path.is_dir():
        raise InputError(path, f"{what} file or folder not found")
    out = []
    for j in jobs:
        found: dict[str, Any] = {field: find_annotation(path, j.path.stem) or getattr(j, field)}
        out.append(replace(j, **found))
    return out


def uniquify(jobs: list[SlideJob]) -> list[SlideJob]:
    """Give jobs with the same name distinct names (parent folder prefix, then a counter)."""
    counts = Counter(j.name for j in jobs)
    out: list[SlideJob] = []
    seen: Counter[str] = Counter()
    for j in jobs:
        name = j.name
        if counts[name] > 1:
            name = safe_name(f"{j.path.parent.name}-{name}")
        seen[name] += 1
        if seen[name] > 1:
            name = f"{name}-{seen[name]}"
        out.append(replace(j, name=name))
    return out


def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/N' (1-based I) -> (i, n) 0-based; None -> from SLURM_ARRAY_TASK_ID / _COUNT, else (0, 1)."""
    if text is None:
        return slurm_shard()
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ValueError(f"--shard {text!r}: expected I/N with 1 <= I <= N, such as 2/8")
    return int(m.group(1)) - 1, int(m.group(2))


def slurm_shard() -> tuple[int, int]:
    """The shard of this Slurm array task: its position in the array (a stepped array such as
    --array=1-7:2 included), or (0, 1) outside an array. An array given as a list of task IDs
    (--array=1,3: a resubmission of some tasks) says nothing of the array it came from, so it
    is refused: pass --shard I/N."""
    env = os.environ
    if env.get("SLURM_ARRAY_TASK_ID") is None or env.get("SLURM_ARRAY_TASK_COUNT") is None:
        return 0, 1
    tid, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
    first = int(env.get("SLURM_ARRAY_TASK_MIN", tid))
    last = int(env.get("SLURM_ARRAY_TASK_MAX", first + count - 1))
    step = max(int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1), 1)
    if (last - first) // step + 1 != count or (tid - first) % step:
        raise ValueError(f"this Slurm array (tasks {first}-{last}, {count} of them) is not one range: the shard of task "
                         f"{tid} cannot be derived; pass --shard I/N (for example --shard $((SLURM_ARRAY_TASK_ID + 1))/N)")
    return (tid - first) // step, count


def take_shard(jobs: list, shard: tuple[int, int]) -> list:
    i, n = shard
    return jobs[i::n]


def attach_regions(jobs: list[SlideJob], roi: Path) -> list[SlideJob]:
    """predict --roi: one region file for one slide, or a folder matched by slide name (a slide
    without one keeps `region` None and is predicted whole)."""
    return _attach_files(jobs, roi, "region", "region", "region files")
