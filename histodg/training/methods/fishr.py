"""fishr: invariant gradient variances (Rame et al., ICML 2022), as in DomainBed.

Per domain, the variance over its images of each image's loss gradient; an exponential moving
average over steps (with DomainBed's 1/(1 - ema) correction); the penalty is the mean squared
distance of each domain's variance to the mean variance; loss = segmentation + weight * penalty,
with weight 0 before `anneal_steps` optimizer steps.

scope=head (the paper's and DomainBed's choice): gradients of the 1x1 segmentation head only, in
closed form - image i's gradient is mean over its pixels of (p - y) [F, 1] (through the head's
upsampling) - so no per-sample backprop library is needed. scope=all: gradients of every
parameter, one backward pass per image (create_graph), for small models only. With
--loss bce+dice the gradients are those of the cross-entropy part.
Deviation from DomainBed: the optimizer is not reset at `anneal_steps` (the loop owns it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...constants import IGNORE
from ...model.taps import DecoderTap
from .base import Method, seg_loss
from .ops import residual, upsample_adjoint


@dataclass(frozen=True)
class FishrHparams:
    weight: float = field(default=1000.0, metadata={"help": "penalty weight lambda (DomainBed default 1000)"})
    ema: float = field(default=0.95, metadata={"help": "moving average of the gradient variances"})
    anneal_steps: int = field(default=0, metadata={"help": "optimizer steps of plain ERM before the penalty"})
    scope: str = field(default="head", metadata={"help": "head (closed form) or all (every parameter, costly)"})

    def __post_init__(self):
        if self.scope not in ("head", "all"):
            raise ValueError("scope must be head or all")
        if not 0 <= self.ema < 1:
            raise ValueError("ema must be in [0, 1)")


def head_sample_grads(model, feats, logits, masks, classes) -> torch.Tensor:
    """(N, K * (Cf + 1)): each image's gradient of its mean valid-pixel loss w.r.t. the head."""
    valid = (masks != IGNORE).unsqueeze(1).float()
    r = residual(logits, masks, classes) * valid
    rr = upsample_adjoint(model, r, feats.shape[-2:])
    feats1 = torch.cat([feats.float(), torch.ones_like(feats[:, :1]).float()], 1)
    g = torch.einsum("nkhw,nfhw->nkf", rr, feats1)
    return g.flatten(1) / valid.flatten(1).sum(1, keepdim=True).clamp(min=1)


class Fishr(Method):
    """ERM + matching the per-domain variances of per-image loss gradients (head or whole net)."""

    name = "fishr"
    Hparams = FishrHparams

    def __init__(self, model, num_domains, hparams=None, task=None, normalizer=None):
        super().__init__(model, num_domains, hparams, task, normalizer)
        self.tap = DecoderTap(model)
        self.register_buffer("ema_var", torch.zeros(0))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def close(self) -> None:
        self.tap.remove()

    def end_of_step(self) -> None:
        self.steps += 1

    def sample_grads(self, per_image, logits, y) -> torch.Tensor:
        if self.hparams.scope == "head":
            return head_sample_grads(self.model, self.tap.features, logits, y, self.task.classes)
        params = [p for p in self.model.parameters() if p.requires_grad]
        rows = []
        for i in range(len(per_image)):
            g = torch.autograd.grad(per_image[i], params, create_graph=True, retain_graph=True)
            rows.append(torch.cat([t.flatten() for t in g]))
        return torch.stack(rows)

    def loss(self, batches):
        hp = self.hparams
        x, y, sizes = self.concat(batches)
        logits = self.net(x)
        per_image = seg_loss(logits, y, self.task, reduction="none")
        seg = per_image.mean()
        grads = self.sample_grads(per_image, logits, y)
        variances = torch.stack([g.var(0, unbiased=False) for g in torch.split(grads, sizes)])  # (D, P)
        if self.training:
            if self.ema_var.shape != variances.shape or int(self.updates) == 0:
                previous = torch.zeros_like(variances)
            else:
                previous = self.ema_var
            averaged = hp.ema * previous + (1 - hp.ema) * variances
            self.ema_var = averaged.detach()
            self.updates += 1
            variances = averaged / (1 - hp.ema) if hp.ema > 0 else averaged
        penalty = ((variances - variances.mean(0, keepdim=True)) ** 2).mean(1).mean()
        weight = hp.weight if int(self.steps) >= hp.anneal_steps else 0.0
        total = seg + weight * penalty
        return total, {"loss": float(total.detach()), "seg": float(seg.detach()), "fishr": float(penalty.detach()),
                       "domain_losses": [float(d.mean().detach()) for d in self.per_domain(per_image, sizes)]}
