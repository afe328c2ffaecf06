"""Cut one slide into a patch store: plan the grid, read windows in threads, write, resume.

Windows are read by `workers` threads (decoding releases the GIL) ahead of the writer, in grid
order so neighbouring windows share decoded source tiles in the reader's cache. Patches are
written a shard at a time and each shard is journalled, so a killed run resumes at its last
shard.

Bad regions: a window that cannot be decoded (a corrupt tile) is skipped and recorded in the
store's ``bad_windows`` attribute (level-0 x, y and the reason) and in the run summary. If more
than `max_bad_fraction` of the slide's windows fail, the slide fails instead and its store is
removed, so a mostly unreadable slide never looks finished.
"""
from __future__ import annotations

import gc
import os
import shutil
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import HistodgError, SlideError
from .annotations import LabelMap, load_annotations
from .inputs import SlideJob
from .results import BatchResult
from .slide import open_slide, resize
from .store import StoreError, StoreWriter, store_state
from .tiffread import TiffTileReader, TileDecodeError
from .tiling import Grid, TileSettings, plan_grid

# settings that must match for a rerun to skip or resume an existing store


WINDOWS_PER_TASK = 4
COMMIT_SECONDS = 2.0  # how often the progress journal advances: an interruption loses at most this much work


@dataclass
class TileResult(BatchResult):
    store: str | None = None
    patches: int = 0
    tissue_area_mm2: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TileOptions:
    settings: TileSettings = TileSettings()
    backend: str = "auto"
    workers: int = 2
    labels: LabelMap = field(default_factory=LabelMap)
    overwrite: bool = False
    max_bad_fraction: float = 0.1
    compression: str = "lz4"
    jpeg_quality: int = 90


def _source_attrs(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime": round(st.st_mtime, 3)}


def _wanted_attrs(job: SlideJob, opts: TileOptions) -> dict:
    s = opts.settings
    return {
        "tile_size": s.tile_size,
        "mpp": s.mpp,
        "magnification": s.magnification,
        "overlap": s.overlap,
        "min_tissue": s.min_tissue,
        "tissue_method": s.tissue_method,
        "mpp_tolerance": s.mpp_tolerance,
        "organ": job.organ,
        "scanner": job.scanner,
        "compression": opts.compression,
        "jpeg_quality": opts.jpeg_quality if opts.compression == "jpeg" else None,
    }


def _existing_mismatch(path: Path, job: SlideJob, opts: TileOptions) -> str | None:
    """Why an existing store cannot be reused for this job (None when it can)."""
    import zarr

    attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    wanted = _wanted_attrs(job, opts)
    if attrs.get("magnification") is not None or wanted["magnification"] is not None:
        wanted.pop("mpp")  # with --magnification the stored mpp is the resolved one
    diffs = [f"{k} {attrs.get(k)!r} -> {v!r}" for k, v in wanted.items() if attrs.get(k) != v]
    src = attrs.get("source") or {}
    now = _source_attrs(job.path)
    if src.get("size") != now["size"] or abs(float(src.get("mtime", 0)) - now["mtime"]) > 1e-3:
        diffs.append("the source file changed")
    if (attrs.get("annotation") or None) != (str(job.annotation.resolve()) if job.annotation else None):
        diffs.append("annotation file differs")
    return "; ".join(diffs) or None


def tile_slide(job: SlideJob, out_dir: Path, opts: TileOptions, progress=None) -> TileResult:
    """Tile one slide into `out_dir/<name>.zarr`. Never raises for bad input: returns a failed result."""
    t0 = time.perf_counter()
    out = Path(out_dir) / f"{job.name}.zarr"
    result = TileResult(job.name, str(job.path), "failed", store=str(out))
    try:
        if job.meta.get("missing_mask"):
            raise HistodgError(job.path, "no mask beside this image in the COSAS layout (expected mask/<same name>)")
        state = store_state(out)
        if state in ("complete", "partial") and not opts.overwrite:
            why = _existing_mismatch(out, job, opts)
            if why:
                raise StoreError(out, f"exists with other settings ({why}): use --overwrite or another output folder")
            if state == "complete":
                import zarr

                attrs = dict(zarr.open_group(str(out), mode="r").attrs)
                result.status, result.patches = "skipped", int(attrs.get("n_patches", 0))
                result.tissue_area_mm2 = attrs.get("tissue_area_mm2")
                result.bad_windows = len(attrs.get("bad_windows") or [])
                return result
        _run(job, out, opts, state, result, progress)
        result.status = "done"
    except HistodgError as exc:
        result.error = str(exc)
    except OSError as exc:
        result.error = f"{job.path}: {exc.strerror or exc}"
    finally:
        result.seconds = time.perf_counter() - t0
    return result


def _run(job: SlideJob, out: Path, opts: TileOptions, state: str, result: TileResult, progress) -> None:
    s = opts.settings
    with open_slide(job.path, opts.backend, mpp=job.mpp) as slide:
        grid = plan_grid(slide, s)
        ann = load_annotations(job.annotation, slide.dimensions, opts.labels) if job.annotation else None
        ds = slide.level_downsamples[grid.level]
        eff_scale = grid.eff_scale  # level-0 px per patch px, exactly as read
        mpp0 = slide.mpp
        thumb_px_um = grid.thumbnail_downsample * mpp0 if mpp0 else None
        tissue_mm2 = float(grid.tissue_mask.sum() * thumb_px_um**2 / 1e6) if thumb_px_um else None
        attrs = {
            **_wanted_attrs(job, opts),
            "mpp": grid.target_mpp,
            "mpp_actual": mpp0 * eff_scale if mpp0 else None,
            "level0_size": grid.read_size * ds,
            "read_level": grid.level,
            "read_size": grid.read_size,
            "source": _source_attrs(job.path),
            "annotation": str(job.annotation.resolve()) if job.annotation else None,
            "labels": opts.labels.label_names() if ann is not None else None,
            "backend": slide.backend,
            "slide_mpp": mpp0,
            "slide_dimensions": list(slide.dimensions),
            "windows_total": grid.total_windows,
            "windows_planned": len(grid),
            "meta": dict(job.meta),
        }
        if ann is not None and hasattr(ann, "skipped") and ann.skipped:
            attrs["annotations_skipped"] = dict(ann.skipped)
        writer = StoreWriter.resume(out) if state == "partial" and not opts.overwrite else None
        if writer is not None and writer.capacity == len(grid):
            result.resumed = True
        else:
            writer = StoreWriter(out, attrs, len(grid), s.tile_size, ann is not None, opts.compression,
                                 opts.jpeg_quality).create()
        if progress:
            progress(total=len(grid), done=writer.plan_done)
        source = _extract(slide, grid, ann, writer, opts, eff_scale, progress)
        n_bad = len(writer.bad)
        if len(grid) and n_bad > opts.max_bad_fraction * len(grid):
            shutil.rmtree(out, ignore_errors=True)
            first = writer.bad[0]["reason"]
            raise SlideError(
                job.path,
                f"{n_bad} of {len(grid)} windows ({n_bad / len(grid):.0%}) cannot be decoded, more than "
                f"--max-bad-fraction {opts.max_bad_fraction:g}; first: {first}",
            )
        extra = {"tissue_area_mm2": tissue_mm2}
        if source is not None and not source.ok:
            extra["source_tiles_not_copied"] = source.why
        writer.finish(extra)
        result.patches, result.bad_windows, result.tissue_area_mm2 = writer.count, n_bad, tissue_mm2


def read_window(slide, grid: Grid, xy, tile_size: int) -> np.ndarray:
    """One patch: read `read_size` level pixels at level-0 `xy`, resize to `tile_size`."""
    img = slide.read_region((int(xy[0]), int(xy[1])), grid.level, (grid.read_size, grid.read_size))
    return resize(img, (tile_size, tile_size))


def tiff_reader(slide) -> TiffTileReader | None:
    """The slide's TIFF tile reader, when it is read by one (not by OpenSlide or as an image)."""
    reader = getattr(slide, "reader", None)
    return reader if isinstance(reader, TiffTileReader) else None


class SourceTiles:
    """Windows that are exactly one JPEG tile of the source, for --compression jpeg: their bytes
    go into the store as they are (no decode, no re-encode, pixel-identical to the slide).

    Applies when the slide is read by our TIFF tile reader, the level's tiles are square JPEG of
    the patch size and windows are read without resampling; then every window on the tile grid
    and inside the image qualifies. The first such tile is decoded both ways once per slide: if a
    plain JPEG decode of the spliced stream differs from the slide's own decode (an unusual
    colour space), nothing is copied.
    """

    def __init__(self, slide, grid: Grid, size: int):
        self.reader = tiff_reader(slide)
        self.level = grid.level
        self.ds = slide.level_downsamples[grid.level]
        self.size = size
        self.ok = False
        self.why = "the slide is not read by the TIFF tile reader"
        if self.reader is None:
            return
        tw, th = self.reader.tile_size(self.level)
        if not self.reader.levels[self.level].is_jpeg:
            self.why = "the source tiles are not JPEG"
        elif (tw, th) != (size, size) or grid.read_size != size:
            self.why = f"patches of {size} px read as {grid.read_size} px do not match {tw}x{th} px source tiles"
        else:
            self.ok, self.why = self._verify(grid), "a plain JPEG decode of a source tile differs from the slide's"

    def tile_of(self, xy) -> tuple[int, int] | None:
        x, y = int(np.floor(xy[0] / self.ds)), int(np.floor(xy[1] / self.ds))
        if x % self.size or y % self.size:
            return None
        return y // self.size, x // self.size

    def raw(self, xy) -> bytes | None:
        """The window's patch as the source's JPEG stream, or None to read and encode it."""
        t = self.tile_of(xy) if self.ok else None
        return self.reader.raw_jpeg(self.level, *t) if t is not None else None

    def _verify(self, grid: Grid) -> bool:
        from .jpegcodec import decode_patch

        for xy in grid.coords[:64]:
            t = self.tile_of(xy)
            if t is None:
                continue
            try:
                data = self.reader.raw_jpeg(self.level, *t)
                if data is None:
                    continue
                ref = self.reader.tile(self.level, *t)
                return bool(np.array_equal(decode_patch(data, ref.shape), ref))
            except (TileDecodeError, ValueError, RuntimeError):
                continue  # a damaged tile proves nothing: try the next
        return False


def _extract(slide, grid: Grid, ann, writer: StoreWriter, opts: TileOptions, eff_scale: float, progress) -> None:
    size = opts.settings.tile_size
    start = writer.plan_done
    n = len(grid)
    source = SourceTiles(slide, grid, size) if opts.compression == "jpeg" else None
    reader = tiff_reader(slide)
    if reader is not None and opts.settings.overlap == 0:
        reader.cache_whole_tiles = False  # windows never share a tile: caching one only costs memory

    def work(i0: int, i1: int):
        """Read, rasterise and compress windows i0..i1-1 (a few per task keeps overhead low)."""
        out = []
        for i in range(i0, i1):
            xy = grid.coords[i]
            try:
                raw = source.raw(xy) if source is not None else None
                img = read_window(slide, grid, xy, size) if raw is None else None
            except SlideError as exc:
                out.append((i, None, exc.reason, False))
                continue
            mask = ann.rasterize(float(xy[0]), float(xy[1]), eff_scale, size) if ann is not None else None
            out.append((i, writer.encode(img, mask, raw), None, raw is not None))
        return out

    workers = max(1, int(opts.workers))
    step = WINDOWS_PER_TASK
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="histodg-read") as pool, gc_paused():
        _pump(pool, work, grid, writer, progress, start, n, step, workers)
    return source


@contextmanager
def gc_paused():
    """No cyclic garbage collection while windows stream through (the loop makes no cycles).

    A full collection walks every object of the process (zarr, numpy, torch ...) holding the GIL,
    which stalls the reader threads; on 2 cores it cost more than writing the store.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _pump(pool, work, grid, writer, progress, start, n, step, workers) -> None:
    """Submit window batches ahead of the writer, collect them in plan order, write shards."""
    depth = writer.shard // step + 4 * workers  # keep readers busy while a shard is written
    pending: deque = deque()
    nxt = start
    last_commit = time.monotonic()
    while nxt < n or pending:
        while nxt < n and len(pending) < depth:
            pending.append(pool.submit(work, nxt, min(nxt + step, n)))
            nxt += step
        for i, encoded, err, copied in pending.popleft().result():
            if err is not None:
                writer.add_bad(grid.coords[i], err)
            else:
                writer.append(encoded, grid.coords[i], grid.tissue[i], copied)
            if writer.buffered >= writer.shard:
                writer.flush()
                if time.monotonic() - last_commit >= COMMIT_SECONDS:
                    writer.commit(i + 1)
                    last_commit = time.monotonic()
            if progress:
                progress(advance=1)
    writer.flush()
    writer.commit(n)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))
