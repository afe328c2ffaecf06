"""The global part of `histodg adapt`: source patches made to look like the target domain, with
their labels kept (target-like images with the source's content).

- `stain`: every source patch mapped to the target's stain statistics, fitted on a mosaic of
  target patches: Reinhard's per-channel LAB mean and standard deviation (`style=reinhard`) or
  Macenko's stain vectors and concentrations (`style=macenko`), through `model.stain`;
- `fda`: Fourier domain adaptation (Yang and Soatto, CVPR 2020): the low-frequency amplitude
  spectrum of each source patch (a centred square of side 2 * beta * size) is replaced by that of
  a random target patch, its phase (the content) kept.
"""
from __future__ import annotations

import numpy as np
import torch

STYLES = ("reinhard", "macenko", "fda")
MOSAIC = 32  # target patches the stain statistics are fitted on


def fit_target_stain(method: str, images: list[np.ndarray]) -> dict:
    """The `model.stain` reference of `method` on target patches (RGB uint8 (T, T, 3) each)."""
    from ..model.stain import fit_reference

    return fit_reference(method, images)


def fda(source: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """(B, 3, H, W) source in 0-255 with the low-frequency amplitude of `target` (same shape)."""
    fs = torch.fft.fftshift(torch.fft.fft2(source.float()), dim=(-2, -1))
    ft = torch.fft.fftshift(torch.fft.fft2(target.float()), dim=(-2, -1))
    h, w = source.shape[-2:]
    b = max(1, int(round(beta * min(h, w))))
    cy, cx = h // 2, w // 2
    amp, phase = fs.abs(), fs.angle()
    amp[..., cy - b:cy + b, cx - b:cx + b] = ft.abs()[..., cy - b:cy + b, cx - b:cx + b]
    mixed = torch.polar(amp, phase)
    out = torch.fft.ifft2(torch.fft.ifftshift(mixed, dim=(-2, -1))).real
    return out.clamp(0, 255)


class Restyler:
    """Source batches (B, 3, H, W, 0-255 float) -> target-like ones, with probability `p` each."""

    def __init__(self, style: str, p: float, beta: float, stain: dict | None, device):
        from ..model.stain import StainNormalizer

        self.style, self.p, self.beta = style, p, beta
        self.normalizer = StainNormalizer(stain, device) if stain else None

    def __call__(self, source: torch.Tensor, target: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        pick = torch.rand(len(source), generator=gen) < self.p
        if not pick.any():
            return source
        idx = pick.nonzero().flatten().to(source.device)
        if self.style == "fda":
            partners = torch.randint(0, len(target), (len(idx),), generator=gen).to(target.device)
            styled = fda(source[idx], target[partners], self.beta)
        else:
            styled = self.normalizer(source[idx])
        out = source.clone()
        out[idx] = styled.to(out.dtype)
        return out
