"""Training methods, by name. A method is a file here plus one entry in this dict.

Each is a `Method` (see base.py): `loss(batches)` over a list of per-domain minibatches.
"""
from __future__ import annotations

from .base import Method, NoHparams, SegTask, describe, parse_hparams, seg_loss
from .erm import ERM

METHODS: dict[str, type[Method]] = {
    "erm": ERM,
}

__all__ = ["METHODS", "Method", "NoHparams", "SegTask", "describe", "parse_hparams", "seg_loss"]
