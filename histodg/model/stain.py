"""Stain normalisation (`--stain-norm macenko|reinhard`): every patch mapped to one reference stain.

The reference is fitted once with torchstain (Macenko et al., ISBI 2009; Reinhard et al., 2001),
from a reference image or from a mosaic of training patches, and stored in the checkpoint as a
few numbers (`{"method": "macenko", "he": 3x2, "max_c": 2}` or `{"method": "reinhard",
"means": 3, "stds": 3}`), so `predict` applies exactly what training did.

Applying it is histodg's own code, the same arithmetic as torchstain's `normalize` but on whole
batches on the model's device: torchstain normalises one image at a time and keeps its constants
on the CPU (its Reinhard's colour matrices are CPU tensors, so a CUDA image fails). On the CPU
the batched code is about as fast as torchstain's loop (`benchmarks/stain_norm.py`, BENCHMARKS.md);
on a GPU it keeps the batch there. A test checks the two agree within one grey level on real H&E.

A patch with too little tissue to estimate its stains (glass, nearly white: fewer than
`MIN_TISSUE_FRACTION` of its pixels with optical density >= BETA in every channel) or whose
result is not finite is left as it is, and counted (`StainNormalizer.fallbacks`).
"""
from __future__ import annotations

import numpy as np
import torch

IO, ALPHA, BETA = 240.0, 1.0, 0.15  # Macenko's transmitted light, angle percentile, transparency cut (torchstain's)
MIN_TISSUE_FRACTION = 0.05
# sRGB (D65) -> XYZ and the reference white: the constants torchstain (and skimage) use
RGB2XYZ = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
WHITE = torch.tensor([0.95047, 1.0, 1.08883])


def fit_reference(method: str, images: list[np.ndarray]) -> dict:
    """The reference of `method` fitted by torchstain on a mosaic of RGB uint8 images (H, W, 3)."""
    import torchstain

    side = min(min(im.shape[0], im.shape[1]) for im in images)
    mosaic = np.concatenate([im[:side, :side, :3] for im in images], axis=1)
    target = torch.from_numpy(np.ascontiguousarray(mosaic)).permute(2, 0, 1)
    if method == "macenko":
        if tissue_fraction(target[None].float())[0] < MIN_TISSUE_FRACTION:
            raise ValueError("the reference has too little tissue to fit stains (mostly glass or white)")
        norm = torchstain.normalizers.MacenkoNormalizer(backend="torch")
        norm.fit(target)
        return {"method": "macenko", "he": norm.HERef.tolist(), "max_c": norm.maxCRef.tolist()}
    if method == "reinhard":
        norm = torchstain.normalizers.ReinhardNormalizer(backend="torch")
        norm.fit(target)
        return {"method": "reinhard", "means": [float(v) for v in norm.target_means],
                "stds": [float(v) for v in norm.target_stds]}
    raise ValueError(f"unknown stain normalisation {method!r}")


def reference_from_image(method: str, path) -> dict:
    """The reference of `method` fitted on one RGB image file (`--stain-ref IMAGE`)."""
    from PIL import Image, UnidentifiedImageError

    from ..constants import too_large

    try:
        with Image.open(path) as im:
            if why := too_large(*im.size, "stain reference image"):
                raise ValueError(why)
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"not a readable image ({exc})") from None
    return fit_reference(method, [rgb])


def resolve_stain(option: str, ref_path, recorded: dict | None) -> dict | None:
    """The reference `predict` applies: `checkpoint` (what training did, the default), `none`, or
    a method with `--stain-ref IMAGE` (or the checkpoint's own reference of that method)."""
    if option == "checkpoint":
        return recorded
    if option == "none":
        return None
    if ref_path:
        return reference_from_image(option, ref_path)
    if recorded and recorded.get("method") == option:
        return recorded
    raise ValueError(f"--stain-norm {option} needs --stain-ref IMAGE (the checkpoint has "
                     f"{recorded['method'] if recorded else 'no'} stain normalisation)")


def density(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, N) RGB 0-255 -> its optical density (B, 3, N) and the pixels Macenko uses (B, N):
    optical density >= BETA in every channel ("ODhat" in torchstain)."""
    od = -torch.log((flat.float() + 1) / IO)
    return od, (od >= BETA).all(dim=1)


def tissue_fraction(x: torch.Tensor) -> torch.Tensor:
    """Per image of (B, 3, H, W) 0-255: the fraction of pixels Macenko would use."""
    return density(x.flatten(2))[1].float().mean(1)


class StainNormalizer:
    """A fitted reference, applied to (B, 3, H, W) float batches in 0-255 on any device."""

    def __init__(self, reference: dict, device="cpu"):
        self.method = reference["method"]
        self.reference = reference
        self.fallbacks = 0  # patches left as they were
        self.seen = 0
        if self.method == "macenko":
            self.he = torch.tensor(reference["he"], dtype=torch.float32, device=device)
            self.max_c = torch.tensor(reference["max_c"], dtype=torch.float32, device=device)
        elif self.method == "reinhard":
            self.means = torch.tensor(reference["means"], dtype=torch.float32, device=device)
            self.stds = torch.tensor(reference["stds"], dtype=torch.float32, device=device)
        else:
            raise ValueError(f"unknown stain normalisation {self.method!r}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        flat = x.float().reshape(b, c, h * w)
        od, mask = density(flat)
        ok = mask.float().mean(1) >= MIN_TISSUE_FRACTION
        self.seen += b
        if not ok.any():
            self.fallbacks += b
            return x.float()
        if self.method == "macenko":
            part = self._macenko(od[ok], mask[ok])
        else:
            part = self._reinhard(flat[ok])
        finite = torch.isfinite(part).all(dim=2).all(dim=1)
        if bool(ok.all()) and bool(finite.all()):
            return part.reshape(b, c, h, w)
        y = flat.clone()
        idx = ok.nonzero().flatten()
        y[idx[finite]] = part[finite]
        self.fallbacks += b - int(finite.sum())
        return y.reshape(b, c, h, w)

    def _macenko(self, od: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 3, N) optical densities and their tissue masks -> normalised (B, 3, N) in 0-255."""
        b = od.shape[0]
        m = mask.unsqueeze(1).float()
        n = m.sum(2, keepdim=True)
        mean = (od * m).sum(2, keepdim=True) / n
        centred = (od - mean) * m
        cov = centred @ centred.transpose(1, 2) / (n - 1)
        _, vecs = torch.linalg.eigh(cov)
        vecs = vecs[:, :, [1, 2]]  # (B, 3, 2): the two largest
        t = vecs.transpose(1, 2) @ od  # (B, 2, N)
        phi = torch.atan2(t[:, 1], t[:, 0])
        lo, hi = masked_percentiles(phi, mask, (ALPHA / 100, 1 - ALPHA / 100))
        v_min = vecs @ torch.stack([torch.cos(lo), torch.sin(lo)], 1).unsqueeze(2)  # (B, 3, 1)
        v_max = vecs @ torch.stack([torch.cos(hi), torch.sin(hi)], 1).unsqueeze(2)
        first = (v_min[:, 0] > v_max[:, 0]).view(b, 1, 1)  # haematoxylin first (torchstain's heuristic)
        he = torch.where(first, torch.cat([v_min, v_max], 2), torch.cat([v_max, v_min], 2))
        conc = torch.linalg.solve(he.transpose(1, 2) @ he, he.transpose(1, 2)) @ od  # least squares, (B, 2, N)
        k = 1 + round(0.99 * (conc.shape[2] - 1))
        max_c = conc.kthvalue(k, dim=2).values  # (B, 2): the 99th percentile
        conc = conc * (self.max_c / max_c).unsqueeze(2)
        return (IO * torch.exp(-self.he @ conc)).clamp(max=255).floor()  # torchstain returns integers (truncated)

    def _reinhard(self, flat: torch.Tensor) -> torch.Tensor:
        """(B, 3, N) RGB 0-255 -> normalised (B, 3, N) in 0-255."""
        lab = rgb_to_lab(flat / 255)
        scale = torch.tensor([1 / 2.55, 1.0, 1.0], device=flat.device).view(1, 3, 1)
        shift = torch.tensor([0.0, -128.0, -128.0], device=flat.device).view(1, 3, 1)
        scaled = lab * scale + shift  # torchstain's lab_split: L 0-100, a and b around 0
        mu, sd = scaled.mean(2, keepdim=True), scaled.std(2, keepdim=True)
        out = (scaled - mu) / sd * self.stds.view(1, 3, 1) + self.means.view(1, 3, 1)
        return (lab_to_rgb((out - shift) / scale) * 255).clamp(0, 255).floor()


def masked_percentiles(values: torch.Tensor, mask: torch.Tensor, qs) -> list[torch.Tensor]:
    """Per row of (B, N) `values`, torchstain's percentile of the entries where `mask` is true: the
    k-th smallest, k = 1 + round(q (n - 1)), no interpolation; one sort for the whole batch, on the
    device (a loop over images would wait for the GPU once per image)."""
    ordered = torch.where(mask, values, torch.full_like(values, float("inf"))).sort(dim=1).values
    n = mask.sum(1).to(torch.float64)
    out = []
    for q in qs:
        k = torch.round(q * (n - 1)).long().clamp(min=0)  # half to even, as Python's round
        out.append(ordered.gather(1, k.unsqueeze(1)).squeeze(1))
    return out


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, N) sRGB in 0-1 -> L*a*b* as torchstain computes it (OpenCV's scaling: L * 2.55, a and b + 128)."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = (RGB2XYZ.to(rgb.device) / WHITE.to(rgb.device).view(3, 1)) @ lin
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(1)
    return torch.stack([(116 * fy - 16) * 2.55, 500 * (fx - fy) + 128, 200 * (fy - fz) + 128], 1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse of rgb_to_lab, to (B, 3, N) sRGB in 0-1."""
    L, a, b = lab[:, 0] / 2.55, lab[:, 1] - 128, lab[:, 2] - 128
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], 1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16 / 116) / 7.787)
    lin = (torch.linalg.inv(RGB2XYZ).to(lab.device) * WHITE.to(lab.device).view(1, 3)) @ xyz
    return torch.where(lin > 0.0031308, 1.055 * lin.clamp(min=0) ** (1 / 2.4) - 0.055, 12.92 * lin).clamp(0, 1)
