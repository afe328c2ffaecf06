"""Whole-slide inference of one slide: plan -> windows -> stitched probability -> outputs -> done.json.

    result = predict_slide(predictor, SlideJob(Path("case.svs"), "case"), Path("preds"))

Geometry (`plan_prediction`): the model sees `tile` px windows at its resolution; windows cover
the slide flush with its right and bottom edges at most `tile - overlap` px apart, and only
windows that touch tissue are run (`slides.plan`, the same plan `histodg tile` uses). Stitching:
`stitching.ChunkAccumulator`, bounded memory, chunks finished in strip order straight into
``prob.zarr`` (`prob_map`). Then `outputs` writes the mask, GeoJSON and overlay, and `done`
the record, last. A folder without done.json is unfinished and is redone.
"""
from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..batch import BatchResult, claimed, qc_summary, recorded
from ..slides.backends import ImageSlide
from ..slides.base import Slide
from ..slides.inputs import SlideJob
from ..slides.opening import open_slide
from ..slides.plan import STRIP_WINDOWS, WindowPlan, plan_windows, resolve, resolve_target
from ..slides.qc import WindowQC
from ..slides.roi import Region
from .adapt import slide_batchnorm
from .done import DoneRecord, compared_settings, input_record, read_done, reuse_mismatch, write_done
from .outputs import ClassMaps, MapGeometry, OutputSpec, place_flat, remove_placed, verify_outputs, write_outputs
from .polygons import write_geojson
from .predictor import PredictError, Predictor
from .prob_map import NAME as PROB
from .prob_map import ProbabilityMap
from .qc_geojson import NAME as QC_GEOJSON
from .qc_geojson import qc_features
from .rasters import threshold_u8
from .stitching import ChunkAccumulator
from .tiles_geojson import covered_cells
from .windows import WindowRunner

SCRATCH = ".scratch"  # spilled stitching chunks, removed when the slide is done


@dataclass
class PredictResult(BatchResult):
    out_dir: str | None = None
    windows: int = 0
    tumor_area_mm2: float | None = None
    timings: dict = field(default_factory=dict)
    adaptation: str | None = None  # --adapt: what was done for this slide
    runtime: str | None = None  # what ran the network on the slide's windows: "torch" or "onnx" (--runtime)
    qc: dict | None = None  # --qc: {"windows", "flagged", "excluded", "counts", "area_mm2"} (excluded tissue)
    shift: dict | None = None  # the domain-shift score (model.shift.slide_shift), when the checkpoint has a reference
    roi_area_mm2: float | None = None  # --roi: the region's area (the tumour area is then the tumour inside it)
    class_areas_mm2: dict | None = None  # a multi-class model: each annotated class's area, by its name


def plan_prediction(slide, predictor: Predictor) -> WindowPlan:
    """The windows `histodg predict` runs on a slide (flush placement, any tissue)."""
    o = predictor.options
    target, scale = resolve_target(slide, mpp=predictor.mpp)
    res = resolve(slide, target, scale, predictor.tile, o.mpp_tolerance, what="model resolution")
    # the thumbnail is at least 1024 px: the overlay is made from it
    return plan_windows(slide, res, predictor.stride, "flush", o.tissue_method, None, thumbnail_min_px=1024)


def default_cache_chunks(tile: int, stride: int, chunk: int, strip: int = STRIP_WINDOWS) -> int:
    """Chunks alive while a strip is stitched: a strip's width by two window rows, plus a margin."""
    wide = math.ceil(((strip - 1) * stride + tile) / chunk) + 1
    tall = math.ceil((tile + stride) / chunk) + 1
    return wide * tall


def predict_slide(predictor: Predictor, job: SlideJob, out_dir: Path, progress=None) -> PredictResult:
    """Predict one slide into `out_dir/<name>/`. Never raises for bad input: returns a failed result."""
    out = Path(out_dir) / job.name
    result = PredictResult(job.name, str(job.path), "failed", out_dir=str(out))
    with recorded(result, job.path, out):
        with claimed(result, job, out):  # no other process writes (or cleans up) this folder meanwhile
            _predict_locked(predictor, job, out, result, progress)
    return result


def _predict_locked(predictor: Predictor, job: SlideJob, out: Path, result: PredictResult, progress) -> None:
    created = False
    try:
        created = _prepare(predictor, job, out, result)
        if created:
            _predict(predictor, job, out, result, progress)
            result.status = "done"
    finally:
        if result.status != "done" and created:
            shutil.rmtree(out, ignore_errors=True)  # nothing half-written is left behind (only what this process made)


def _prepare(predictor: Predictor, job: SlideJob, out: Path, result: PredictResult) -> bool:
    """Skip a finished output (False) or make an empty folder for the slide (True)."""
    done = read_done(out)
    if done is not None and not predictor.options.write.overwrite:
        why = reuse_mismatch(done, predictor, job)
        if why:
            raise PredictError(out, f"exists with other settings ({why}): use --overwrite or another output folder")
        result.status, result.windows = "skipped", int(done.get("windows", {}).get("run", 0))
        result.tumor_area_mm2 = done.get("tumor_area_mm2")
        result.bad_windows = int(done.get("windows", {}).get("bad", 0))
        result.qc = qc_summary(done.get("qc"))
        result.shift = done.get("shift")
        return False
    if out.exists():
        result.resumed = done is None
        if done is not None:
            remove_placed(out, list(done.get("files") or []))  # --layout flat: the last prediction's files beside the folder
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return True


@dataclass
class _SlideRun:
    """One slide's prediction under way: what each step of `_predict` reads, and the result and
    timings they fill in."""

    pred: Predictor
    job: SlideJob
    slide: Slide
    plan: WindowPlan
    count: int  # the first `count` windows of the plan are run
    out: Path
    progress: Callable | None
    result: PredictResult
    timings: dict = field(default_factory=dict)
    flags: dict = field(default_factory=dict)  # window -> its artefact QC flags (flagged windows only)


def _run_windows(run: _SlideRun, prob: ProbabilityMap) -> tuple[list[dict], dict, dict | None, list[int]]:
    """The whole window pipeline of one slide: the slide's BatchNorm route or adaptation, the shift
    meter, then the first `count` windows of the plan read, predicted and stitched into `prob`;
    (unreadable windows, stitching stats, done.json's `qc` (a `QCReport` with the mode and the
    excluded list; None with QC off), the windows QC left out)."""
    pred, job, slide, plan, count, out = run.pred, run.job, run.slide, run.plan, run.count, run.out
    progress, timings, result = run.progress, run.timings, run.result
    o = pred.options
    h, w = plan.out_shape
    cache = o.write.cache_chunks or default_cache_chunks(pred.tile, pred.stride, o.write.chunk_px)
    acc = ChunkAccumulator((h, w), o.write.chunk_px, prob.on_final, cache_chunks=cache, scratch=out / SCRATCH,
                           channels=pred.channels)
    acc.expect(plan.windows[:count], (pred.tile, pred.tile))
    if progress:
        progress(total=count, done=0)
    try:
        t, exported = time.perf_counter(), pred.onnx is not None
        read = lambda i: plan.resolution.read(slide, plan.level0_xy[i])  # noqa: E731
        # the runtime first: with onnx, the adaptation's unadapted pass (the shift meter's) runs on it too
        with pred.runtime_for(count) as result.runtime, pred.shift_of_slide() as shift, \
                slide_batchnorm(pred, job, plan.tissue, read) as note:
            if not exported and pred.onnx is not None:  # this slide paid the export (once per run)
                timings["onnx_export"] = pred.onnx_export_s
            result.adaptation = None if note is None else str(note)
            if note is not None and note.adapted:
                timings["adaptation"] = time.perf_counter() - t - timings.get("onnx_export", 0.0)
            qc = WindowQC.from_plan(slide, plan) if o.read.qc != "off" else None
            runner = WindowRunner(pred, slide, plan, count, acc, progress, qc)
            bad = runner.run()
            run.flags = runner.flags
        result.shift = shift.score
        timings.update(runner.clock)
        t = time.perf_counter()
        acc.close()
        prob.flush()
        timings["stitching"] += time.perf_counter() - t
    finally:
        prob.close()
    timings["prob_writing"] = prob.write_seconds  # in the writer thread, overlapping the model
    shutil.rmtree(out / SCRATCH, ignore_errors=True)
    stats = {"chunk": o.write.chunk_px, "cache_chunks": cache, "max_alive": acc.max_alive, "spilled": acc.spills,
             "reloaded": acc.reloads}
    found = runner.qc_report(count - len(bad))
    if found is None:
        return bad, stats, None, []
    report, excluded = found
    return bad, stats, {"mode": o.read.qc, **report.to_dict(), "excluded_list": runner.excluded_list(excluded)}, excluded


def excluded_area_mm2(plan: WindowPlan, excluded: list[int], count: int, mpp: float | None) -> float | None:
    """The tissue (on the plan's thumbnail) inside windows --qc exclude left out and no predicted
    window covers."""
    if mpp is None:
        return None
    if not excluded:
        return 0.0
    ds = plan.thumbnail.downsample
    boxes = np.concatenate([plan.level0_xy[:count], plan.level0_xy[:count] + plan.resolution.level0_size], 1) / ds
    left_out, covered = np.zeros(plan.tissue_mask.shape, bool), np.zeros(plan.tissue_mask.shape, bool)
    skip = set(excluded)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        target = left_out if i in skip else covered
        target[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
    px = int((plan.tissue_mask & left_out & ~covered).sum())
    return px * (ds * mpp) ** 2 / 1e6


def _tile_grid(run: _SlideRun) -> tuple | None:
    """--geojson-tiles: the cells (a window stride on a side) the predicted windows cover, and their side."""
    if not run.pred.options.write.geojson_tiles:
        return None
    res, side = run.plan.resolution, run.pred.stride * run.plan.resolution.level0_per_px
    return covered_cells(run.plan.level0_xy[:run.count], res.level0_size, side, run.slide.dimensions), side


def _write(run: _SlideRun, prob: ProbabilityMap, with_qc: bool) -> dict:
    """Every file made from the finished map (`outputs.write_outputs`), qc.geojson when QC ran,
    each read back, then placed as `--layout` asks; `write_outputs`' record."""
    o, plan, slide, out = run.pred.options, run.plan, run.slide, run.out
    t = time.perf_counter()
    geo = MapGeometry(plan.resolution.level0_per_px, slide.dimensions, slide.mpp)
    spec = OutputSpec(run.job.name, o.threshold, isinstance(slide, ImageSlide), _tile_grid(run),
                      prob_tiff="prob-tiff" in o.write.outputs, labels=run.pred.config.labels if prob.labels is not None else None)
    maps = ClassMaps(prob.labels, prob.class_probs) if prob.labels is not None else None
    written = write_outputs(out, prob.array, prob.nonempty, geo, spec, plan.thumbnail.rgb, plan.thumbnail.downsample, maps)
    if with_qc:
        write_geojson(out / QC_GEOJSON, qc_features(run.flags, plan.level0_xy, plan.resolution.level0_size,
                                                    plan.tissue_mask.shape, plan.thumbnail.downsample, slide.dimensions,
                                                    o.read.qc == "exclude"))
        written["files"].append(QC_GEOJSON)
    verify_outputs(out, written["files"])
    if o.write.layout == "flat":
        written["files"] = place_flat(out, run.job.name, written["files"])
    run.timings["writing"] = time.perf_counter() - t
    return written


NO_REGION = "no region file for this slide in the --roi folder: predicted whole"


def class_record(labels: dict, class_px, mpp: float) -> dict:
    """done.json's `classes`: for each annotated label (1, 2, ...) its name, pixels and area in mm²."""
    return {str(k): {"name": labels.get(str(k), f"class {k}"), "pixels": int(class_px[k]),
                     "area_mm2": int(class_px[k]) * mpp**2 / 1e6} for k in range(1, len(class_px))}


def _region(o, job: SlideJob, slide, result: PredictResult) -> Region | None:
    """The slide's region under --roi (None: no --roi, or no file for this slide, noted)."""
    if o.roi is None:
        return None
    if job.region is None:
        result.note = NO_REGION
        return None
    region = Region.load(job.region, slide.dimensions, o.roi_class)
    result.roi_area_mm2 = region.area_mm2(slide.mpp)
    return region


def _roi_record(o, region: Region | None, result: PredictResult, tumor_mm2: float) -> dict | None:
    if o.roi is None:
        return None
    if region is None:
        return {"file": None, "note": NO_REGION}
    return {**region.record(), "area_mm2": result.roi_area_mm2, "tumor_area_mm2": tumor_mm2}


def _predict(pred: Predictor, job: SlideJob, out: Path, result: PredictResult, progress) -> None:
    o = pred.options
    t_start = time.perf_counter()
    stain = pred.normalizer.stain
    stain_before = (stain.fallbacks, stain.seen) if stain is not None else None
    with open_slide(job.path, o.read.backend, mpp=job.mpp) as slide:
        plan = plan_prediction(slide, pred)
        region = _region(o, job, slide, result)
        if region is not None:
            plan = region.restrict(plan)
        res = plan.resolution
        count = math.ceil(o.window_fraction * len(plan) - 1e-9) if o.window_fraction < 1 else len(plan)
        run = _SlideRun(pred, job, slide, plan, count, out, progress, result)
        timings = run.timings
        timings["planning"] = time.perf_counter() - t_start
        out_mpp = slide.mpp * res.level0_per_px
        prob = ProbabilityMap(out / PROB, plan.out_shape, o.write.chunk_px,
                              {"mpp": out_mpp, "level0_per_px": res.level0_per_px,
                               "level0_dimensions": list(slide.dimensions), "slide_mpp": slide.mpp}, o.threshold,
                              classes=pred.classes, class_probs="prob-tiff" in o.write.outputs)
        if region is not None:  # nothing outside the region: its pixels are 0 in prob.zarr and every output
            prob.inside = lambda y0, x0, h, w, s=res.level0_per_px: region.raster(x0 * s, y0 * s, s, max(h, w))[:h, :w]
        bad, stitching, qc, excluded = _run_windows(run, prob)
        if qc is not None:
            qc["area_mm2"] = excluded_area_mm2(plan, excluded, count, slide.mpp)
            result.qc = qc_summary(qc)
        written = _write(run, prob, qc is not None)
        area = prob.tumor_px * out_mpp**2 / 1e6
        classes = class_record(pred.config.labels, prob.class_px, out_mpp)
        if pred.classes > 1:
            result.class_areas_mm2 = {c["name"]: c["area_mm2"] for c in classes.values()}
        ran = count - len(bad) - len(excluded)
        result.windows, result.bad_windows, result.tumor_area_mm2 = ran, len(bad), area
        timings["total"] = time.perf_counter() - t_start
        result.timings = {k: round(v, 4) for k, v in timings.items()}
        write_done(out, DoneRecord(
            input=input_record(job),
            model=pred.describe(),
            settings={**compared_settings(pred, o, job), "batch_size": o.batch_size, "device": str(pred.device),
                      "amp": str(pred.placement.amp_dtype) if pred.placement.amp_dtype else None,
                      "workers": o.read.workers, "runtime": result.runtime, "threshold_u8": threshold_u8(o.threshold),
                      "mpp_tolerance": o.mpp_tolerance},
            slide={"dimensions": list(slide.dimensions), "mpp": slide.mpp, "backend": slide.backend,
                   "read_level": res.level, "read_size": res.read_size},
            output={"shape": list(plan.out_shape), "mpp": out_mpp, "level0_per_px": res.level0_per_px,
                    "chunk": o.write.chunk_px, "geojson_factor": written["geojson_factor"], "polygons": written["polygons"]},
            windows={"grid": plan.total_windows, "tissue": len(plan), "run": ran, "bad": len(bad),
                     "excluded": len(excluded), "bad_list": bad[:100]},
            qc=qc, stitching=stitching, adaptation=result.adaptation, shift=result.shift,
            stain_unnormalised=None if stain is None or stain_before is None else {
                "patches": stain.fallbacks - stain_before[0], "of": stain.seen - stain_before[1]},
            tumor_pixels=prob.tumor_px, tumor_area_mm2=area, timings=result.timings, files=written["files"],
            roi=_roi_record(o, region, result, area), classes=classes))
