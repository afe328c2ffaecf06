"""SDS: Shallow-Deep Synergy (BIBM 2024), as reconstructed from its abstract (ARCHITECTURE.md).

Shallow (fine-grained intensity and texture variation where the network is shallow):
- HED stain jitter of the input (Tellez et al., `training.augment.hed_jitter`) on a fraction
  `stain_p` of the images (the run's `--augment` preset applies on top, as for every method);
- DSU-style resampling of the channel mean and std of the first `perturb_stages` encoder
  stages' features, each with probability `perturb_p` (training only).

Deep (class-wise alignment of the pixel-level decision boundary across domains):
- feature alignment: per domain d and class c the prototype of the decoder features F (before
  the decoder's channel dropout) over the class-c pixels, L2-normalised; penalty: the variance
  of the prototypes across domains (bounded by 1: unit vectors);
- gradient alignment: the closed-form gradient of the class-c pixel loss of domain d with
  respect to the 1x1 head, mean over those pixels of (p - y) [H / rms(H), 1] with H what the
  head receives, measured in units of its own RMS (over all domains' pixels, with gradient):
  so the network cannot lower the penalty by shrinking its features; penalty: the variance of
  these gradients across domains, unnormalised as in IGA and Fishr (a gradient all domains
  share is not penalised, the penalty does not reward a worse fit, and it vanishes as the
  model fits every domain).

Big batch = the optimizer step. With `--accumulate K`, a step is K micro-batches; the per-domain,
per-class statistics are pooled over all of them, with the current weights, at the memory of
one micro-batch: `begin_step` first sums every micro-batch's statistics without gradients
(the same random perturbations, BatchNorm statistics left as they were), and micro-batch k's
loss then uses the pooled sums with its own part recomputed with gradients, so the step's
gradient is exactly that of the penalty on the pooled statistics (times K, which the loop's
division by K cancels). Under DDP the sums are pooled over every rank too. `pool=false` aligns
each micro-batch on its own statistics (the ablation); with K = 1 both are the same.

loss = segmentation + feat_align * prototype variance + grad_align * gradient variance. The
default weights (0.5, 0.02) are the best of four settings by training-domain validation in the
DG benchmark's pilot (BENCHMARKS.md), never by the unseen domains.
Every part has a switch: shallow=false, deep=false, stain=0, perturb_p=0, feat_align=0,
grad_align=0, pool=false. `dsbn=true` puts SDS on domain-specific BatchNorm (`--method dsbn`'s
slots, `Method.use_domain_bn`): each domain's patches through its own slot, the deep part's
prototypes and gradients taken on those features.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...model.taps import DecoderTap, shallow_stages
from ..augment import hed_jitter
from .base import Method, seg_loss
from .ops import StageHooks, by_domain, class_sums, domain_variance, dsu


@dataclass(frozen=True)
class SDSHparams:
    shallow: bool = field(default=True, metadata={"help": "master switch of the shallow part (stain jitter + feature perturbation)"})
    stain: float = field(default=0.05, metadata={"help": "HED jitter strength: scale +-stain and bias +-stain per stain channel (0 = off)"})
    stain_p: float = field(default=0.5, metadata={"help": "fraction of images that get stain jitter"})
    perturb_p: float = field(default=0.5, metadata={"help": "probability of perturbing each shallow stage's channel statistics (0 = off)"})
    perturb_stages: int = field(default=2, metadata={"help": "how many of the first encoder stages are perturbed"})
    perturb_strength: float = field(default=1.0, metadata={"help": "scale of the statistics noise (1 = the batch's own spread)"})
    deep: bool = field(default=True, metadata={"help": "master switch of the deep part (feature + gradient alignment)"})
    feat_align: float = field(default=0.5, metadata={"help": "weight of the class-wise prototype variance across domains (0 = off)"})
    grad_align: float = field(default=0.02, metadata={"help": "weight of the class-wise head-gradient variance across domains (0 = off)"})
    pool: bool = field(default=True, metadata={"help": "pool the statistics over all micro-batches of a step (--accumulate) and all ranks"})
    dsbn: bool = field(default=False, metadata={"help": "each domain through its own BatchNorm slot, as --method dsbn (SDS on DSBN)"})

    def __post_init__(self):
        if self.perturb_stages < 0:
            raise ValueError("perturb_stages must be >= 0")
        if not (0 <= self.stain_p <= 1 and 0 <= self.perturb_p <= 1):
            raise ValueError("stain_p and perturb_p are probabilities in [0, 1]")


class SDS(Method):
    """Shallow-Deep Synergy: shallow stain/feature-statistics perturbation + class-wise feature and
    head-gradient alignment across domains, pooled over the optimizer step's micro-batches."""

    name = "sds"
    Hparams = SDSHparams

    @classmethod
    def uses_domain_bn(cls, hparams) -> bool:
        return bool(hparams.dsbn)

    def __init__(self, model, num_domains, hparams=None, task=None, normalizer=None):
        super().__init__(model, num_domains, hparams, task, normalizer)
        hp = self.hparams
        if hp.dsbn:
            self.use_domain_bn()
        self.class_ids = [0, 1] if self.task.binary else list(range(self.task.classes))
        self.tap = DecoderTap(model)
        self.hooks = None
        if hp.shallow and hp.perturb_p > 0 and hp.perturb_stages > 0:
            self.hooks = StageHooks(shallow_stages(model, hp.perturb_stages),
                                    lambda x: dsu(x, hp.perturb_strength), hp.perturb_p)
        self._step: dict | None = None  # the pooled sums of the current step, from begin_step

    @property
    def aligns(self) -> bool:
        hp = self.hparams
        return hp.deep and (hp.feat_align > 0 or hp.grad_align > 0)

    def close(self) -> None:
        self.tap.remove()
        if self.hooks:
            self.hooks.remove()

    def shallow_input(self, x: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        if not (hp.shallow and hp.stain > 0 and self.training and self.normalizer is not None):
            return x
        return self.normalizer(hed_jitter(self.normalizer.inverse(x), hp.stain, hp.stain, hp.stain_p))

    def statistics(self, batches, logits=None):
        """Per-domain, per-class (counts, feature sums, gradient sums) of one micro-batch, and its
        per-image loss; a forward pass unless `logits` of its (shallow) input are given."""
        x, y, sizes = self.concat(batches)
        if logits is None:
            logits = self.forward_domains(self.shallow_input(x), sizes)
        sums = class_sums(self.model, self.tap.features, self.tap.head_input, logits, y, self.task.classes, self.class_ids)
        return tuple(by_domain(t, sizes) for t in sums), logits, y, sizes

    # -- the big batch ---------------------------------------------------------------------------
    def begin_step(self, micro_batches) -> None:
        self._step = None
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if not (self.training and self.aligns and self.hparams.pool and (len(micro_batches) > 1 or world > 1)):
            return
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None  # this rank's device's only
        buffers = {k: v.clone() for k, v in self.model.named_buffers()}
        net = self.net
        self.use_net(self.model)  # no DDP hooks for a pass without gradients
        try:
            with torch.no_grad():
                parts = [self.statistics(b)[0] for b in micro_batches]
        finally:
            self.use_net(net)
        with torch.no_grad():  # BatchNorm's running statistics: as if this pass had not happened
            for k, v in self.model.named_buffers():
                v.copy_(buffers[k])
        totals = [torch.stack([p[i] for p in parts]).sum(0) for i in range(len(parts[0]))]
        if world > 1:
            for t in totals:
                torch.distributed.all_reduce(t)
        # micro-batch k's loss swaps its own (gradient-carrying) sums in for parts[k]
        self._step = {"totals": totals, "parts": parts, "next": 0, "scale": len(micro_batches) * world,
                      "rng": rng, "cuda_rng": cuda_rng}

    def pooled(self, own) -> tuple[list[torch.Tensor], float]:
        """The statistics the penalty is taken on, and the factor that makes the step's gradient
        that of the pooled penalty."""
        step = self._step
        if step is None:
            return list(own), 1.0
        k = step["next"]
        step["next"] += 1
        return [t - p.detach() + o for t, p, o in zip(step["totals"], step["parts"][k], own)], float(step["scale"])

    def alignment(self, counts, fsums, gsums, sq=None, size=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(prototype variance, head-gradient variance) across domains, mean over classes, from
        per-domain sums; without `sq`/`size` the head's input is taken as is (RMS 1)."""
        rms = (sq.sum() / size.sum().clamp(min=1)).sqrt().clamp(min=1e-6) if sq is not None else torch.ones(())
        feat_terms, grad_terms = [], []
        for c in range(counts.shape[1]):
            n = counts[:, c]
            present = n > 0
            protos = fsums[:, c] / n.clamp(min=1).unsqueeze(1)
            protos = protos / protos.norm(dim=1, keepdim=True).clamp(min=1e-12)
            feat_terms.append(domain_variance(protos, present))
            grads = gsums[:, c] / n.clamp(min=1).view(-1, 1, 1)
            grads = torch.cat([grads[..., :-1] / rms, grads[..., -1:]], -1)  # features in units of their RMS
            grad_terms.append(domain_variance(grads.flatten(1), present))
        return torch.stack(feat_terms).mean(), torch.stack(grad_terms).mean()

    def loss(self, batches):
        hp = self.hparams
        step = self._step
        if step is not None and step["next"] == 0:  # the random draws of the pass without gradients
            torch.set_rng_state(step["rng"])
            if step["cuda_rng"] is not None:
                torch.cuda.set_rng_state(step["cuda_rng"])
        x, y, sizes = self.concat(batches)
        logits = self.forward_domains(self.shallow_input(x), sizes)
        per_image = seg_loss(logits, y, self.task, reduction="none")
        seg = per_image.mean()
        logs = {"seg": seg.detach(), "domain_losses": self.domain_losses(per_image, sizes)}
        total = seg
        if self.aligns:
            own, _, _, _ = self.statistics(batches, logits)
            stats, scale = self.pooled(own)
            feat, grad = self.alignment(*stats)
            logs["feat_align"], logs["grad_align"] = feat.detach(), grad.detach()
            penalty = hp.feat_align * feat + hp.grad_align * grad
            logs["loss"] = (seg + penalty).detach()  # the step's objective; the gradient is scaled
            return total + scale * penalty, logs
        logs["loss"] = total.detach()
        return total, logs
