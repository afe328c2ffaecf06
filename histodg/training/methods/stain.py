"""stain: ERM with HED stain augmentation (Tellez et al., 2018), the pathology standard."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..augment import hed_jitter
from .erm import ERM


@dataclass(frozen=True)
class StainHparams:
    sigma: float = field(default=0.05, metadata={"help": "per-stain scale jitter: x (1 +- sigma)"})
    bias: float = field(default=0.05, metadata={"help": "per-stain shift jitter: + (+-bias), optical-density units"})
    p: float = field(default=1.0, metadata={"help": "fraction of images augmented"})


class Stain(ERM):
    """ERM on inputs with random HED (haematoxylin-eosin-DAB) stain scale and shift per image."""

    name = "stain"
    Hparams = StainHparams

    def loss(self, batches):
        hp = self.hparams
        if self.training and self.normalizer is not None:
            batches = [(self.normalizer(hed_jitter(self.normalizer.inverse(x), hp.sigma, hp.bias, hp.p)), y)
                       for x, y in batches]
        return super().loss(batches)
