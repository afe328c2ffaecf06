"""Cut one slide into a patch store: plan the windows, read them in threads, write, resume.

    result = tile_slide(SlideJob(Path("case.svs"), "case", organ="colon"), Path("stores"), TileOptions())

Windows are read by `workers` threads (decoding releases the GIL) ahead of the writer, in plan
order (strips), so neighbouring windows share decoded source tiles in the reader's cache; the
threads also rasterise the masks and compress the patches. The store writer journals its
progress, so a killed run resumes at its last commit.

Artefact QC (`--qc`, `slides.qc`): every window read is checked for pen, blur, folds and glass;
`exclude` (the default) leaves windows with pen, blur or a fold out (glass is only recorded:
`--min-tissue` decides how much tissue a window needs), `flag` keeps them all; the flags of the
stored patches are the store's `qc` array, the counts its `qc_report` attribute.

Bad regions: a window that cannot be decoded (a corrupt tile) is skipped and recorded in the
store's ``bad_windows`` attribute (level-0 x, y and the reason) and in the run summary. If more
than `max_bad_fraction` of the slide's windows fail, the slide fails instead and its store is
removed, so a mostly unreadable slide never looks finished.
"""
from __future__ import annotations

import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .. import HistodgError, SlideError
from ..batch import BatchResult, check_bad_windows, claimed, gc_paused, qc_summary, recorded
from ..files import setting_diffs, source_changed, source_fingerprint
from ..slides.annotation_files import load_annotations
from ..slides.inputs import SlideJob
from ..slides.opening import open_slide
from ..slides.plan import WindowPlan, plan_windows, resolve, resolve_target
from ..slides.qc import WindowQC
from ..slides.window_reader import WindowReader
from ..store import StoreAttrs, StoreError, StoreWriter, read_attrs, store_state
from ..store.schema import REUSE_KEYS
from .settings import TileOptions, TileSettings
from .source_tiles import SourceTiles, tiff_reader

WINDOWS_PER_TASK = 4  # windows per reader task: a few keep the pool's overhead low


@dataclass
class TileResult(BatchResult):
    store: str | None = None
    patches: int = 0
    tissue_area_mm2: float | None = None
    qc: dict | None = None  # --qc: {"windows", "flagged", "excluded", "counts": {flag: n}}


def plan_tiles(slide, settings: TileSettings) -> WindowPlan:
    """The windows `histodg tile` cuts from a slide (pad placement: from the origin, the last
    row and column running past the edge)."""
    target_mpp, scale = resolve_target(slide, settings.mpp, settings.magnification)
    res = resolve(slide, target_mpp, scale, settings.tile_size, settings.mpp_tolerance)
    return plan_windows(slide, res, settings.stride, "pad", settings.tissue_method, settings.min_tissue)


def requested(job: SlideJob, opts: TileOptions) -> dict:
    """The settings a store records and a rerun must match (`schema.REUSE_KEYS`)."""
    s = opts.settings
    values = {"tile_size": s.tile_size, "mpp": s.mpp, "magnification": s.magnification, "overlap": s.overlap,
              "min_tissue": s.min_tissue, "tissue_method": s.tissue_method, "mpp_tolerance": s.mpp_tolerance,
              "organ": job.organ, "scanner": job.scanner, "compression": opts.compression,
              "jpeg_quality": opts.jpeg_quality if opts.compression == "jpeg" else None, "qc": opts.read.qc,
              "mpp_override": job.mpp}
    assert tuple(values) == REUSE_KEYS
    return values


def reuse_mismatch(path: Path, job: SlideJob, opts: TileOptions) -> str | None:
    """Why an existing store cannot be reused for this job (None when it can)."""
    try:
        attrs = StoreAttrs.from_attrs(read_attrs(path)).to_attrs()  # typed: the values as the schema reads them
    except ValueError as exc:
        raise StoreError(path, f"exists with malformed attributes ({exc}): use --overwrite") from None
    wanted = requested(job, opts)
    if attrs.get("magnification") is not None or wanted["magnification"] is not None:
        wanted.pop("mpp")  # with --magnification the stored mpp is the resolved one
    if attrs.get("qc") is None:
        wanted.pop("qc")  # a store made before artefact QC is reused as it is
    # --mpp-override: stores made before it was recorded read as made without one (None). An override equal
    # to the um/px the slide was read at (slide_mpp: the same override, or its own mpp) changes nothing, so
    # such an old store is also kept by a rerun with the override it was made with.
    if wanted["mpp_override"] is not None and attrs.get("slide_mpp") == wanted["mpp_override"]:
        wanted.pop("mpp_override")
    wanted["annotation"] = str(job.annotation.resolve()) if job.annotation else None
    if job.annotation and attrs.get("label_map") is not None:  # stores made before label maps were recorded: not compared
        wanted["label_map"] = dict(opts.labels.mapping)
    if job.annotation and attrs.get("annotation_objects") is not None:
        wanted["annotation_objects"] = list(opts.labels.objects)
    why = setting_diffs(attrs, wanted, attrs.get("source"), job.path,
                        {"annotation": "annotation file differs", "label_map": "the --label map differs",
                         "annotation_objects": "the --objects differ"})
    recorded = attrs.get("annotation_source")
    if job.annotation and recorded and not why and source_changed(recorded, job.annotation):
        why = f"the annotation file {job.annotation.name} changed since the store was made"
    return why


def tile_slide(job: SlideJob, out_dir: Path, opts: TileOptions, progress=None) -> TileResult:
    """Tile one slide into `out_dir/<name>.zarr`. Never raises for bad input: returns a failed result."""
    out = Path(out_dir) / f"{job.name}.zarr"
    result = TileResult(job.name, str(job.path), "failed", store=str(out))
    with recorded(result, job.path, out):
        with claimed(result, job, out):
            if job.meta.get("missing_mask"):
                raise HistodgError(job.path, "no mask beside this image in the COSAS layout (expected mask/<same name>)")
            _tile_locked(job, out, opts, result, progress)
    return result


def _tile_locked(job: SlideJob, out: Path, opts: TileOptions, result: TileResult, progress) -> None:
    """tile_slide's work, with the store's lock held."""
    state = store_state(out)
    reused = state in ("complete", "partial") and not opts.overwrite
    opts = opts.for_source(job.path, _stored_compression(out) if reused else None)
    if reused:
        why = reuse_mismatch(out, job, opts)
        if why:
            raise StoreError(out, f"exists with other settings ({why}): use --overwrite or another output folder")
        if state == "complete":
            a = StoreAttrs.from_attrs(read_attrs(out))
            result.status, result.patches = "skipped", int(a.n_patches or 0)
            result.tissue_area_mm2, result.bad_windows = a.tissue_area_mm2, len(a.bad_windows)
            result.qc = qc_summary(a.qc_report)
            return
    _tile(job, out, opts, state, result, progress)
    result.status = "done"


def _stored_compression(out: Path) -> str | None:
    try:
        return StoreAttrs.from_attrs(read_attrs(out)).compression  # stores older than the field: lz4
    except (ValueError, OSError, StoreError):
        return None  # reuse_mismatch names what is wrong with it


def _store_attrs(job: SlideJob, opts: TileOptions, slide, plan: WindowPlan, ann) -> StoreAttrs:
    res, mpp0 = plan.resolution, slide.mpp
    return StoreAttrs(**{
        **requested(job, opts),
        "mpp": res.target_mpp,
        "mpp_actual": mpp0 * res.level0_per_px if mpp0 else None,
        "level0_size": res.read_size * res.level_downsample,
        "read_level": res.level,
        "read_size": res.read_size,
        "source": source_fingerprint(job.path),
        "annotation": str(job.annotation.resolve()) if job.annotation else None,
        "annotation_source": source_fingerprint(job.annotation) if job.annotation else None,
        "label_map": dict(opts.labels.mapping) if job.annotation else None,
        "annotation_objects": list(opts.labels.objects) if job.annotation else None,
        "labels": opts.labels.label_names() if ann is not None else None,
        "backend": slide.backend,
        "slide_mpp": mpp0,
        "slide_dimensions": list(slide.dimensions),
        "windows_total": plan.total_windows,
        "windows_planned": len(plan),
        "meta": dict(job.meta),
        "annotations_skipped": dict(ann.skipped) if getattr(ann, "skipped", None) else None,
    })


def _tile(job: SlideJob, out: Path, opts: TileOptions, state: str, result: TileResult, progress) -> None:
    with open_slide(job.path, opts.read.backend, mpp=job.mpp) as slide:
        plan = plan_tiles(slide, opts.settings)
        ann = load_annotations(job.annotation, slide.dimensions, opts.labels) if job.annotation else None
        mpp0 = slide.mpp
        thumb_px_um = plan.thumbnail.downsample * mpp0 if mpp0 else None
        tissue_mm2 = float(plan.tissue_mask.sum() * thumb_px_um**2 / 1e6) if thumb_px_um else None
        writer = StoreWriter.resume(out) if state == "partial" and not opts.overwrite else None
        if writer is not None and writer.capacity == len(plan):
            result.resumed = True
        else:
            writer = StoreWriter(out, _store_attrs(job, opts, slide, plan, ann), len(plan), ann is not None).create()
        if progress:
            progress(total=len(plan), done=writer.plan_done)
        source = SourceTiles(slide, plan) if opts.compression == "jpeg" else None
        reader = tiff_reader(slide)
        if reader is not None and opts.settings.overlap == 0:
            reader.cache_whole_tiles = False  # windows never share a tile: caching one only costs memory
        qc = WindowQC.from_plan(slide, plan) if opts.read.qc != "off" else None
        read = PatchReader(slide, plan, ann, writer, source, qc, exclude=opts.read.excludes)
        _read_and_write(read, writer, opts.read.workers, progress)
        n_bad = len(writer.bad)
        try:
            check_bad_windows(job.path, writer.bad, len(plan), opts.read.max_bad_fraction)
        except SlideError:
            shutil.rmtree(out, ignore_errors=True)  # a mostly unreadable slide never looks finished
            raise
        extra = {"tissue_area_mm2": tissue_mm2}
        if source is not None and not source.ok:
            extra["source_tiles_not_copied"] = source.why
        if qc is not None:
            extra["qc_thresholds"] = qc.describe()
        writer.finish(extra)
        result.patches, result.bad_windows, result.tissue_area_mm2 = writer.count, n_bad, tissue_mm2
        result.qc = qc_summary(writer.attrs.qc_report)


class PatchReader:
    """Reads (`slides.window_reader`), rasterises and compresses windows of a plan (called from the
    reader threads)."""

    def __init__(self, slide, plan: WindowPlan, ann, writer: StoreWriter, source: SourceTiles | None,
                 qc: WindowQC | None = None, exclude: bool = True):
        self.plan, self.ann, self.writer, self.qc = plan, ann, writer, qc
        self.reader = WindowReader(slide, plan, qc, exclude, source)

    def __call__(self, i0: int, i1: int) -> list[tuple[int, tuple | None, str | None, bool, int]]:
        """(index, encoded patch or None, reason it failed or None, copied, QC flags) of windows
        i0..i1-1; a window --qc exclude leaves out has neither a patch nor a reason."""
        res, out = self.plan.resolution, []
        for i in range(i0, i1):
            w = self.reader.read(i)
            if w.error is not None or w.excluded:
                out.append((i, None, w.error, False, w.flags))
                continue
            xy = self.plan.level0_xy[i]
            mask = self.ann.rasterize(float(xy[0]), float(xy[1]), res.level0_per_px, res.tile) if self.ann is not None else None
            out.append((i, self.writer.encode(w.image, mask, w.raw), None, w.raw is not None, w.flags))
        return out


def _read_and_write(read: PatchReader, writer: StoreWriter, workers: int, progress) -> None:
    """Submit window batches ahead of the writer and hand them to it in plan order."""
    plan, start, n = read.plan, writer.plan_done, len(read.plan)
    workers, step = max(1, int(workers)), WINDOWS_PER_TASK
    depth = writer.shard // step + 4 * workers  # keep readers busy while a shard is written
    pending: deque = deque()
    nxt = start
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="histodg-read") as pool, gc_paused():
        while nxt < n or pending:
            while nxt < n and len(pending) < depth:
                pending.append(pool.submit(read, nxt, min(nxt + step, n)))
                nxt += step
            for i, encoded, err, copied, flags in pending.popleft().result():
                if err is not None:
                    writer.add_bad(plan.level0_xy[i], err)
                    continue
                if read.qc is not None:
                    writer.add_qc(flags, kept=encoded is not None)
                if encoded is not None:
                    writer.append(encoded, plan.level0_xy[i], plan.tissue[i], copied, plan_done=i + 1, qc=flags)
                if progress:
                    progress(advance=1)
    writer.flush()
    writer.commit(n)
