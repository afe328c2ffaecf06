"""Whole-slide inference: tissue windows -> model -> Gaussian-weighted stitching -> slide outputs.

    predictor = Predictor.from_checkpoint("runs/a/best.pt", PredictOptions(tta="flip"))
    result = predict_slide(predictor, SlideJob(Path("case.svs"), "case"), Path("preds"))

Geometry. The model sees `tile` px windows at its resolution (`mpp`, from the checkpoint unless
overridden); one output pixel is `level0_per_px` level-0 pixels (the read level's scale, exactly
as read, like `histodg tile`). Over the output grid, windows start every <= `tile - overlap` px
from 0 to flush with the right and bottom edges (`window.window_starts`), and only windows that
touch tissue (the tissue mask of `histodg tile`, on a thumbnail) are run. Windows are visited in
vertical strips (`tiling.strip_order`) so that reads share decoded source tiles and the
stitching chunks they touch are finished strip by strip.

Pipeline. `workers` reader threads fill uint8 batch buffers (pinned on CUDA) ahead of the model;
the main thread copies a batch to the device (non-blocking), normalises it there, runs the model
under `torch.inference_mode()` (bf16 autocast and channels_last on CUDA), weights the
probabilities with the Gaussian map on the device, and stitches the previous batch while the
device works on this one. Stitching: `window.ChunkAccumulator`, bounded memory, chunks finished
in strip order straight into ``prob.zarr``.

Probability. Binary models (1 output channel): sigmoid. Multi-class models: the foreground
probability 1 - softmax[background], so ``prob.zarr`` and the mask always mean "tumour / any
annotated class". `--tta flip`: the mean over the four flips (none, horizontal, vertical, both),
each flipped back.

Outputs in OUT/<name>/: prob.zarr (uint8 0-255), mask.ome.tiff, tumor.geojson, overlay.png,
mask.png (plain images only) and done.json, written last. The mask is prob_u8 >= ceil(255 *
threshold). A folder without done.json is unfinished and is redone; with it the slide is
skipped (unless `overwrite`), after checking it was made with the same settings.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import HistodgError, SlideError, __version__
from .inputs import SlideJob
from .results import BatchResult
from .slide import ImageSlide, open_slide, resize
from .tissue import METHODS as TISSUE_METHODS
from .tissue import tissue_mask, window_fractions
from .window import ChunkAccumulator, gaussian_map, window_starts

DONE = "done.json"
SCRATCH = ".scratch"
STRIP_WINDOWS = 16  # windows per strip of the visiting order
TTA_MODES = ("none", "flip")
# Douglas-Peucker tolerance of the GeoJSON outlines, in traced-mask pixels: below the 0.354 px at which
# a pixel centre can change sides, so the polygons rasterise back to the mask exactly (see export.py)
GEOJSON_EPSILON = 0.35
AMP_MODES = ("auto", "on", "off")


class PredictError(HistodgError):
    """A prediction cannot be made or an existing output cannot be reused."""


@dataclass(frozen=True)
class PredictOptions:
    """How to predict; None means "the checkpoint's" for mpp and tile size."""

    mpp: float | None = None
    tile_size: int | None = None
    overlap: float = 0.5  # < 1: fraction of the tile; >= 1: pixels
    batch_size: int = 8
    tta: str = "none"
    threshold: float = 0.5
    device: str = "auto"
    amp: str = "auto"
    workers: int = 2
    backend: str = "auto"
    tissue_method: str = "otsu"
    mpp_tolerance: float = 0.02
    max_bad_fraction: float = 0.1
    overwrite: bool = False
    chunk_px: int = 512  # stitching chunk and prob.zarr chunk side
    cache_chunks: int | None = None  # stitching chunks held in memory; None: enough for a strip
    window_fraction: float = 1.0  # benchmarks: run only the first part of the windows (strip order)

    def __post_init__(self):
        def bad(msg):
            raise ValueError(msg)

        if self.mpp is not None and not 0.05 <= self.mpp <= 100:
            bad(f"--mpp {self.mpp} is outside 0.05-100 um/px")
        if self.tile_size is not None and not 16 <= self.tile_size <= 8192:
            bad(f"--tile-size {self.tile_size} is outside 16-8192 px")
        if self.overlap < 0:
            bad(f"--overlap {self.overlap} must not be negative")
        if self.batch_size < 1:
            bad("--batch-size must be at least 1")
        if self.tta not in TTA_MODES:
            bad(f"--tta {self.tta!r}: choose {' or '.join(TTA_MODES)}")
        if not 0 < self.threshold < 1:
            bad(f"--threshold {self.threshold} must be between 0 and 1 (exclusive)")
        if self.amp not in AMP_MODES:
            bad(f"amp {self.amp!r}: choose from {', '.join(AMP_MODES)}")
        if self.workers < 1:
            bad("--workers must be at least 1")
        if self.tissue_method not in TISSUE_METHODS:
            bad(f"--tissue-method {self.tissue_method!r} is not one of {', '.join(TISSUE_METHODS)}")
        if not 0 <= self.max_bad_fraction <= 1:
            bad("--max-bad-fraction must be between 0 and 1")
        if self.chunk_px < 16:
            bad("chunk_px must be at least 16")
        if self.cache_chunks is not None and self.cache_chunks < 1:
            bad("cache_chunks must be at least 1")
        if not 0 < self.window_fraction <= 1:
            bad("window_fraction must be in (0, 1]")

    def overlap_px(self, tile: int) -> int:
        px = round(self.overlap * tile) if self.overlap < 1 else int(round(self.overlap))
        if px >= tile:
            raise ValueError(f"--overlap {self.overlap} leaves no stride for a {tile} px tile")
        return px


@dataclass
class PredictResult(BatchResult):
    out_dir: str | None = None
    windows: int = 0
    tumor_area_mm2: float | None = None
    timings: dict = field(default_factory=dict)

    # how report.print_summary labels the columns of a predict batch
    summary_spec = {"count": ("windows", "windows"), "area": ("tumor_area_mm2", "tumour mm²", "tumour"),
                    "bad_note": "unreadable windows skipped (see done.json)", "resumed_note": "redone (was unfinished)"}


# -- the model side ---------------------------------------------------------------------------------
class Predictor:
    """A model ready for windows: device, precision, normalisation, flips, Gaussian weights.

    `model` is any module mapping (N, 3, T, T) normalised floats to (N, C, T, T) logits;
    `model_config` holds `classes`, `mpp`, `tile_size` and `normalization` as in a checkpoint.
    """

    def __init__(self, model, model_config: dict, options: PredictOptions = PredictOptions(),
                 checkpoint: str | None = None, checkpoint_sha256: str | None = None):
        import torch

        from .data import Normalizer
        from .models import IMAGENET_MEAN, IMAGENET_STD

        self.options = options
        self.checkpoint = checkpoint
        self.checkpoint_sha256 = checkpoint_sha256  # what the weights are, whatever the path
        self.model_config = dict(model_config)
        mc = self.model_config
        want = options.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda") and not torch.cuda.is_available():
            raise PredictError(checkpoint or "model", "--device cuda asked for, but no CUDA GPU is available")
        try:
            self.device = torch.device(want)
        except RuntimeError as exc:
            raise PredictError(checkpoint or "model", f"--device {want!r}: {exc}") from None
        self.cuda = self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if (options.amp == "on" or (options.amp == "auto" and self.cuda)) else None
        self.channels_last = self.cuda
        self.classes = int(mc.get("classes", 1))
        self.mpp = float(options.mpp if options.mpp is not None else (mc.get("mpp") or 0)) or None
        if self.mpp is None:
            raise PredictError(checkpoint or "model", "the checkpoint records no mpp: pass --mpp")
        self.tile = int(options.tile_size or mc.get("tile_size") or 0)
        if not self.tile:
            raise PredictError(checkpoint or "model", "the checkpoint records no tile size: pass --tile-size")
        try:
            self.overlap = options.overlap_px(self.tile)
        except ValueError as exc:
            raise PredictError(checkpoint or "model", str(exc)) from None
        self.stride = self.tile - self.overlap
        norm = mc.get("normalization") or {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
        self.normalizer = Normalizer(norm["mean"], norm["std"], self.device, self.channels_last)
        self.model = model.eval().to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.gaussian = gaussian_map(self.tile)
        self._gaussian_dev = torch.from_numpy(self.gaussian).to(self.device)
        self._check_shapes()

    @classmethod
    def from_checkpoint(cls, path, options: PredictOptions = PredictOptions()) -> Predictor:
        from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint

        ckpt = load_checkpoint(path)
        try:
            mc = ckpt["model_config"]
            model = model_from_checkpoint(ckpt)
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(path, f"cannot rebuild the model ({str(exc).splitlines()[0][:160]})") from None
        return cls(model, mc, options, checkpoint=str(Path(path).resolve()), checkpoint_sha256=file_sha256(path))

    def _check_shapes(self) -> None:
        """One forward on a blank window: a tile size the network cannot take fails here, clearly."""
        import torch

        x = torch.full((1, self.tile, self.tile, 3), 255, dtype=torch.uint8)
        try:
            out = self._logits(x.to(self.device))
        except RuntimeError as exc:
            raise PredictError(self.checkpoint or "model", f"the model cannot take {self.tile} px windows "
                               f"({str(exc).splitlines()[0][:160]}); try a multiple of 32") from None
        if tuple(out.shape[-2:]) != (self.tile, self.tile) or out.shape[1] != self.classes:
            raise PredictError(self.checkpoint or "model", f"the model maps a {self.tile} px window to {tuple(out.shape)}, "
                               f"expected (1, {self.classes}, {self.tile}, {self.tile})")

    def _logits(self, x_nhwc):
        import torch
        from contextlib import nullcontext

        x = self.normalizer(x_nhwc.permute(0, 3, 1, 2))
        if not self.channels_last:
            x = x.contiguous()
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with torch.inference_mode(), amp:
            return self.model(x)

    def _prob(self, logits):
        import torch

        logits = logits.float()
        if self.classes == 1:
            return torch.sigmoid(logits[:, 0])
        return 1.0 - torch.softmax(logits, dim=1)[:, 0]

    def probabilities(self, batch):
        """(N, T, T, 3) uint8 (any device) -> (N, T, T) float32 foreground probability on the device."""
        import torch

        x = batch.to(self.device, non_blocking=True)
        with torch.inference_mode():
            if self.options.tta == "none":
                return self._prob(self._logits(x))
            total = None
            for dims in ((), (2,), (1,), (1, 2)):  # NHWC: 2 = width, 1 = height
                xi = x.flip(dims) if dims else x
                p = self._prob(self._logits(xi))
                p = p.flip(dims) if dims else p  # (N, H, W): the same dims
                total = p if total is None else total + p
            return total / 4

    def weighted(self, batch):
        """Probabilities times the Gaussian importance map (on the device)."""
        import torch

        with torch.inference_mode():
            return self.probabilities(batch) * self._gaussian_dev

    def new_batch(self):
        import torch

        return torch.empty((self.options.batch_size, self.tile, self.tile, 3), dtype=torch.uint8,
                           pin_memory=self.cuda)

    def new_output(self):
        import torch

        return torch.empty((self.options.batch_size, self.tile, self.tile), dtype=torch.float32, pin_memory=self.cuda)

    def describe(self) -> dict:
        mc = self.model_config
        return {"checkpoint": self.checkpoint, "checkpoint_sha256": self.checkpoint_sha256, "arch": mc.get("arch"), "encoder": mc.get("encoder"),
                "classes": self.classes, "labels": mc.get("labels"), "method": mc.get("method"),
                "trained_mpp": mc.get("mpp"), "trained_tile_size": mc.get("tile_size")}


# -- the slide side ---------------------------------------------------------------------------------
@dataclass
class SlidePlan:
    """Where the windows of one slide go, in output pixels."""

    level: int
    read_size: int  # level px read per window (resized to tile)
    level0_per_px: float  # level-0 px per output px, as read
    target_mpp: float
    tile: int
    stride: int
    out_shape: tuple[int, int]  # (H, W) output px
    windows: np.ndarray  # (N, 2) int64 output (y, x) of each window's top-left, in visiting order
    grid_windows: int  # windows of the full grid, tissue or not
    thumbnail: np.ndarray = field(repr=False)
    thumbnail_downsample: float = 1.0
    tissue_fraction: float = 0.0


def plan_slide(slide, mpp: float, tile: int, stride: int, tissue_method: str = "otsu",
               mpp_tolerance: float = 0.02, strip: int = STRIP_WINDOWS) -> SlidePlan:
    """The read level, the output grid and the tissue windows of a slide."""
    from .tiling import strip_order

    mpp0 = slide.require_mpp()
    scale = mpp / mpp0
    if scale < 0.5:
        raise SlideError(slide.path, f"model resolution {mpp:.3g} um/px is more than 2x finer than the slide's "
                                     f"{mpp0:.3g} um/px (upsampling refused)")
    level = slide.best_level(scale, tolerance=max(mpp_tolerance, 0.01))
    ds = slide.level_downsamples[level]
    read_size = tile if abs(ds / scale - 1) <= mpp_tolerance else max(1, round(tile * scale / ds))
    eff = read_size * ds / tile
    w0, h0 = slide.dimensions
    out_w, out_h = max(1, math.ceil(w0 / eff - 1e-9)), max(1, math.ceil(h0 / eff - 1e-9))
    if max(out_w, out_h) * 2 < tile:
        raise SlideError(slide.path, f"{w0}x{h0} px is too small to segment: less than half a window ({tile} px at "
                                     f"{mpp:.3g} um/px = {tile * eff:.0f} level-0 px) on both sides; use a smaller "
                                     f"--tile-size or a coarser --mpp")
    xs, ys = window_starts(out_w, tile, stride), window_starts(out_h, tile, stride)
    order = strip_order(len(ys), len(xs), strip)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    windows = np.stack([gy.ravel()[order], gx.ravel()[order]], 1).astype(np.int64)

    window0 = tile * eff
    px = int(np.clip(16 * max(w0, h0) / window0, 1024, 4096))  # >= 1024: the overlay is made from it
    thumb = slide.thumbnail_checked(px)
    if not thumb.readable.any():
        raise SlideError(slide.path, f"no part of the slide can be decoded: {thumb.first_error}")
    mask = tissue_mask(thumb.rgb, tissue_method) & thumb.readable
    boxes = np.concatenate([windows[:, ::-1], windows[:, ::-1] + tile], 1) * eff / thumb.downsample
    keep = (window_fractions(mask, boxes) > 0) | (window_fractions(~thumb.readable, boxes) > 0)
    return SlidePlan(level=level, read_size=int(read_size), level0_per_px=float(eff), target_mpp=float(mpp0 * eff),
                     tile=tile, stride=stride, out_shape=(out_h, out_w), windows=windows[keep],
                     grid_windows=len(windows), thumbnail=thumb.rgb, thumbnail_downsample=float(thumb.downsample),
                     tissue_fraction=float(mask.mean()))


def _read_xy(plan: SlidePlan, slide, y: int, x: int) -> tuple[int, int]:
    """Level-0 origin of the window at output (y, x), on a whole pixel of the read level."""
    ds = slide.level_downsamples[plan.level]
    f = plan.level0_per_px / ds  # read-level px per output px
    return (int(math.ceil(round(x * f) * ds - 1e-6)), int(math.ceil(round(y * f) * ds - 1e-6)))


def default_cache_chunks(tile: int, stride: int, chunk: int, strip: int = STRIP_WINDOWS) -> int:
    """Chunks alive while a strip is stitched: a strip's width by two window rows, plus a margin."""
    wide = math.ceil(((strip - 1) * stride + tile) / chunk) + 1
    tall = math.ceil((tile + stride) / chunk) + 1
    return wide * tall


def file_sha256(path, block: int = 2**22) -> str:
    """Hex sha256 of a file, read in blocks (a retrained best.pt keeps its path, not its hash)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


# -- one slide --------------------------------------------------------------------------------------
def _source(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime": round(st.st_mtime, 3)}


def _wanted(predictor: Predictor, job: SlideJob) -> dict:
    o = predictor.options
    return {"checkpoint": predictor.checkpoint, "checkpoint_sha256": predictor.checkpoint_sha256,
            "mpp": predictor.mpp, "tile_size": predictor.tile,
            "overlap_px": predictor.overlap, "tta": o.tta, "threshold": o.threshold, "tissue_method": o.tissue_method,
            "window_fraction": o.window_fraction}


def _mismatch(done: dict, predictor: Predictor, job: SlideJob) -> str | None:
    have = done.get("settings") or {}
    diffs = [f"{k} {have.get(k)!r} -> {v!r}" if k != "checkpoint_sha256" else "the checkpoint file's contents differ"
             for k, v in _wanted(predictor, job).items() if have.get(k) != v]
    src, now = done.get("source") or {}, _source(job.path)
    if src.get("size") != now["size"] or abs(float(src.get("mtime", 0)) - now["mtime"]) > 1e-3:
        diffs.append("the source file changed")
    return "; ".join(diffs) or None


def read_done(out: Path) -> dict | None:
    """A finished prediction's done.json, or None when the folder is unfinished or missing."""
    path = Path(out) / DONE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def predict_slide(predictor: Predictor, job: SlideJob, out_dir: Path, progress=None) -> PredictResult:
    """Predict one slide into `out_dir/<name>/`. Never raises for bad input: returns a failed result."""
    t0 = time.perf_counter()
    out = Path(out_dir) / job.name
    result = PredictResult(job.name, str(job.path), "failed", out_dir=str(out))
    created = False
    try:
        done = read_done(out)
        if done is not None and not predictor.options.overwrite:
            why = _mismatch(done, predictor, job)
            if why:
                raise PredictError(out, f"exists with other settings ({why}): use --overwrite or another output folder")
            result.status, result.windows = "skipped", int(done.get("windows", {}).get("run", 0))
            result.tumor_area_mm2 = done.get("tumor_area_mm2")
            result.bad_windows = int(done.get("windows", {}).get("bad", 0))
            return result
        if out.exists():
            result.resumed = done is None
            shutil.rmtree(out)
        out.mkdir(parents=True)
        created = True
        _predict(predictor, job, out, result, progress)
        result.status = "done"
    except HistodgError as exc:
        result.error = str(exc)
    except OSError as exc:
        result.error = f"{job.path}: {exc.strerror or exc}"
    finally:
        result.seconds = time.perf_counter() - t0
        if result.status == "failed" and created:
            shutil.rmtree(out, ignore_errors=True)
    return result


def _predict(pred: Predictor, job: SlideJob, out: Path, result: PredictResult, progress) -> None:
    import zarr

    from .export import (BlockReducer, OmeTiffMask, contour_factor, inside_only, iter_bands, mask_polygons,
                         polygons_to_geojson, threshold_u8, write_geojson, write_mask_png, write_overlay)

    o = pred.options
    timings = {}
    t_start = t = time.perf_counter()
    with open_slide(job.path, o.backend, mpp=job.mpp) as slide:
        plan = plan_slide(slide, pred.mpp, pred.tile, pred.stride, o.tissue_method, o.mpp_tolerance)
        windows = plan.windows
        if o.window_fraction < 1:
            windows = windows[: math.ceil(o.window_fraction * len(windows))]
        timings["planning"] = time.perf_counter() - t
        h, w = plan.out_shape
        chunk = o.chunk_px
        prob = zarr.create_array(str(out / "prob.zarr"), shape=(h, w), chunks=(min(chunk, h), min(chunk, w)),
                                 dtype="uint8", fill_value=0)
        prob.update_attributes({"mpp": plan.target_mpp, "level0_per_px": plan.level0_per_px,
                           "level0_dimensions": list(slide.dimensions), "slide_mpp": slide.mpp,
                           "threshold": o.threshold, "threshold_u8": threshold_u8(o.threshold),
                           "meaning": "tumour (foreground) probability x 255; 0 where no window ran"})
        cut = threshold_u8(o.threshold)
        state = {"tumor_px": 0, "write_s": 0.0, "nonempty": set()}

        writes: deque = deque()
        write_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="histodg-prob")

        def write_chunk(y0, x0, u8):
            t1 = time.perf_counter()
            prob[y0 : y0 + u8.shape[0], x0 : x0 + u8.shape[1]] = u8
            return time.perf_counter() - t1

        def collect(block: bool):
            while writes and (block or writes[0].done()):
                state["write_s"] += writes.popleft().result()

        def on_final(cy, cx, p):
            # zarr costs ~2 ms of Python per chunk: write in a thread, behind the model
            u8 = (p * 255 + 0.5).astype(np.uint8)
            state["tumor_px"] += int(np.count_nonzero(u8 >= cut))
            if u8.any():
                state["nonempty"].add((cy, cx))
                writes.append(write_pool.submit(write_chunk, cy * chunk, cx * chunk, u8))
                collect(block=len(writes) > 32)

        cache = o.cache_chunks or default_cache_chunks(pred.tile, pred.stride, chunk)
        acc = ChunkAccumulator((h, w), chunk, on_final, cache_chunks=cache, scratch=out / SCRATCH)
        acc.expect(windows, (pred.tile, pred.tile))
        if progress:
            progress(total=len(windows), done=0)
        try:
            bad = _run_windows(pred, slide, plan, windows, acc, progress, timings, job, o)
            t = time.perf_counter()
            acc.close()
            collect(block=True)
            timings["stitching"] += time.perf_counter() - t
        finally:
            write_pool.shutdown(wait=True)
        timings["prob_writing"] = state["write_s"]  # in the writer thread, overlapping the model
        shutil.rmtree(out / SCRATCH, ignore_errors=True)

        # -- writers: one pass over prob.zarr (its non-empty chunks) builds the OME-TIFF pyramid and
        # the reduced map that the GeoJSON and the overlay are made from ------------------------------
        t = time.perf_counter()
        dims = slide.dimensions
        nonempty = state["nonempty"]
        f = contour_factor((h, w))
        ome = OmeTiffMask(out / "mask.ome.tiff", plan.level0_per_px, dims, (h, w), slide.mpp, o.threshold)
        reducer = BlockReducer((h, w), f)
        try:
            for r0, band in iter_bands(prob, nonempty):
                ome.feed(r0, band)
                reducer.feed(band)
        except BaseException:
            ome.close()
            raise
        ome.finish(name=job.name)
        low = reducer.finish()
        files = ["prob.zarr", "mask.ome.tiff"]
        if isinstance(slide, ImageSlide):
            write_mask_png(out / "mask.png", prob, plan.level0_per_px, dims, o.threshold, nonempty)
            files.append("mask.png")
        polygons = mask_polygons(inside_only(low >= cut, f * plan.level0_per_px, dims), epsilon_px=GEOJSON_EPSILON)
        gj = polygons_to_geojson(polygons, f * plan.level0_per_px, dims)
        write_geojson(out / "tumor.geojson", gj)
        files.append("tumor.geojson")
        write_overlay(out / "overlay.png", plan.thumbnail, plan.thumbnail_downsample, low, f * plan.level0_per_px,
                      o.threshold)
        files.append("overlay.png")
        del low
        timings["writing"] = time.perf_counter() - t
        px_um = plan.target_mpp
        area = state["tumor_px"] * px_um**2 / 1e6
        result.windows, result.bad_windows, result.tumor_area_mm2 = len(windows) - len(bad), len(bad), area
        timings["total"] = time.perf_counter() - t_start
        result.timings = {k: round(v, 4) for k, v in timings.items()}
        done = {
            "histodg_version": __version__,
            "name": job.name,
            "source": _source(job.path),
            "organ": job.organ,
            "scanner": job.scanner,
            "meta": dict(job.meta),
            "model": pred.describe(),
            "settings": {**_wanted(pred, job), "batch_size": o.batch_size, "device": str(pred.device),
                         "amp": str(pred.amp_dtype) if pred.amp_dtype else None, "workers": o.workers,
                         "threshold_u8": cut, "mpp_tolerance": o.mpp_tolerance},
            "slide": {"dimensions": list(dims), "mpp": slide.mpp, "backend": slide.backend, "read_level": plan.level,
                      "read_size": plan.read_size},
            "output": {"shape": [h, w], "mpp": plan.target_mpp, "level0_per_px": plan.level0_per_px, "chunk": chunk,
                       "geojson_factor": f, "polygons": len(polygons)},
            "windows": {"grid": plan.grid_windows, "tissue": len(plan.windows), "run": len(windows) - len(bad),
                        "bad": len(bad), "bad_list": bad[:100]},
            "stitching": {"chunk": chunk, "cache_chunks": cache, "max_alive": acc.max_alive, "spilled": acc.spills,
                          "reloaded": acc.reloads},
            "tumor_pixels": state["tumor_px"],
            "tumor_area_mm2": area,
            "timings": result.timings,
            "files": files,
        }
        tmp = out / (DONE + ".tmp")
        tmp.write_text(json.dumps(done, indent=2, default=str))
        os.replace(tmp, out / DONE)


def _run_windows(pred: Predictor, slide, plan: SlidePlan, windows: np.ndarray, acc: ChunkAccumulator, progress,
                 timings: dict, job: SlideJob, o: PredictOptions) -> list[dict]:
    """Read windows in threads, run the model batch by batch, stitch. Returns the unreadable windows."""
    import torch

    from .extract import gc_paused

    n, B, T = len(windows), o.batch_size, pred.tile
    batches = [(i, min(i + B, n)) for i in range(0, n, B)]
    per_task = max(1, math.ceil(B / o.workers))
    g = pred.gaussian
    bad: list[dict] = []
    limit = o.max_bad_fraction * n
    clock = {"reading": 0.0, "waiting_for_reads": 0.0, "model": 0.0, "stitching": 0.0}

    def read(buf_np, i0: int, i1: int, base: int):
        t = time.perf_counter()
        failed = []
        for i in range(i0, i1):
            y, x = (int(v) for v in windows[i])
            try:
                img = slide.read_region(_read_xy(plan, slide, y, x), plan.level, (plan.read_size, plan.read_size))
                buf_np[i - base] = resize(img, (T, T))
            except SlideError as exc:
                buf_np[i - base] = 255
                failed.append((i, exc.reason))
        return failed, time.perf_counter() - t

    n_buffers = 2 + max(2, o.workers)
    free = deque(pred.new_batch() for _ in range(min(n_buffers, len(batches) + 1)))
    outs = [pred.new_output() for _ in range(2)] if pred.cuda else None
    inflight: deque = deque()
    next_batch = 0

    def fill(pool):
        nonlocal next_batch
        while free and next_batch < len(batches):
            buf = free.popleft()
            b0, b1 = batches[next_batch]
            arr = buf.numpy()
            futs = [pool.submit(read, arr, s, min(s + per_task, b1), b0) for s in range(b0, b1, per_task)]
            inflight.append((next_batch, buf, futs))
            next_batch += 1

    def finish(pending):
        bno, buf, host, event, failed = pending
        t = time.perf_counter()
        if event is not None:
            event.synchronize()
        clock["model"] += time.perf_counter() - t
        t = time.perf_counter()
        b0, b1 = batches[bno]
        res = host.numpy()
        for i in range(b0, b1):
            y, x = (int(v) for v in windows[i])
            if i in failed:
                acc.skip(y, x, (T, T))
            else:
                acc.add(y, x, res[i - b0], g)
        clock["stitching"] += time.perf_counter() - t
        free.append(buf)
        if progress:
            progress(advance=b1 - b0)

    pending = None
    with ThreadPoolExecutor(max_workers=o.workers, thread_name_prefix="histodg-predict") as pool, gc_paused():
        fill(pool)
        while inflight:
            bno, buf, futs = inflight.popleft()
            t = time.perf_counter()
            failed = {}
            for fut in futs:
                errs, secs = fut.result()
                clock["reading"] += secs
                failed.update(errs)
            clock["waiting_for_reads"] += time.perf_counter() - t
            for i, reason in failed.items():
                y, x = (int(v) for v in windows[i])
                xy0 = _read_xy(plan, slide, y, x)
                bad.append({"x": xy0[0], "y": xy0[1], "reason": reason})
            if len(bad) > limit:
                first = bad[0]["reason"]
                raise SlideError(job.path, f"{len(bad)} of {n} windows cannot be decoded, more than --max-bad-fraction "
                                           f"{o.max_bad_fraction:g}; first: {first}")
            b0, b1 = batches[bno]
            t = time.perf_counter()
            weighted = pred.weighted(buf[: b1 - b0])
            if pred.cuda:
                host = outs[bno % 2][: b1 - b0]
                host.copy_(weighted, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host, event = weighted, None
            clock["model"] += time.perf_counter() - t
            if pending is not None:
                finish(pending)
            pending = (bno, buf, host, event, failed)
            fill(pool)
        if pending is not None:
            finish(pending)
    timings.update(clock)
    return bad
