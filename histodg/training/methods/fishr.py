"""fishr: invariant gradient variances (Rame et al., ICML 2022), as in DomainBed.

Per domain, the variance over its images of each image's loss gradient; an exponential moving
average over steps (with DomainBed's 1/(1 - ema) correction); the penalty is the mean squared
distance of each domain's variance to the mean variance; loss = segmentation + weight * penalty.
DomainBed's schedule, scaled to the stage: plain ERM for the first `anneal` share of the
stage's steps (DomainBed: 1500 of 5000), then the penalty at full weight, and the optimizer's
state reset at that step (DomainBed makes a new Adam there). `anneal_steps` sets the number of
steps instead.

scope=head (the paper's and DomainBed's choice): gradients of the 1x1 segmentation head only, in
closed form - image i's gradient is mean over its pixels of (p - y) [F, 1] (through the head's
upsampling) - so no per-sample backprop library is needed. scope=all: gradients of every
parameter, one backward pass per image (create_graph), for small models only. With
--loss bce+dice the gradients are those of the cross-entropy part. The head's gradients are
made of what the head receives (after the decoder's dropout). The moving average is updated
on every micro-batch (with `--accumulate K`, K times per step; DomainBed has no accumulation).
Needs at least 2 images per domain in a micro-batch (a variance over one image is 0).
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
    anneal: float = field(default=0.3, metadata={"help": "share of the stage's steps of plain ERM before the penalty (DomainBed: 0.3)"})
    anneal_steps: int = field(default=-1, metadata={"help": "optimizer steps of plain ERM before the penalty (-1: use anneal)"})
    scope: str = field(default="head", metadata={"help": "head (closed form) or all (every parameter, costly)"})

    def __post_init__(self):
        if self.scope not in ("head", "all"):
            raise ValueError("scope must be head or all")
        if not 0 <= self.ema < 1:
            raise ValueError("ema must be in [0, 1)")
        if not 0 <= self.anneal < 1:
            raise ValueError("anneal is a share of the steps, in [0, 1)")


def head_sample_grads(model, feats, logits, masks, classes) -> torch.Tensor:
    """(N, K * (Cf + 1)): each image's gradient of its mean valid-pixel loss w.r.t. the head."""
    with torch.autocast(feats.device.type, enabled=False):  # variances of small differences: in float32
        return _head_sample_grads(model, feats.float(), logits.float(), masks, classes)


def _head_sample_grads(model, feats, logits, masks, classes) -> torch.Tensor:
    valid = (masks != IGNORE).unsqueeze(1).float()
    r = residual(logits, masks, classes) * valid
    rr = upsample_adjoint(model, r, feats.shape[-2:])
    feats1 = torch.cat([feats.float(), torch.ones_like(feats[:, :1]).float()], 1)
    g = torch.einsum("nkhw,nfhw->nkf", rr, feats1)
    return g.flatten(1) / valid.flatten(1).sum(1, keepdim=True).clamp(min=1)


class Fishr(Method):
    """ERM + matching the per-domain variances of per-image loss gradients (head or whole net)."""

    updates: torch.Tensor  # buffers (see __init__), typed for the checker
    steps: torch.Tensor

    name = "fishr"
    Hparams = FishrHparams

    @classmethod
    def check_config(cls, batch_size: int, hparams) -> str | None:
        if batch_size < 2:
            return "--method fishr needs --batch-size 2 or more: it compares gradient variances within each domain"
        return None

    def __init__(self, model, num_domains, hparams=None, task=None, normalizer=None):
        super().__init__(model, num_domains, hparams, task, normalizer)
        self.tap = DecoderTap(model)
        if self.hparams.scope == "head":
            size = self.task.classes * (model.segmentation_head[0].in_channels + 1)
        else:
            size = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # the moving average of the per-domain gradient variances: its shape is known now, so a
        # resumed run loads it into a buffer of the same shape
        self.register_buffer("ema_var", torch.zeros(num_domains, size))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.anneal_at = max(self.hparams.anneal_steps, 0)
        self._updates = self._steps = 0  # the two counters on the host: reading a buffer on a GPU waits for it

    def close(self) -> None:
        self.tap.remove()

    def start_stage(self, total_steps: int) -> None:
        super().start_stage(total_steps)
        hp = self.hparams
        self.anneal_at = hp.anneal_steps if hp.anneal_steps >= 0 else int(round(hp.anneal * total_steps))
        self._updates, self._steps = int(self.updates), int(self.steps)  # as loaded (a resume), once per stage

    def end_of_step(self) -> bool:
        self.steps += 1
        self._steps += 1
        return 0 < self.anneal_at == self._steps  # the penalty starts: fresh optimizer moments

    def sample_grads(self, per_image, logits, y) -> torch.Tensor:
        if self.hparams.scope == "head":
            return head_sample_grads(self.model, self.tap.head_input, logits, y, self.task.classes)
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
            previous = self.ema_var if self._updates > 0 else torch.zeros_like(variances)
            averaged = hp.ema * previous + (1 - hp.ema) * variances
            self.ema_var.copy_(averaged.detach())
            self.updates += 1
            self._updates += 1
            variances = averaged / (1 - hp.ema) if hp.ema > 0 else averaged
        penalty = ((variances - variances.mean(0, keepdim=True)) ** 2).mean(1).mean()
        weight = hp.weight if self._steps >= self.anneal_at else 0.0
        total = seg + weight * penalty
        return total, {"loss": total.detach(), "seg": seg.detach(), "fishr": penalty.detach(),
                       "domain_losses": self.domain_losses(per_image, sizes)}
