"""What methods read from or change in a model, through forward hooks (no change to smp's code).

- `shallow_stages(model)`: the modules whose outputs are the first encoder stages' features
  (ResNet `layer1..`, MiT `norm1..`, timm feature levels), where shallow methods perturb
  statistics; `stem_modules(model)`: the encoder's stem, where DSU also perturbs;
- `DecoderTap`: records the decoder's features before its channel dropout (`features`) and
  the segmentation head's input (`head_input`);
- `head_upsampling`: the factor between F and the output (the head is `segmentation_head[0]`).
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import ModelError


def head_upsampling(model: nn.Module) -> int:
    """The factor between the decoder features and the output (FPN: 4, Unet: 1)."""
    for m in model.segmentation_head:
        if isinstance(m, nn.UpsamplingBilinear2d | nn.Upsample):
            return int(m.scale_factor)
    return 1


def _timm_levels(enc) -> list[tuple[int, nn.Module]] | None:
    """(reduction, module) of each feature level of a timm features-only encoder (smp `tu-...`)."""
    info = getattr(getattr(enc, "model", None), "feature_info", None)
    if info is None:
        return None
    return [(int(r), enc.model.get_submodule(name)) for r, name in zip(info.reduction(), info.module_name())]


def shallow_stages(model: nn.Module, n: int = 2) -> list[nn.Module]:
    """The modules whose outputs are the first `n` encoder stages' features (strides 4, 8, ...):
    ResNet `layer1..`, MiT `norm1..`, timm encoders' feature levels from stride 4 on."""
    enc = model.encoder
    for names in (("layer1", "layer2", "layer3", "layer4"), ("norm1", "norm2", "norm3", "norm4")):
        if all(hasattr(enc, k) for k in names[:n]):
            return [getattr(enc, k) for k in names[:n]]
    levels = _timm_levels(enc)
    if levels is not None:
        stages = [m for r, m in levels if r >= 4]
        if len(stages) >= n:
            return stages[:n]
    raise ModelError(type(enc).__name__, "no known encoder stages to perturb (supported: ResNet-like, MiT, timm encoders)")


def stem_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are the encoder's stem features (before the first stage), where DSU
    also perturbs (ResNet: after the first ReLU and after the max-pool; timm: the stride-2 level)."""
    enc = model.encoder
    if all(hasattr(enc, k) for k in ("relu", "maxpool", "layer1")):
        return [enc.relu, enc.maxpool]
    levels = _timm_levels(enc)
    if levels is not None:
        stem = [enc.model.bn1] if hasattr(enc.model, "bn1") else []
        stem += [m for r, m in levels if r == 2]
        return list({id(m): m for m in stem}.values())  # once each, if feature_info names bn1 too
    return []  # MiT: its stem is a patch embedding of tokens, not a feature map


class DecoderTap:
    """Records, on every forward, the decoder's features F (`features`, before the decoder's
    channel dropout: what prototypes and feature statistics should describe) and what the
    segmentation head receives (`head_input`: F after that dropout, in training; what the head's
    closed-form gradient is made of). Without a decoder dropout (Unet) the two are the same.

    smp's FPN drops channels in place; the tap makes that dropout out-of-place (the same values),
    so that the features before it are kept intact."""

    def __init__(self, model: nn.Module):
        self.features: torch.Tensor | None = None
        self.head_input: torch.Tensor | None = None
        dropout = getattr(model.decoder, "dropout", None)
        self._handles = [model.segmentation_head.register_forward_pre_hook(self._head)]
        if isinstance(dropout, nn.Dropout2d | nn.Dropout):
            dropout.inplace = False
            self._handles.append(dropout.register_forward_pre_hook(self._before_dropout))
        self._has_dropout = len(self._handles) == 2

    def _before_dropout(self, module, inputs):
        self.features = inputs[0]

    def _head(self, module, inputs):
        self.head_input = inputs[0]
        if not self._has_dropout:
            self.features = inputs[0]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
