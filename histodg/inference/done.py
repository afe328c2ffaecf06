"""`done.json`: the record of a finished prediction, written last, and what a rerun checks in it.

A folder with `done.json` is finished: a rerun skips it unless it was made with other
settings (`settings` below), from another checkpoint file content (`checkpoint_sha256`) or from
a changed slide (`source`), which are refused with one line. Keys:

| key | what |
| --- | --- |
| `histodg_version`, `name`, `source` (path, size, mtime), `organ`, `scanner`, `meta` | the input |
| `model` | the checkpoint, its sha256, arch, encoder, classes, labels, method, trained mpp and tile |
| `settings` | checkpoint, checkpoint_sha256, mpp, tile_size, overlap_px, tta, threshold, tissue_method, window_fraction, adapt, stain (the applied stain reference), geojson_tiles, outputs, layout, roi (the region file's sha256 and class), qc, mpp_override (`--mpp-override` or the manifest's mpp; null: none), dsbn_route (a DSBN model's BatchNorm slot the slide went through: its domain's name or "shared"; null: a model without slots) (compared on rerun); batch_size, device, amp, workers, runtime (what ran the network: "torch" or "onnx", `--runtime`), threshold_u8, mpp_tolerance |
| `slide` | dimensions, mpp, backend, read_level, read_size |
| `output` | shape (H, W) and mpp of prob.zarr, level0_per_px, chunk, geojson_factor, polygons |
| `windows` | grid, tissue, run, bad, excluded (left out by `--qc exclude`), bad_list (first 100: level-0 x, y, reason) |
| `qc` | the artefact QC: mode, windows, flagged, excluded, counts (per flag), excluded_list (first 100), thresholds, area_mm2 (tissue left out); null with `--qc off` |
| `adaptation` | what was done to the BatchNorm for this slide: `--adapt`'s note, or a DSBN model's slot ("dsbn: the BatchNorm of s1", or the shared slot and why); null when nothing was |
| `stitching` | chunk, cache_chunks, max_alive, spilled, reloaded |
| `tumor_pixels`, `tumor_area_mm2`, `timings`, `files` | the result (the tumour: every annotated class together) |
| `classes` | per label ("1", "2", ...): name, pixels and area_mm2 of the pixels predicted that class (a binary model: its one class, the tumour) |
| `stain_unnormalised` | windows stain normalisation left as they were (too little tissue), when it is on |
| `roi` | `--roi`: file (absolute path), sha256 and class of the slide's region, area_mm2 (the region), tumor_area_mm2 (the tumour inside it: the slide's, as nothing outside is predicted); {"file": null, "note": ...} for a slide with no region file in the `--roi` folder (predicted whole); null without `--roi` |
| `shift` | the domain-shift score (`model.shift`): score (x the farthest training slide), raw, nearest (training domain), percentile (of training slides closer), warn, windows, calibration_slides; null when the checkpoint has no reference (trained before it) |
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from .. import __version__
from ..files import read_json, setting_diffs, source_fingerprint, write_json_atomic
from .adapt import dsbn_route

DONE = "done.json"


def compared_settings(predictor, options, job) -> dict:
    """The settings a finished prediction of `job` must have been made with to be reused."""
    return {"checkpoint": predictor.checkpoint, "checkpoint_sha256": predictor.checkpoint_sha256,
            "mpp": predictor.mpp, "tile_size": predictor.tile, "overlap_px": predictor.overlap, "tta": options.tta,
            "threshold": options.threshold, "tissue_method": options.tissue_method,
            "window_fraction": options.window_fraction, "adapt": options.adapt, "stain": predictor.stain,
            "geojson_tiles": options.write.geojson_tiles, "outputs": sorted(options.write.outputs),
            "layout": options.write.layout, "roi": roi_setting(options, job), "qc": options.read.qc, "mpp_override": job.mpp,
            "dsbn_route": dsbn_route(predictor, job)}


def roi_setting(options, job) -> dict | None:
    """The region a slide is predicted inside, as a rerun compares it: its file's contents and the
    class (None without --roi, or for a slide the --roi folder has no file for)."""
    if options.roi is None or job.region is None:
        return None
    from ..files import file_sha256

    try:
        return {"sha256": file_sha256(job.region), "class": options.roi_class}
    except OSError:
        return {"sha256": None, "class": options.roi_class}  # unreadable: the slide fails when it loads it


def reuse_mismatch(done: dict, predictor, job) -> str | None:
    """Why a finished prediction cannot be kept for this job (None when it can)."""
    have = {"adapt": "none", "stain": None, "geojson_tiles": False, "outputs": [], "layout": "folders", "roi": None,
            **(done.get("settings") or {})}  # made before these options: without them
    have.setdefault("qc", predictor.options.read.qc)  # made before artefact QC: kept as it is
    wanted = compared_settings(predictor, predictor.options, job)
    # Made before the DSBN route was recorded: taken to be the route the slide gets now (kept). Made before
    # mpp_override was recorded: read as made without one (None), and, as for any other, an override equal to
    # the um/px the slide was read at (`slide.mpp`: the same override, or its own mpp) changes nothing.
    have.setdefault("dsbn_route", wanted["dsbn_route"])
    if wanted["mpp_override"] is not None and (done.get("slide") or {}).get("mpp") == wanted["mpp_override"]:
        wanted.pop("mpp_override")
    return setting_diffs(have, wanted, done.get("source"),
                         job.path, {"checkpoint_sha256": "the checkpoint file's contents differ",
                                    "stain": "the stain normalisation differs", "roi": "the region (--roi) differs"})


def read_done(out: Path) -> dict | None:
    """A finished prediction's done.json, or None when the folder is unfinished or missing."""
    path = Path(out) / DONE
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


@dataclass
class DoneRecord:
    """done.json, typed: one field per part of the table above, each filled by the step that knows it;
    `to_dict()` is the file (the input's keys at the top level, as always)."""

    input: dict  # name, source, organ, scanner, meta (`input_record`)
    model: dict
    settings: dict
    slide: dict
    output: dict
    windows: dict
    qc: dict | None
    stitching: dict
    adaptation: str | None
    shift: dict | None
    stain_unnormalised: dict | None
    tumor_pixels: int
    tumor_area_mm2: float
    timings: dict
    files: list[str]
    roi: dict | None = None
    classes: dict | None = None

    def to_dict(self) -> dict:
        parts = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "input"}
        return {"histodg_version": __version__, **self.input, **parts}


def write_done(out: Path, record: DoneRecord) -> None:
    write_json_atomic(Path(out) / DONE, record.to_dict())


def input_record(job) -> dict:
    return {"name": job.name, "source": source_fingerprint(job.path), "organ": job.organ, "scanner": job.scanner,
            "meta": dict(job.meta)}
