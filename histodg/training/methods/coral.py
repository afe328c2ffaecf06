"""coral: Deep CORAL (Sun & Saenko, 2016) as in DomainBed, on the decoder's pixel features."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...device import float32
from ...model.taps import DecoderTap
from .base import Method, seg_loss


@dataclass(frozen=True)
class CoralHparams:
    weight: float = field(default=1.0, metadata={"help": "weight of the mean + covariance alignment penalty"})
    pixels: int = field(default=4096, metadata={"help": "decoder pixels sampled per domain for the statistics"})


def coral_penalty(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared differences of the means and covariances of two (N, C) feature sets (in float32,
    also under bf16 autocast: covariances are sums of products)."""
    with float32(x.device):
        wide = torch.promote_types(x.dtype, torch.float32)  # bf16 -> float32; float64 stays
        x, y = x.to(wide), y.to(wide)
        mx, my = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
        cx, cy = x - mx, y - my
        cov_x = cx.t() @ cx / max(len(x) - 1, 1)
        cov_y = cy.t() @ cy / max(len(y) - 1, 1)
        return (mx - my).pow(2).mean() + (cov_x - cov_y).pow(2).mean()


class Coral(Method):
    """ERM + alignment of the mean and covariance of pixel features across domains (no classes)."""

    name = "coral"
    Hparams = CoralHparams

    def __init__(self, model, num_domains, hparams=None, task=None, normalizer=None):
        super().__init__(model, num_domains, hparams, task, normalizer)
        self.tap = DecoderTap(model)

    def close(self) -> None:
        self.tap.remove()

    def loss(self, batches):
        x, y, sizes = self.concat(batches)
        logits = self.net(x)
        per_image = seg_loss(logits, y, self.task, reduction="none")
        seg = per_image.mean()
        feats = self.tap.features.float()
        per_domain = []
        for f in torch.split(feats, sizes):
            px = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
            if len(px) > self.hparams.pixels:
                px = px[torch.randperm(len(px), device=px.device)[: self.hparams.pixels]]
            per_domain.append(px)
        pairs = [(i, j) for i in range(len(per_domain)) for j in range(i + 1, len(per_domain))]
        penalty = sum(coral_penalty(per_domain[i], per_domain[j]) for i, j in pairs) / max(len(pairs), 1)
        total = seg + self.hparams.weight * penalty
        return total, {"loss": total.detach(), "seg": seg.detach(), "coral": penalty.detach(),
                       "domain_losses": self.domain_losses(per_image, sizes)}
