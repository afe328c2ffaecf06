"""`done.json`: the record of a finished prediction, written last, and what a rerun checks in it.

A folder with `done.json` is finished: a rerun skips it unless it was made with other
settings (`settings` below), from another checkpoint file content (`checkpoint_sha256`) or from
a changed slide (`source`), which are refused with one line. Keys:

| key | what |
| --- | --- |
| `histodg_version`, `name`, `source` (path, size, mtime), `organ`, `scanner`, `meta` | the input |
| `model` | the checkpoint, its sha256, arch, encoder, classes, labels, method, trained mpp and tile |
| `settings` | checkpoint, checkpoint_sha256, mpp, tile_size, overlap_px, tta, threshold, tissue_method, window_fraction, adapt, stain (the applied stain reference), geojson_tiles (compared on rerun); batch_size, device, amp, workers, threshold_u8, mpp_tolerance |
| `slide` | dimensions, mpp, backend, read_level, read_size |
| `output` | shape (H, W) and mpp of prob.zarr, level0_per_px, chunk, geojson_factor, polygons |
| `windows` | grid, tissue, run, bad, bad_list (first 100: level-0 x, y, reason) |
| `stitching` | chunk, cache_chunks, max_alive, spilled, reloaded |
| `tumor_pixels`, `tumor_area_mm2`, `timings`, `files` | the result |
| `stain_unnormalised` | windows stain normalisation left as they were (too little tissue), when it is on |
| `shift` | the domain-shift score (`model.shift`): score (x the farthest training slide), raw, nearest (training domain), percentile (of training slides closer), warn, windows, calibration_slides; null when the checkpoint has no reference (trained before it) |
"""
from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..files import read_json, setting_diffs, source_fingerprint, write_json_atomic

DONE = "done.json"


def compared_settings(predictor, options) -> dict:
    """The settings a finished prediction must have been made with to be reused."""
    return {"checkpoint": predictor.checkpoint, "checkpoint_sha256": predictor.checkpoint_sha256,
            "mpp": predictor.mpp, "tile_size": predictor.tile, "overlap_px": predictor.overlap, "tta": options.tta,
            "threshold": options.threshold, "tissue_method": options.tissue_method,
            "window_fraction": options.window_fraction, "adapt": options.adapt, "stain": predictor.stain,
            "geojson_tiles": options.geojson_tiles, "qc": options.qc}


def reuse_mismatch(done: dict, predictor, job) -> str | None:
    """Why a finished prediction cannot be kept for this job (None when it can)."""
    have = {"adapt": "none", "stain": None, "geojson_tiles": False, **(done.get("settings") or {})}  # made before --adapt / --stain-norm: without
    have.setdefault("qc", predictor.options.qc)  # made before artefact QC: kept as it is
    return setting_diffs(have, compared_settings(predictor, predictor.options), done.get("source"),
                         job.path, {"checkpoint_sha256": "the checkpoint file's contents differ",
                                    "stain": "the stain normalisation differs"})


def read_done(out: Path) -> dict | None:
    """A finished prediction's done.json, or None when the folder is unfinished or missing."""
    path = Path(out) / DONE
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def write_done(out: Path, record: dict) -> None:
    write_json_atomic(Path(out) / DONE, {"histodg_version": __version__, **record})


def input_record(job) -> dict:
    return {"name": job.name, "source": source_fingerprint(job.path), "organ": job.organ, "scanner": job.scanner,
            "meta": dict(job.meta)}
