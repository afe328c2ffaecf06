"""Dice and IoU, per image, per domain and overall.

Conventions (the ones segmentation challenges use, COSAS included):
- per image: Dice = 2|P & T| / (|P| + |T|), IoU = |P & T| / |P | T|; pixels labelled 255 in the
  ground truth are ignored; an image where both prediction and truth are empty scores 1.0
  (nothing to find, nothing found), one where only one is empty scores 0.0;
- per domain and overall: the mean over images (`dice`) and, for training curves, the
  pixel-aggregated score over all images (`dice_pixels`, stable when patches are small).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..constants import IGNORE


def counts(pred: np.ndarray, target: np.ndarray, positive: int = 1) -> tuple[int, int, int]:
    """(|P & T|, |P|, |T|) for one image; `pred` bool or label map, `target` labels (255 ignored)."""
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {target.shape} differ in shape")
    valid = target != IGNORE
    p = (pred == positive) if pred.dtype != bool else pred
    t = target == positive
    p, t = p & valid, t & valid
    return int(np.count_nonzero(p & t)), int(np.count_nonzero(p)), int(np.count_nonzero(t))


def dice_from(inter: float, n_pred: float, n_true: float) -> float:
    denom = n_pred + n_true
    return 1.0 if denom == 0 else 2.0 * inter / denom


def iou_from(inter: float, n_pred: float, n_true: float) -> float:
    union = n_pred + n_true - inter
    return 1.0 if union == 0 else inter / union


@dataclass
class ScoreBoard:
    """Accumulates per-image counts by domain; `table()` gives per-domain and overall scores."""

    rows: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)

    def add(self, domain: str, inter: int, n_pred: int, n_true: int) -> None:
        self.rows.setdefault(domain, []).append((int(inter), int(n_pred), int(n_true)))

    def add_batch(self, domain: str, inter: np.ndarray, n_pred: np.ndarray, n_true: np.ndarray) -> None:
        for a, b, c in zip(inter.tolist(), n_pred.tolist(), n_true.tolist()):
            self.add(domain, a, b, c)

    @staticmethod
    def _scores(rows) -> dict:
        arr = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
        d = [dice_from(*r) for r in arr]
        j = [iou_from(*r) for r in arr]
        tot = arr.sum(0)
        return {
            "images": len(arr),
            "dice": float(np.mean(d)) if len(d) else float("nan"),
            "iou": float(np.mean(j)) if len(j) else float("nan"),
            "dice_pixels": dice_from(*tot) if len(arr) else float("nan"),
            "iou_pixels": iou_from(*tot) if len(arr) else float("nan"),
        }

    def table(self) -> dict:
        """{"domains": {name: scores}, "overall": scores over all images, "mean_domain_dice": ...}."""
        domains = {k: self._scores(v) for k, v in sorted(self.rows.items())}
        everything = [r for v in self.rows.values() for r in v]
        out = {"domains": domains, "overall": self._scores(everything)}
        out["mean_domain_dice"] = float(np.mean([s["dice"] for s in domains.values()])) if domains else float("nan")
        return out


def batch_counts(pred, target, positive: int = 1):
    """Vectorised `counts` over a batch of torch tensors (B, H, W): three int64 numpy arrays."""
    import torch

    valid = target != IGNORE
    p = (pred == positive) if pred.dtype != torch.bool else pred
    p = p & valid
    t = (target == positive) & valid
    inter = (p & t).flatten(1).sum(1)
    return inter.cpu().numpy(), p.flatten(1).sum(1).cpu().numpy(), t.flatten(1).sum(1).cpu().numpy()
