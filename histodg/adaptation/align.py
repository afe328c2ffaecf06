"""The local part of `histodg adapt`: source and target features aligned where their gap is largest.

The encoder's stage outputs and the decoder's features (what the segmentation head sees, before
the decoder's dropout) are read through forward hooks. For every one, each channel's
mean and standard deviation over a batch's positions are compared between the (re-styled)
source batch and the target batch; the channel's domain gap is the symmetric KL divergence of
the two Gaussians (as the domain-shift score, `model.shift`). The feature mask keeps the
`mask_ratio` share of channels with the largest gap (detached: the mask says where to align,
it is not itself optimised), and the loss is the mean over the kept channels of the squared
differences of the means and standard deviations, in units of the pooled standard deviation;
then the mean over stages. Channels whose statistics already agree cost nothing and are left
to the segmentation loss: the context is kept, the hard part is aligned.
"""
from __future__ import annotations

import torch

from ..model.shift import channel_kl


class FeatureTap:
    """The encoder's stage outputs and the decoder's features (with their gradients) of the last forward."""

    def __init__(self, model):
        from ..model.taps import DecoderTap

        self.features = None
        self._handle = model.encoder.register_forward_hook(self._hook)
        self._decoder = DecoderTap(model)

    def _hook(self, module, inputs, features) -> None:
        self.features = [f for f in list(features)[1:] if f.ndim == 4 and f.shape[1] > 0]

    def take(self) -> list[torch.Tensor]:
        f = [*self.features, self._decoder.features]
        self.features = self._decoder.features = None
        return f

    def remove(self) -> None:
        self._handle.remove()
        self._decoder.remove()


def masked_alignment(source: list[torch.Tensor], target: list[torch.Tensor], mask_ratio: float,
                     eps: float = 1e-5) -> tuple[torch.Tensor, list[float]]:
    """(loss, each stage's mean channel gap before masking) of source and target stage features."""
    losses, gaps = [], []
    for fs, ft in zip(source, target):
        fs, ft = fs.float(), ft.float()
        ms, mt = fs.mean((0, 2, 3)), ft.mean((0, 2, 3))
        vs, vt = fs.var((0, 2, 3)) + eps, ft.var((0, 2, 3)) + eps
        gap = channel_kl(ms.detach(), vs.detach(), mt.detach(), vt.detach())
        k = max(1, int(round(mask_ratio * gap.numel())))
        keep = torch.zeros_like(gap, dtype=torch.bool)
        keep[gap.topk(k).indices] = True
        scale = (0.5 * (vs + vt)).detach()
        per = ((ms - mt) ** 2 + (vs.sqrt() - vt.sqrt()) ** 2) / scale
        losses.append(per[keep].mean())
        gaps.append(float(gap.mean()))
    return torch.stack(losses).mean(), gaps
