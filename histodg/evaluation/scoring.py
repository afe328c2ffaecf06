"""Scores of many images: per image, per domain and overall, as the challenges report them.

Scores follow `metrics` (challenge conventions): an image whose prediction and truth are both
empty scores 1; per domain and overall are means over images. Annotation label 255 is ignored;
any other non-zero label is foreground. The domain of an image is its organ or scanner
(`domain_axis`), by default whichever of the two it knows (organ first).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import HistodgError
from ..constants import IGNORE, UNKNOWN
from ..domains import Domain
from .metrics import ScoreBoard, dice_from, iou_from


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
    shift: dict | None = None  # the image's domain-shift score (`model.shift.slide_shift`): a store's, or a prediction's done.json
    classes: dict | None = None  # a multi-class prediction: {class name: {"dice", "iou", "predicted_px", "true_px"}}


@dataclass
class Evaluation:
    images: list[ImageScore] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, name: str, domain: str, inter: int, n_pred: int, n_true: int, source: str = "",
            shift: dict | None = None, classes: dict | None = None) -> ImageScore:
        """`classes`: {class name: (|P & T|, |P|, |T|)} of a multi-class prediction, each class alone."""
        per_class = None if classes is None else {
            k: {"dice": dice_from(*c), "iou": iou_from(*c), "predicted_px": int(c[1]), "true_px": int(c[2])}
            for k, c in classes.items()}
        s = ImageScore(name, domain, dice_from(inter, n_pred, n_true), iou_from(inter, n_pred, n_true),
                       int(inter), int(n_pred), int(n_true), source, shift, per_class)
        self.images.append(s)
        return s

    def table(self) -> dict:
        """{"images": [...], "domains": {name: scores}, "overall": scores, "mean_domain_dice": ...,
        "errors": [...]}; scores as in metrics.ScoreBoard (dice/iou = mean over images)."""
        board = ScoreBoard()
        for s in self.images:
            board.add(s.domain, s.intersection, s.predicted_px, s.true_px)
        t = board.table()
        names = sorted({k for s in self.images for k in (s.classes or {})})
        classes = {k: float(np.mean([s.classes[k]["dice"] for s in self.images if s.classes and k in s.classes]))
                   for k in names}  # per class: the mean Dice over the images that have the class
        return {"images": [asdict(s) for s in self.images], **t, **({"classes": classes} if classes else {}),
                "errors": list(self.errors)}


def domain_of(organ: str | None, scanner: str | None, axis: str | None = None) -> str:
    """The row an image is counted in: `domains.Domain.name` (with no axis, the organ, else the scanner)."""
    return Domain(organ or UNKNOWN, scanner or UNKNOWN).name(axis)


def binarise_truth(labels: np.ndarray) -> np.ndarray:
    """Labels -> 0 / 1 / 255 (ignore): any non-zero label but 255 is foreground."""
    return np.where(labels == IGNORE, IGNORE, labels > 0).astype(np.uint8)


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
