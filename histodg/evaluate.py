"""Dice and IoU of predictions against ground truth: per image, per domain, overall.

Two ways in:

- `evaluate_stores(predictor, stores)`: run a model on the patches of stores with masks (made by
  `histodg tile --annotations`, or COSAS images). An image is a store: its counts (|P & T|, |P|,
  |T|) are summed over its patches, which is the image's Dice for a tiling without overlap (a
  COSAS image, a slide tiled with `--overlap 0`).
- `evaluate_predictions(pred_dirs, truth)`: score finished `histodg predict` outputs against
  GeoJSON / ASAP XML / mask-image annotations, rasterised at the prediction's resolution (pixel
  centres, see annotations.py). `truth` is a folder of files named after the slides, one file,
  or a CSV manifest with `path` (or `name`) and `annotation` columns (`organ`, `scanner` too).

Scores follow metrics.py (challenge conventions): an image whose prediction and truth are both
empty scores 1; per domain and overall are means over images. Annotation label 255 is ignored;
any other non-zero label is foreground. The domain of an image is its organ or scanner
(`domain_axis`), by default whichever of the two it knows (organ first).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import HistodgError
from .metrics import IGNORE, ScoreBoard, dice_from, iou_from

UNKNOWN = "unknown"
DOMAIN_AXES = ("organ", "scanner")


class EvaluateError(HistodgError):
    """Something to score cannot be read or has no ground truth."""


@dataclass
class ImageScore:
    name: str
    domain: str
    dice: float
    iou: float
    intersection: int
    predicted_px: int
    true_px: int
    source: str = ""


@dataclass
class Evaluation:
    images: list[ImageScore] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, name: str, domain: str, inter: int, n_pred: int, n_true: int, source: str = "") -> ImageScore:
        s = ImageScore(name, domain, dice_from(inter, n_pred, n_true), iou_from(inter, n_pred, n_true),
                       int(inter), int(n_pred), int(n_true), source)
        self.images.append(s)
        return s

    def table(self) -> dict:
        """{"images": [...], "domains": {name: scores}, "overall": scores, "mean_domain_dice": ...,
        "errors": [...]}; scores as in metrics.ScoreBoard (dice/iou = mean over images)."""
        board = ScoreBoard()
        for s in self.images:
            board.add(s.domain, s.intersection, s.predicted_px, s.true_px)
        t = board.table()
        return {"images": [asdict(s) for s in self.images], **t, "errors": list(self.errors)}


def domain_of(organ: str | None, scanner: str | None, axis: str | None = None) -> str:
    organ, scanner = organ or UNKNOWN, scanner or UNKNOWN
    if axis == "organ":
        return organ
    if axis == "scanner":
        return scanner
    return organ if organ != UNKNOWN else scanner


def binarise_truth(labels: np.ndarray) -> np.ndarray:
    """Labels -> 0 / 1 / 255 (ignore): any non-zero label but 255 is foreground."""
    return np.where(labels == IGNORE, IGNORE, labels > 0).astype(np.uint8)


# -- stores --------------------------------------------------------------------------------------
def score_store(predictor, store, cut: int) -> tuple[int, int, int]:
    """(|P & T|, |P|, |T|) summed over the patches of one store."""
    import torch

    from .metrics import batch_counts

    if store.masks is None:
        raise EvaluateError(store.path, "store has no masks to score against (tile it with --annotations)")
    if abs(store.mpp / predictor.mpp - 1) > 0.02:
        raise EvaluateError(store.path, f"patches are at {store.mpp:g} um/px but the model runs at {predictor.mpp:g} um/px: "
                                        f"tile the images at the model's resolution")
    B = predictor.options.batch_size
    total = np.zeros(3, np.int64)
    for i in range(0, len(store), B):
        images = torch.from_numpy(np.ascontiguousarray(store.images[i : i + B]))
        truth = torch.from_numpy(binarise_truth(np.asarray(store.masks[i : i + B])))
        p = predictor.probabilities(images)
        pred = (torch.floor(p * 255 + 0.5) >= cut).cpu()
        inter, n_pred, n_true = batch_counts(pred, truth)
        total += [inter.sum(), n_pred.sum(), n_true.sum()]
    return int(total[0]), int(total[1]), int(total[2])


def evaluate_stores(predictor, paths, domain_axis: str | None = None, threshold: float | None = None,
                    progress=None) -> Evaluation:
    """Run `predictor` on every store's patches and score them against the stores' masks."""
    from .export import threshold_u8
    from .store import StoreError, find_stores, open_store

    cut = threshold_u8(predictor.options.threshold if threshold is None else threshold)
    ev = Evaluation()
    stores = []
    for p in paths:
        try:
            stores.extend(find_stores([p]))
        except (StoreError, OSError) as exc:
            ev.errors.append(str(exc))
    if progress:
        progress(total=len(stores), done=0)
    for path in stores:
        try:
            store = open_store(path)
            counts = score_store(predictor, store, cut)
            ev.add(store.name, domain_of(store.organ, store.scanner, domain_axis), *counts, source=str(path))
        except HistodgError as exc:
            ev.errors.append(str(exc))
        if progress:
            progress(advance=1)
    return ev


# -- finished predictions ---------------------------------------------------------------------------
def find_predictions(paths) -> tuple[list[Path], list[str]]:
    """Prediction folders (with done.json) among `paths` and their sub-folders; errors for the rest."""
    from .predict import DONE

    found, errors = [], []
    for p in map(Path, paths):
        if (p / DONE).is_file():
            found.append(p)
        elif p.is_dir():
            subs = sorted(q for q in p.iterdir() if q.is_dir())
            done = [q for q in subs if (q / DONE).is_file()]
            unfinished = [q for q in subs if not (q / DONE).is_file() and (q / "prob.zarr").exists()]
            errors.extend(f"{q}: unfinished prediction (no done.json): rerun `histodg predict`" for q in unfinished)
            if (p / "prob.zarr").exists():
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
        from .inputs import manifest_jobs

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
        from .inputs import ANNOTATION_SUFFIXES, SlideJob, attach_annotations

        if self.rows is not None:
            for j in self.rows:
                if j.name == name or j.path.resolve() == source.resolve() or j.path.stem == source.stem:
                    if j.annotation is None:
                        raise EvaluateError(self.path, f"no annotation for {name} in the manifest")
                    return j.annotation, j.organ, j.scanner
            raise EvaluateError(self.path, f"{name} is not in the manifest")
        if self.path.is_file():
            return self.path, UNKNOWN, UNKNOWN
        job = attach_annotations([SlideJob(source, name)], self.path)[0]
        if job.annotation is None:
            for suffix in ANNOTATION_SUFFIXES:
                cand = self.path / f"{name}{suffix}"
                if cand.is_file():
                    return cand, UNKNOWN, UNKNOWN
            raise EvaluateError(self.path, f"no ground truth named after {source.stem} (or {name}) here")
        return job.annotation, UNKNOWN, UNKNOWN


def score_prediction(pred_dir: Path, annotation: Path, labels=None, threshold: float | None = None,
                     chunk: int = 1024) -> tuple[int, int, int]:
    """(|P & T|, |P|, |T|) of one finished prediction against an annotation file, at the
    prediction's output resolution, a chunk at a time."""
    import zarr

    from .annotations import load_annotations
    from .export import threshold_u8
    from .metrics import counts
    from .predict import read_done

    done = read_done(pred_dir)
    if done is None:
        raise EvaluateError(pred_dir, "unfinished prediction (no done.json)")
    try:
        prob = zarr.open_array(str(Path(pred_dir) / "prob.zarr"), mode="r")
        scale = float(done["output"]["level0_per_px"])
        dims = tuple(done["slide"]["dimensions"])
        cut = threshold_u8(threshold if threshold is not None else done["settings"]["threshold"])
    except Exception as exc:
        raise EvaluateError(pred_dir, f"not a readable prediction ({str(exc).splitlines()[0][:160]})") from None
    ann = load_annotations(annotation, dims, labels)
    h, w = prob.shape
    total = np.zeros(3, np.int64)
    for y in range(0, h, chunk):
        for x in range(0, w, chunk):
            p = np.asarray(prob[y : y + chunk, x : x + chunk]) >= cut
            t = ann.rasterize(x * scale, y * scale, scale, chunk)[: p.shape[0], : p.shape[1]]
            total += counts(p, binarise_truth(t))
    return int(total[0]), int(total[1]), int(total[2])


def evaluate_predictions(paths, truth: Path, domain_axis: str | None = None, threshold: float | None = None,
                         labels=None, progress=None) -> Evaluation:
    """Score finished predictions (folders with done.json, or folders of them) against `truth`."""
    from .predict import read_done

    found, errors = find_predictions(paths)
    ev = Evaluation(errors=errors)
    index = TruthIndex(truth, len(found))
    if progress:
        progress(total=len(found), done=0)
    for d in found:
        try:
            done = read_done(d) or {}
            name = done.get("name") or d.name
            source = Path((done.get("source") or {}).get("path") or name)
            annotation, organ, scanner = index.lookup(name, source)
            organ = organ if organ != UNKNOWN else done.get("organ")
            scanner = scanner if scanner != UNKNOWN else done.get("scanner")
            counts = score_prediction(d, annotation, labels, threshold)
            ev.add(name, domain_of(organ, scanner, domain_axis), *counts, source=str(d))
        except HistodgError as exc:
            ev.errors.append(str(exc))
        if progress:
            progress(advance=1)
    return ev


# -- printing --------------------------------------------------------------------------------------
def print_evaluation(table: dict, title: str = "histodg evaluate") -> None:
    """Per-image, per-domain and overall tables (rich, on stdout)."""
    from rich.markup import escape
    from rich.table import Table

    from .report import out

    def f(v):
        return "" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4f}"

    images = Table(title=f"{title}: {len(table['images'])} image(s)", title_justify="left")
    for c in ("image", "domain", "Dice", "IoU", "predicted px", "true px"):
        images.add_column(c, justify="left" if c in ("image", "domain") else "right")
    for r in table["images"]:
        images.add_row(escape(r["name"]), escape(r["domain"]), f(r["dice"]), f(r["iou"]), str(r["predicted_px"]),
                       str(r["true_px"]))
    out.print(images)
    doms = Table(title="per domain (mean over images)", title_justify="left")
    for c in ("domain", "images", "Dice", "IoU", "Dice (pixels)", "IoU (pixels)"):
        doms.add_column(c, justify="left" if c == "domain" else "right")
    for name, s in table["domains"].items():
        doms.add_row(escape(name), str(s["images"]), f(s["dice"]), f(s["iou"]), f(s["dice_pixels"]), f(s["iou_pixels"]))
    o = table["overall"]
    doms.add_row("[bold]overall[/]", str(o["images"]), f(o["dice"]), f(o["iou"]), f(o["dice_pixels"]), f(o["iou_pixels"]),
                 style="bold")
    doms.caption = f"mean over domains: Dice {f(table['mean_domain_dice'])}"
    doms.caption_justify = "left"
    out.print(doms)


def to_json(table: dict) -> str:
    def clean(v):
        if isinstance(v, float) and np.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(table), indent=2)
