"""The self-training part of `histodg adapt` (`--hp self_train=true`): a mean teacher's confident
pseudo-labels on the target, learnt by the model from a strongly augmented view.

The recipe that leads unsupervised adaptation for segmentation (Mean Teacher, Tarvainen and
Valpola 2017; FixMatch's weak/strong pairs, Sohn et al. 2020; DAFormer, Hoyer et al. 2022):

- the teacher is an exponential moving average of the model's weights (`ema`), never trained;
- each step it predicts the target batch as the model sees it (the weak view: flips and 90-degree
  turns only); a pixel whose probability of its predicted class is at least `threshold` gets
  that class as its label, every other pixel is ignored (255);
- the model is trained on a strong view of the same patches (the `--augment` preset named by
  `self_augment`: stain, blur, noise, JPEG, scale; the labels follow the scale change) against
  those labels, weighted by `self_weight`, beside the source patches' supervised loss.

A slide of the target is an unknown domain: the teacher predicts it as `histodg predict` would,
through the shared BatchNorm with the batch's own statistics for a DSBN model, with its running
statistics for any other model; dropout is off in the teacher.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..constants import IGNORE


class MeanTeacher:
    def __init__(self, model: nn.Module, ema: float, threshold: float, own_statistics: bool):
        self.teacher = copy.deepcopy(model)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.ema, self.threshold, self.own_statistics = ema, threshold, own_statistics

    @torch.no_grad()
    def pseudo_labels(self, x: torch.Tensor, classes: int) -> tuple[torch.Tensor, float]:
        """(N, H, W) uint8 labels of the normalised batch `x` (IGNORE where the teacher is not
        confident), and the share of pixels that got a label."""
        t = self.teacher
        t.train(self.own_statistics)
        for m in t.modules():
            if isinstance(m, (nn.Dropout, nn.Dropout2d)):
                m.eval()
        saved = {k: v.clone() for k, v in t.named_buffers()}  # batch statistics without moving the running ones
        logits = t(x).float()
        for k, v in t.named_buffers():
            v.copy_(saved[k])
        if classes == 1:
            p = torch.sigmoid(logits[:, 0])
            label, confidence = (p > 0.5).to(torch.uint8), torch.maximum(p, 1 - p)
        else:
            confidence, label = torch.softmax(logits, dim=1).max(1)
            label = label.to(torch.uint8)
        keep = confidence >= self.threshold
        label[~keep] = IGNORE
        return label, float(keep.float().mean())

    def student_loss(self, model: nn.Module, x255: torch.Tensor, normalizer, task, strong, gen) -> tuple[torch.Tensor, float]:
        """The model's loss on a strong view (`strong`: AugmentSettings) of the target batch `x255`
        (NCHW, 0-255, the weak view) against the teacher's labels of the weak view, and the share
        of pixels labelled (0: no label, a zero loss)."""
        from ..training.augment import augment_batch
        from ..training.methods.base import seg_loss

        labels, share = self.pseudo_labels(normalizer(x255), task.classes)
        xa, la = augment_batch(x255, labels, strong, gen)
        if share == 0:
            return torch.zeros((), device=x255.device), share
        return seg_loss(model(normalizer(xa)), la.long(), task), share

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """teacher := ema * teacher + (1 - ema) * model (weights); the model's buffers as they are."""
        for t, s in zip(self.teacher.parameters(), model.parameters()):
            t.mul_(self.ema).add_(s.detach(), alpha=1 - self.ema)
        for t, s in zip(self.teacher.buffers(), model.buffers()):
            t.copy_(s)
