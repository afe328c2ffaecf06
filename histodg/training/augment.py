"""Acquisition augmentation of training batches: on the device, whole batches, seeded.

    settings = resolve_augment("strong", {"jpeg": "50"})          # a preset, then overrides
    images, masks = augment_batch(images_0_255, masks, settings, generator)

What a scanner does to a slide, from the stage to the file, and what each setting varies
(per image, each at a random strength up to its setting; 0 switches it off):

| setting | what | strong |
| --- | --- | --- |
| `scale` | resolution off by up to +-scale (a wrong mpp); image bilinear and mask nearest, together, reflected at the border | 0.25 |
| `hed_scale`, `hed_bias` | stain amount (x (1 +- s)) and offset (+- b, optical density) per stain (Tellez et al.) | 0.3, 0.05 |
| `hed_vectors` | stain colour: each stain's RGB absorption vector moved by up to +-v per component | 0.15 |
| `white` | white balance: a gain of 1 +- w per RGB channel | 0.05 |
| `jitter` | brightness, contrast and saturation x (1 +- j) | 0.2 |
| `hue` | hue turned by up to +-hue of a full turn | 0.03 |
| `gamma` | tone curve x^g, log g in +-gamma | 0.25 |
| `blur`, `sharpen` | optics: Gaussian blur (sigma up to `blur` px) or unsharp masking (amount up to `sharpen`) | 1.5, 1.0 |
| `noise` | sensor noise, sigma up to `noise` grey levels | 6 |
| `jpeg` | JPEG re-compression at a quality between `jpeg` and 95 (DCT quantisation with 4:2:0 chroma, as libjpeg) | 40 |
| `p` | the share of images that get each of scale, blur/sharpen, noise and jpeg | 0.5 |

Presets: ``none`` (nothing, not even flips), ``light`` (flips and 90-degree rotations, chosen
by the sampler, and jitter 0.1: what histodg did before this module), ``strong`` (everything
above). Masks follow the geometric transforms only. The same generator state gives the same
batch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..constants import AUGMENT_PRESETS

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB/residual), as in scikit-image.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / RGB_FROM_HED.norm(dim=1, keepdim=True)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


@dataclass(frozen=True)
class AugmentSettings:
    flips: bool = True
    scale: float = 0.0
    hed_scale: float = 0.0
    hed_bias: float = 0.0
    hed_vectors: float = 0.0
    white: float = 0.0
    jitter: float = 0.0
    hue: float = 0.0
    gamma: float = 0.0
    blur: float = 0.0
    sharpen: float = 0.0
    noise: float = 0.0
    jpeg: int = 0
    p: float = 0.5

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "flips" and v < 0:
                raise ValueError(f"--aug {f.name}={v}: must not be negative")
        if not self.jpeg == 0 and not 1 <= self.jpeg <= 95:
            raise ValueError(f"--aug jpeg={self.jpeg}: a JPEG quality of 1-95, or 0 for none")
        if self.p > 1 or self.scale >= 1 or self.jitter >= 1 or self.hed_scale >= 1:
            raise ValueError("--aug p, scale, jitter and hed_scale must be below 1")

    @property
    def photometric(self) -> bool:
        return any(getattr(self, k) for k in ("hed_scale", "hed_bias", "hed_vectors", "white", "jitter", "hue", "gamma",
                                               "blur", "sharpen", "noise", "jpeg"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    "none": AugmentSettings(flips=False),
    "light": AugmentSettings(jitter=0.1),
    "strong": AugmentSettings(scale=0.25, hed_scale=0.3, hed_bias=0.05, hed_vectors=0.15, white=0.05, jitter=0.2, hue=0.03,
                              gamma=0.25, blur=1.5, sharpen=1.0, noise=6.0, jpeg=40),
}


assert tuple(PRESETS) == AUGMENT_PRESETS


def resolve_augment(preset: str, overrides: dict | None = None) -> AugmentSettings:
    """A preset's settings with `--aug key=value` overrides (strings are converted)."""
    if preset not in PRESETS:
        raise ValueError(f"--augment {preset!r}: choose from {', '.join(PRESETS)}")
    base = PRESETS[preset]
    fields = {f.name: f for f in dataclasses.fields(AugmentSettings)}
    values: dict[str, Any] = {}
    for key, raw in (overrides or {}).items():
        if key not in fields:
            raise ValueError(f"--aug {key}: no such setting (there are: {', '.join(fields)})")
        kind = type(getattr(base, key))
        try:
            if kind is bool:
                values[key] = raw if isinstance(raw, bool) else str(raw).strip().lower() in ("1", "true", "yes", "on")
            else:
                values[key] = kind(float(raw)) if kind is int else float(raw)
        except ValueError:
            raise ValueError(f"--aug {key}={raw}: expected a {kind.__name__}") from None
    return dataclasses.replace(base, **values)


# -- the batch ---------------------------------------------------------------------------------------
def augment_batch(x: torch.Tensor, masks: torch.Tensor, s: AugmentSettings, gen: torch.Generator):
    """(N, 3, H, W) float RGB in 0-255 and (N, H, W) uint8 masks -> both, augmented as `s` says.

    Random numbers come from `gen` (a CPU generator) in a fixed order, so the same seed gives the
    same batch on any device."""
    n = x.shape[0]

    def rand(*shape):  # U(0, 1) on the CPU generator, moved to the device
        return torch.rand(n, *shape, generator=gen).to(x.device)

    def chosen():  # which images get an occasional transform
        return rand() < s.p

    if s.scale:
        x, masks = scale_jitter(x, masks, 1 + (rand() * 2 - 1) * s.scale, chosen())
    if s.hed_scale or s.hed_bias or s.hed_vectors:
        x = stain_jitter(x, 1 + (rand(3) * 2 - 1) * s.hed_scale, (rand(3) * 2 - 1) * s.hed_bias,
                         (rand(3, 3) * 2 - 1) * s.hed_vectors)
    if s.white:
        x = x * (1 + (rand(3, 1, 1) * 2 - 1) * s.white)
    if s.jitter:
        x = color_jitter(x, gen, s.jitter)
    if s.hue:
        x = hue_turn(x, (rand() * 2 - 1) * s.hue * 2 * math.pi)
    if s.gamma:
        x = 255 * (x.clamp(0, 255) / 255) ** torch.exp((rand(1, 1, 1) * 2 - 1) * s.gamma)
    if s.blur or s.sharpen:
        optics, which = rand(), chosen()
        if s.blur:
            x = gaussian_blur(x, 0.3 + rand() * max(s.blur - 0.3, 0), which & ((optics < 0.5) | (s.sharpen == 0)))
        if s.sharpen:
            x = sharpen(x, rand() * s.sharpen, which & ((optics >= 0.5) | (s.blur == 0)))
    if s.noise:
        sigma = (rand() * s.noise * chosen()).view(n, 1, 1, 1)
        x = x + torch.randn(x.shape, generator=gen).to(x.device) * sigma
    if s.jpeg:
        which = chosen()
        if which.any():
            quality = s.jpeg + rand() * (95 - s.jpeg)
            x = torch.where(which.view(n, 1, 1, 1), jpeg_roundtrip(x.clamp(0, 255), quality), x)
    return x.clamp(0, 255), masks


def color_jitter(x: torch.Tensor, generator: torch.Generator, strength: float = 0.1) -> torch.Tensor:
    """Per-image brightness, contrast and saturation x (1 +- strength) on 0-255 floats."""
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


def hed_jitter(rgb255: torch.Tensor, sigma: float, bias: float, p: float = 1.0) -> torch.Tensor:
    """Tellez et al. (2018) HED augmentation of RGB images in 0-255 (N, 3, H, W): per image and
    stain c' = c a + b, a ~ U(1 - sigma, 1 + sigma), b ~ U(-bias, bias), on a fraction `p` of
    the images, from the global torch generator (the `stain` method's and SDS's own jitter).

    c are the stain concentrations in optical density (OD = -ln(I / 255) projected on the
    Ruifrok-Johnston stain vectors), as in the paper. (scikit-image >= 0.19's rgb2hed divides
    OD by -ln(1e-6) = 13.8, so the same sigma and bias there would be 13.8x stronger.)"""
    if sigma <= 0 and bias <= 0:
        return rgb255
    n, dev = rgb255.shape[0], rgb255.device
    a = 1 + (torch.rand(n, 3, device=dev) * 2 - 1) * sigma
    b = (torch.rand(n, 3, device=dev) * 2 - 1) * bias
    if p < 1:
        keep = (torch.rand(n, 1, device=dev) >= p).float()
        a, b = a * (1 - keep) + keep, b * (1 - keep)
    return stain_jitter(rgb255, a, b, None)


def stain_jitter(rgb255: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, vectors: torch.Tensor | None) -> torch.Tensor:
    """Separate the stains (reference vectors), scale (N, 3) and shift (N, 3) them, and recombine
    with each stain's vector moved by `vectors` (N, 3, 3) (renormalised), or the reference ones."""
    dev = rgb255.device
    with torch.autocast(dev.type, enabled=False):  # colour maths in float32, also under bf16 autocast
        return _stain_jitter(rgb255.float(), scale.float(), bias.float(), None if vectors is None else vectors.float())


def _stain_jitter(rgb255, scale, bias, vectors):
    dev = rgb255.device
    od = -torch.log((rgb255 / 255.0).clamp(min=1e-6))
    stains = torch.einsum("nchw,cd->ndhw", od, HED_FROM_RGB.to(dev))
    stains = stains * scale.to(dev)[:, :, None, None] + bias.to(dev)[:, :, None, None]
    if vectors is None:
        out = torch.einsum("ndhw,dc->nchw", stains, RGB_FROM_HED.to(dev))
    else:
        m = (RGB_FROM_HED.to(dev)[None] + vectors.to(dev)).clamp(min=0.01)
        m = m / m.norm(dim=2, keepdim=True)
        out = torch.einsum("ndhw,ndc->nchw", stains, m)
    return (torch.exp(-out) * 255).clamp(0, 255)


def hue_turn(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Turn the chroma of each image by `angle` radians (YIQ: luminance kept)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=x.device)
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(len(angle), 3, 3, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq  # (N, 3, 3) on RGB
    return torch.einsum("ncd,ndhw->nchw", m, x)


def scale_jitter(x: torch.Tensor, masks: torch.Tensor, factor: torch.Tensor, which: torch.Tensor):
    """Zoom the chosen images and their masks by `factor` about the centre (> 1 magnifies), the
    border reflected; the others are untouched."""
    idx = torch.nonzero(which).flatten()
    if not len(idx):
        return x, masks
    f = factor[idx]
    theta = torch.zeros(len(idx), 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = 1 / f, 1 / f
    grid = F.affine_grid(theta, [len(idx), 3, *x.shape[-2:]], align_corners=False)
    x, masks = x.clone(), masks.clone()
    x[idx] = F.grid_sample(x[idx], grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    m = F.grid_sample(masks[idx][:, None].float(), grid, mode="nearest", padding_mode="reflection", align_corners=False)
    masks[idx] = m[:, 0].round().to(masks.dtype)
    return x, masks


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None].clamp(min=1e-3)) ** 2)
    return k / k.sum(1, keepdim=True)  # (N, 2r + 1)


def _blur_all(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image, borders reflected."""
    n, c, h, w = x.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    k = _gaussian_kernels(sigma, radius).repeat_interleave(c, 0)  # (N * C, 2r + 1)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    if not which.any():
        return x
    return torch.where(which.view(-1, 1, 1, 1), _blur_all(x, sigma), x)


def sharpen(x: torch.Tensor, amount: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """Unsharp masking: x + amount (x - blur(x)), blur sigma 1 px."""
    if not which.any():
        return x
    detail = x - _blur_all(x, torch.ones(len(x), device=x.device))
    return torch.where(which.view(-1, 1, 1, 1), x + amount.view(-1, 1, 1, 1) * detail, x)


# -- JPEG -------------------------------------------------------------------------------------------
# the quantisation tables of the JPEG standard (Annex K), for quality 50
_LUMA = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
         14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
         49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]
_CHROMA = [17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
           47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32


def quant_tables(quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """libjpeg's quality scaling of the standard tables: (N, 8, 8) luma and chroma tables."""
    q = quality.clamp(1, 100)
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q)[:, None, None]

    def table(base):
        t = torch.tensor(base, dtype=torch.float32, device=q.device).view(1, 8, 8)
        return ((t * scale + 50) // 100).clamp(1, 255)

    return table(_LUMA), table(_CHROMA)


def _dct_matrix(device) -> torch.Tensor:
    k = torch.arange(8, dtype=torch.float32, device=device)
    d = torch.cos((2 * k[None] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d


def _quantise(plane: torch.Tensor, table: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(N, H, W) plane (multiples of 8) through 8x8 DCT, quantisation with (N, 8, 8) tables, inverse."""
    n, h, w = plane.shape
    blocks = (plane - 128).reshape(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)
    coef = d @ blocks @ d.T
    t = table[:, None, None]
    coef = torch.round(coef / t) * t
    out = (d.T @ coef @ d).permute(0, 1, 3, 2, 4).reshape(n, h, w)
    return out + 128


def jpeg_roundtrip(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """What a baseline JPEG encode and decode at `quality` (per image) does to RGB 0-255 images:
    YCbCr, 4:2:0 chroma, 8x8 DCT quantisation with the standard tables, and back (the entropy
    coding between is lossless, so it is left out)."""
    n, _, h, w = x.shape
    ph, pw = -h % 16, -w % 16
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    luma_t, chroma_t = quant_tables(quality)
    d = _dct_matrix(x.device)
    y = _quantise(y, luma_t, d)
    chroma = F.avg_pool2d(torch.stack([cb, cr], 1), 2)
    pad_h, pad_w = -chroma.shape[2] % 8, -chroma.shape[3] % 8
    chroma = F.pad(chroma, (0, pad_w, 0, pad_h), mode="replicate")
    chroma = torch.stack([_quantise(chroma[:, i], chroma_t, d) for i in range(2)], 1)
    chroma = chroma[:, :, : (x.shape[2] // 2), : (x.shape[3] // 2)]
    cb, cr = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False).unbind(1)
    out = torch.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)], 1)
    return out[:, :, :h, :w].clamp(0, 255)
