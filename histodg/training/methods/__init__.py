"""Training methods, by name. A method is a file here plus one entry in this dict.

Each is a `Method` (see base.py): `loss(batches)` over a list of per-domain minibatches.
"""
from __future__ import annotations

from .base import Method, NoHparams, SegTask, describe, parse_hparams, seg_loss
from .coral import Coral
from .dsbn import DSBN
from .dsu import DSU
from .erm import ERM
from .fishr import Fishr
from .mixstyle import MixStyle
from .sds import SDS
from .stain import Stain

METHODS: dict[str, type[Method]] = {
    "erm": ERM,
    "stain": Stain,
    "mixstyle": MixStyle,
    "dsu": DSU,
    "coral": Coral,
    "fishr": Fishr,
    "sds": SDS,
    "dsbn": DSBN,
}

__all__ = ["METHODS", "Method", "NoHparams", "SegTask", "describe", "parse_hparams", "seg_loss"]
