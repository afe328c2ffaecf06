"""SDS: Shallow-Deep Synergy (BIBM 2024), as reconstructed from its abstract (ARCHITECTURE.md).

Shallow (fine-grained intensity and texture variation where the network is shallow):
- HED stain jitter of the input (Tellez et al.), on a fraction `stain_p` of the images;
- DSU-style resampling of the channel mean and std of the first `perturb_stages` encoder stages'
  features, each with probability `perturb_p` (training only; evaluation never sees it).

Deep (class-wise alignment of the pixel-level decision boundary across domains, on the
decoder's last features F, the input of the 1x1 segmentation head):
- feature alignment: per domain d and class c the prototype mean of F over the class-c pixels;
  the spread of the (L2-normalised) prototypes across domains is penalised;
- gradient alignment: the closed-form gradient of the class-c pixel loss of domain d with
  respect to the head, mean over those pixels of (p - y) [F, 1]; its spread across domains is
  penalised (Fishr-like, without per-sample backprop).
Both spreads are scale-free: sum_d |v_d - mean|^2 / sum_d |v_d|^2.

Big batch: the per-domain, per-class sums are kept (detached) for the last `big_batch - 1`
micro-batches and added to the current one's, so the alignment sees `big_batch` times more
pixels of every domain at the memory cost of one micro-batch.

loss = segmentation + feat_align * feature spread + grad_align * gradient spread.
Every part has a switch: shallow=false, deep=false, stain=0, perturb_p=0, feat_align=0,
grad_align=0, big_batch=1.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from ...model.taps import DecoderTap, shallow_stages
from .base import Method, seg_loss
from .ops import StageHooks, by_domain, class_sums, dispersion, dsu, hed_jitter


@dataclass(frozen=True)
class SDSHparams:
    shallow: bool = field(default=True, metadata={"help": "master switch of the shallow part (stain jitter + feature perturbation)"})
    stain: float = field(default=0.05, metadata={"help": "HED jitter strength: scale +-stain and bias +-stain per stain channel (0 = off)"})
    stain_p: float = field(default=0.5, metadata={"help": "fraction of images that get stain jitter"})
    perturb_p: float = field(default=0.5, metadata={"help": "probability of perturbing each shallow stage's channel statistics (0 = off)"})
    perturb_stages: int = field(default=2, metadata={"help": "how many of the first encoder stages are perturbed"})
    perturb_strength: float = field(default=1.0, metadata={"help": "scale of the statistics noise (1 = the batch's own spread)"})
    deep: bool = field(default=True, metadata={"help": "master switch of the deep part (feature + gradient alignment)"})
    feat_align: float = field(default=0.5, metadata={"help": "weight of class-wise feature (prototype) alignment (0 = off)"})
    grad_align: float = field(default=0.5, metadata={"help": "weight of class-wise head-gradient alignment (0 = off)"})
    big_batch: int = field(default=4, metadata={"help": "micro-batches whose statistics are pooled for alignment (1 = none)"})

    def __post_init__(self):
        if self.big_batch < 1 or self.perturb_stages < 0:
            raise ValueError("big_batch must be >= 1 and perturb_stages >= 0")
        if not (0 <= self.stain_p <= 1 and 0 <= self.perturb_p <= 1):
            raise ValueError("stain_p and perturb_p are probabilities in [0, 1]")


class SDS(Method):
    """Shallow-Deep Synergy: shallow stain/feature-statistics perturbation + class-wise feature and
    head-gradient alignment across domains, pooled over a big batch of micro-batches."""

    name = "sds"
    Hparams = SDSHparams

    def __init__(self, model, num_domains, hparams=None, task=None, normalizer=None):
        super().__init__(model, num_domains, hparams, task, normalizer)
        hp = self.hparams
        self.class_ids = [0, 1] if self.task.binary else list(range(self.task.classes))
        self.tap = DecoderTap(model)
        self.hooks = None
        if hp.shallow and hp.perturb_p > 0 and hp.perturb_stages > 0:
            self.hooks = StageHooks(shallow_stages(model, hp.perturb_stages),
                                    lambda x: dsu(x, hp.perturb_strength), hp.perturb_p)
        self.past: deque = deque(maxlen=max(hp.big_batch - 1, 0))

    def close(self) -> None:
        self.tap.remove()
        if self.hooks:
            self.hooks.remove()

    def shallow_input(self, x: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        if not (hp.shallow and hp.stain > 0 and self.training and self.normalizer is not None):
            return x
        return self.normalizer(hed_jitter(self.normalizer.inverse(x), hp.stain, hp.stain, hp.stain_p))

    def pooled_stats(self, feats, logits, masks, sizes):
        """Per-domain, per-class (count, feature sum, gradient sum): this micro-batch's (with
        gradients) plus the detached sums of the previous big_batch - 1 micro-batches."""
        counts, fsums, gsums = class_sums(self.model, feats, logits, masks, self.task.classes, self.class_ids)
        cur = (by_domain(counts, sizes), by_domain(fsums, sizes), by_domain(gsums, sizes))
        total = list(cur)
        for past in self.past:
            if past[0].shape == cur[0].shape:
                total = [t + p for t, p in zip(total, past)]
        if self.training and self.past.maxlen:
            self.past.append(tuple(c.detach() for c in cur))
        return total

    def alignment(self, counts, fsums, gsums) -> tuple[torch.Tensor, torch.Tensor]:
        feat_terms, grad_terms = [], []
        for c in range(counts.shape[1]):
            n = counts[:, c]
            present = n > 0
            protos = fsums[:, c] / n.clamp(min=1).unsqueeze(1)
            protos = protos / protos.norm(dim=1, keepdim=True).clamp(min=1e-12)
            feat_terms.append(dispersion(protos, present))
            grads = (gsums[:, c] / n.clamp(min=1).view(-1, 1, 1)).flatten(1)
            grad_terms.append(dispersion(grads, present))
        return torch.stack(feat_terms).mean(), torch.stack(grad_terms).mean()

    def loss(self, batches):
        hp = self.hparams
        x, y, sizes = self.concat(batches)
        logits = self.net(self.shallow_input(x))
        per_image = seg_loss(logits, y, self.task, reduction="none")
        seg = per_image.mean()
        logs = {"seg": float(seg.detach()), "domain_losses": [float(d.mean().detach()) for d in self.per_domain(per_image, sizes)]}
        total = seg
        if hp.deep and (hp.feat_align > 0 or hp.grad_align > 0):
            feat, grad = self.alignment(*self.pooled_stats(self.tap.features, logits, y, sizes))
            logs["feat_align"], logs["grad_align"] = float(feat.detach()), float(grad.detach())
            if hp.feat_align > 0:
                total = total + hp.feat_align * feat
            if hp.grad_align > 0:
                total = total + hp.grad_align * grad
        logs["loss"] = float(total.detach())
        return total, logs
