"""Scoring finished `histodg predict` outputs against annotations (`histodg evaluate PREDICTIONS --truth`).

The truth (GeoJSON / ASAP XML / mask images) is rasterised at the prediction's resolution,
pixel centres (see `slides.annotations`). `truth` is a folder of files named after the slides,
one file, or a CSV manifest with `path` (or `name`) and `annotation` columns (`organ`,
`scanner` too).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import exc_line
from ..batch import collected
from ..constants import IGNORE, UNKNOWN
from ..inference.done import DONE, read_done
from ..inference.prob_map import NAME as PROB
from ..inference.prob_map import open_classes, open_probability
from ..inference.rasters import threshold_u8
from ..slides.annotation_files import load_annotations
from ..slides.inputs import find_annotation, manifest_jobs
from .metrics import counts
from .scoring import EvaluateError, Evaluation, binarise_truth, domain_of


def find_predictions(paths) -> tuple[list[Path], list[str]]:
    """Prediction folders (with done.json) among `paths` and their sub-folders; errors for the rest."""
    found, errors = [], []
    for p in map(Path, paths):
        if (p / DONE).is_file():
            found.append(p)
        elif p.is_dir():
            subs = sorted(q for q in p.iterdir() if q.is_dir())
            done = [q for q in subs if (q / DONE).is_file()]
            unfinished = [q for q in subs if not (q / DONE).is_file() and (q / PROB).exists()]
            errors.extend(f"{q}: unfinished prediction (no done.json): rerun `histodg predict`" for q in unfinished)
            if (p / PROB).exists():
                errors.append(f"{p}: unfinished prediction (no done.json): rerun `histodg predict`")
            elif not done and not unfinished:
                errors.append(f"{p}: no histodg predictions here (folders with done.json)")
            found.extend(done)
        else:
            errors.append(f"{p}: not a prediction folder")
    return found, errors


class TruthIndex:
    """Ground truth for slides: a folder of files named after them, one file, or a CSV manifest."""

    def __init__(self, truth: Path, count: int):
        self.path = Path(truth)
        self.rows = None
        if not self.path.exists():
            raise EvaluateError(self.path, "ground truth file or folder not found")
        if self.path.is_file() and self.path.suffix.lower() == ".csv":
            self.rows = manifest_jobs(self.path, UNKNOWN, UNKNOWN)
        elif self.path.is_file() and count > 1:
            raise EvaluateError(self.path, f"one ground truth file for {count} predictions: pass a folder named after the slides or a manifest")

    def lookup(self, name: str, source: Path) -> tuple[Path, str, str]:
        """(annotation path, organ, scanner) for a slide; organ/scanner 'unknown' unless a manifest says."""
        if self.rows is not None:
            for j in self.rows:
                if j.name == name or j.path.resolve() == source.resolve() or j.path.stem == source.stem:
                    if j.annotation is None:
                        raise EvaluateError(self.path, f"no annotation for {name} in the manifest")
                    return j.annotation, j.organ, j.scanner
            raise EvaluateError(self.path, f"{name} is not in the manifest")
        if self.path.is_file():
            return self.path, UNKNOWN, UNKNOWN
        found = find_annotation(self.path, source.stem) or find_annotation(self.path, name)
        if found is None:
            raise EvaluateError(self.path, f"no ground truth named after {source.stem} (or {name}) here")
        return found, UNKNOWN, UNKNOWN


def _region_of(pred_dir: Path, done: dict, dims: tuple[int, int]):
    """The region (`slides.roi.Region`) a prediction was made inside (`predict --roi`), or None."""
    from ..files import file_sha256
    from ..slides.roi import Region

    roi = done.get("roi") or {}
    if not roi.get("file"):
        return None
    path = Path(roi["file"])
    if not path.is_file():
        raise EvaluateError(pred_dir, f"predicted inside the region {path}, which is not there any more: "
                                      f"it is needed to score inside it")
    if roi.get("sha256") and file_sha256(path) != roi["sha256"]:
        raise EvaluateError(path, "changed since the prediction was made inside it: predict again (--overwrite)")
    return Region.load(path, dims, roi.get("class"))


def score_prediction(pred_dir: Path, annotation: Path, labels=None, threshold: float | None = None,
                     chunk: int = 1024) -> tuple[int, int, int]:
    """(|P & T|, |P|, |T|) of one finished prediction against an annotation file, at the
    prediction's output resolution, a chunk at a time."""
    done = read_done(pred_dir)
    if done is None:
        raise EvaluateError(pred_dir, "unfinished prediction (no done.json)")
    try:
        prob = open_probability(pred_dir)
        scale = float(done["output"]["level0_per_px"])
        dims = tuple(done["slide"]["dimensions"])
        cut = threshold_u8(threshold if threshold is not None else done["settings"]["threshold"])
    except Exception as exc:
        raise EvaluateError(pred_dir, f"not a readable prediction ({exc_line(exc)})") from None
    ann = load_annotations(annotation, dims, labels)
    region = _region_of(pred_dir, done, dims)
    h, w = prob.shape
    total = np.zeros(3, np.int64)
    for y in range(0, h, chunk):
        for x in range(0, w, chunk):
            try:
                p = np.asarray(prob[y : y + chunk, x : x + chunk]) >= cut
            except Exception as exc:  # the codecs' own errors: a damaged probability map
                raise EvaluateError(pred_dir / PROB, f"damaged: the region at ({x}, {y}) cannot be read "
                                                     f"({exc_line(exc, 120)}); rerun `histodg predict --overwrite`") from None
            t = binarise_truth(ann.rasterize(x * scale, y * scale, scale, chunk)[: p.shape[0], : p.shape[1]])
            if region is not None:  # scored inside the region the prediction was made in
                t[~region.raster(x * scale, y * scale, scale, chunk)[: p.shape[0], : p.shape[1]]] = IGNORE
            total += counts(p, t)
    return int(total[0]), int(total[1]), int(total[2])


def score_classes(pred_dir: Path, annotation: Path, labels=None, chunk: int = 1024) -> dict:
    """A multi-class prediction (`classes.zarr`) scored class by class: {class name: (|P & T|, |P|,
    |T|)}, the truth's classes mapped to labels by `labels` (`--label`), else by the model's own
    label names (`done.json`'s model labels: a truth class named as a training label has its value)."""
    from ..slides.annotations import LabelMap

    done = read_done(pred_dir) or {}
    names = {int(k): v for k, v in ((done.get("model") or {}).get("labels") or {}).items() if int(k) > 0}
    if labels is None or not labels.mapping:
        labels = LabelMap.parse([f"{v}={k}" for k, v in names.items()])
    pred = open_classes(pred_dir)
    scale = float(done["output"]["level0_per_px"])
    ann = load_annotations(annotation, tuple(done["slide"]["dimensions"]), labels)
    region = _region_of(pred_dir, done, tuple(done["slide"]["dimensions"]))
    h, w = pred.shape
    total = {k: np.zeros(3, np.int64) for k in names}
    for y in range(0, h, chunk):
        for x in range(0, w, chunk):
            p = np.asarray(pred[y : y + chunk, x : x + chunk])
            t = ann.rasterize(x * scale, y * scale, scale, chunk)[: p.shape[0], : p.shape[1]].copy()
            if region is not None:
                t[~region.raster(x * scale, y * scale, scale, chunk)[: p.shape[0], : p.shape[1]]] = IGNORE
            for k in names:
                total[k] += counts(p, t, positive=k)
    return {names[k]: tuple(int(v) for v in c) for k, c in total.items()}


def evaluate_predictions(paths, truth: Path, domain_axis: str | None = None, threshold: float | None = None,
                         labels=None, progress=None) -> Evaluation:
    """Score finished predictions (folders with done.json, or folders of them) against `truth`."""

    found, errors = find_predictions(paths)
    ev = Evaluation(errors=errors)
    index = TruthIndex(truth, len(found))
    if progress:
        progress(total=len(found), done=0)
    for d in found:
        with collected(ev.errors, d):
            done = read_done(d) or {}
            name = done.get("name") or d.name
            source = Path((done.get("source") or {}).get("path") or name)
            annotation, organ, scanner = index.lookup(name, source)
            organ = organ if organ != UNKNOWN else done.get("organ")
            scanner = scanner if scanner != UNKNOWN else done.get("scanner")
            counts = score_prediction(d, annotation, labels, threshold)
            classes = score_classes(d, annotation, labels) if open_classes(d) is not None else None
            ev.add(name, domain_of(organ, scanner, domain_axis), *counts, source=str(d), shift=done.get("shift"),
                   classes=classes)
        if progress:
            progress(advance=1)
    return ev
