"""Colour augmentation of training batches, on the device, whole batches at a time."""
from __future__ import annotations

import torch


def color_jitter(x: torch.Tensor, generator: torch.Generator, strength: float = 0.1) -> torch.Tensor:
    """Light per-image brightness, contrast and saturation jitter on uint8-range floats (0-255)."""
    if strength <= 0:
        return x
    b = x.shape[0]
    dev = x.device

    def rand(lo, hi):
        return (torch.rand(b, 1, 1, 1, generator=generator, device="cpu") * (hi - lo) + lo).to(dev)

    x = x * rand(1 - strength, 1 + strength)  # brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * rand(1 - strength, 1 + strength) + mean  # contrast
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * rand(1 - strength, 1 + strength) + grey  # saturation
    return x.clamp_(0, 255)
