"""dsu: Domain Shifts with Uncertainty (Li et al., ICLR 2022) after the stem and every encoder stage.

As the official ResNet code: a perturbation after the stem's ReLU, after the max-pool and after
each of the four stages (six places), each one applied with probability `p` on every forward in
training (for timm encoders: after the stem and after every feature level; MiT's stem is a
token embedding, so there only the stages)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...model.taps import shallow_stages, stem_modules
from .erm import ERM
from .ops import StageHooks, dsu


@dataclass(frozen=True)
class DSUHparams:
    p: float = field(default=0.5, metadata={"help": "probability of resampling statistics at each hooked stage"})
    stages: int = field(default=4, metadata={"help": "encoder stages followed by DSU (paper: after every stage)"})
    stem: bool = field(default=True, metadata={"help": "also after the stem (paper: after the first ReLU and the max-pool)"})
    strength: float = field(default=1.0, metadata={"help": "scale of the statistics noise"})


class DSU(ERM):
    """ERM with each image's feature mean/std resampled from a Gaussian of the batch's spread."""

    name = "dsu"
    Hparams = DSUHparams

    def __init__(self, model, num_domains, hparams=None, task=None, normalizer=None):
        super().__init__(model, num_domains, hparams, task, normalizer)
        hp = self.hparams
        places = (stem_modules(model) if hp.stem else []) + (shallow_stages(model, hp.stages) if hp.stages else [])
        self.hooks = StageHooks(places, lambda x: dsu(x, hp.strength), hp.p)

    def close(self) -> None:
        self.hooks.remove()
