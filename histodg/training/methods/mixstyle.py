"""mixstyle: MixStyle (Zhou et al., ICLR 2021) after the first encoder stages.

As the official code: with probability `p` per forward (training only) each image's feature
statistics are mixed with a partner's, lambda ~ Beta(alpha, alpha) per image. Partners are
drawn at random on every forward: "crossdomain" takes each image's partner from another domain
(the official code's shuffled halves, for any number of domains), "random" from anywhere."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...model.taps import shallow_stages
from .erm import ERM
from .ops import StageHooks, mixstyle


@dataclass(frozen=True)
class MixStyleHparams:
    p: float = field(default=0.5, metadata={"help": "probability of mixing at each hooked stage"})
    alpha: float = field(default=0.1, metadata={"help": "Beta(alpha, alpha) mixing weight"})
    stages: int = field(default=2, metadata={"help": "first encoder stages followed by MixStyle (paper: res1, res2)"})
    mix: str = field(default="crossdomain", metadata={"help": "crossdomain (partner from another domain) or random"})

    def __post_init__(self):
        if self.mix not in ("crossdomain", "random"):
            raise ValueError("mix must be crossdomain or random")


def crossdomain_partners(sizes: list[int]) -> torch.Tensor:
    """For images in domain order (sizes[d] of domain d): each one's partner, a random image of a
    random other domain."""
    starts = torch.tensor([0] + sizes[:-1]).cumsum(0)
    domain = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    other = (domain + torch.randint(1, len(sizes), (len(domain),))) % len(sizes)  # any domain but its own
    within = (torch.rand(len(domain)) * torch.tensor(sizes)[other]).long()
    return starts[other] + within


class MixStyle(ERM):
    """ERM with instance feature statistics mixed between images (of different domains) early in the encoder."""

    name = "mixstyle"
    Hparams = MixStyleHparams

    def __init__(self, model, num_domains, hparams=None, task=None, normalizer=None):
        super().__init__(model, num_domains, hparams, task, normalizer)
        self._sizes: list[int] = []
        self.hooks = StageHooks(shallow_stages(model, self.hparams.stages), self._mix, self.hparams.p)

    def close(self) -> None:
        self.hooks.remove()

    def _partner(self, n: int, device) -> torch.Tensor:
        sizes = self._sizes
        if self.hparams.mix == "crossdomain" and len(sizes) > 1 and sum(sizes) == n:
            return crossdomain_partners(sizes).to(device)
        return torch.randperm(n, device=device)

    def _mix(self, x):
        return mixstyle(x, self.hparams.alpha, self._partner(x.shape[0], x.device))

    def loss(self, batches):
        self._sizes = [len(b[0]) for b in batches]
        return super().loss(batches)
