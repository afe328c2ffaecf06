"""What methods read from or change in a model, through forward hooks (no change to smp's code).

- `shallow_stages(model)`: the modules whose outputs are the first encoder stages' features
  (ResNet `layer1..`, MiT `norm1..`, timm `stages`), where shallow methods perturb statistics;
- `DecoderTap`: records the decoder's output F (the input of the segmentation head);
- `head_upsampling`: the factor between F and the output (the head is `segmentation_head[0]`).
"""
from __future__ import annotations

import torch
from torch import nn

from .build import ModelError


def head_upsampling(model: nn.Module) -> int:
    """The factor between the decoder features and the output (FPN: 4, Unet: 1)."""
    for m in model.segmentation_head:
        if isinstance(m, nn.UpsamplingBilinear2d | nn.Upsample):
            return int(m.scale_factor)
    return 1


def shallow_stages(model: nn.Module, n: int = 2) -> list[nn.Module]:
    """The modules whose outputs are the first `n` encoder stages' features."""
    enc = model.encoder
    for names in (("layer1", "layer2", "layer3", "layer4"), ("norm1", "norm2", "norm3", "norm4")):
        if all(hasattr(enc, k) for k in names[:n]):
            return [getattr(enc, k) for k in names[:n]]
    stages = getattr(enc, "stages", None) or getattr(getattr(enc, "model", None), "stages", None)
    if stages is not None and len(stages) >= n:
        return list(stages)[:n]
    raise ModelError(type(enc).__name__, "no known encoder stages to perturb (supported: ResNet-like, MiT, timm stages)")


class DecoderTap:
    """Records the decoder output (input of the segmentation head) on every forward."""

    def __init__(self, model: nn.Module):
        self.features: torch.Tensor | None = None
        self._handle = model.decoder.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.features = output

    def remove(self) -> None:
        self._handle.remove()
