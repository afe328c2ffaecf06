"""The model's input contract: uint8 RGB in, normalised float out, on the device, whole batches."""
from __future__ import annotations

import torch

from ..device import float32


class Normalizer:
    """uint8 NCHW on any device -> normalised float (ImageNet statistics by default)."""

    def __init__(self, mean, std, device, channels_last: bool = False, stain: dict | None = None):
        from .stain import StainNormalizer

        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.channels_last = channels_last
        self.stain = StainNormalizer(stain, device) if stain else None  # applied first, on 0-255

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with float32(x.device):  # the same pixels inside autocast (methods' jitter) as outside (predict)
            x = x.float()
            if self.stain is not None:
                x = self.stain(x)
            x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised -> RGB in 0-255 (float)."""
        with float32(x.device):
            return x.float() * self.std + self.mean
