"""Acquisition model of `histodg synth`: how a scanner turns stain concentrations into RGB.

Beer-Lambert in optical density with the scanner's own haematoxylin and eosin vectors (jittered a
little per slide), white balance, vignetting of each camera field and a gradient across the slide,
optical blur, sensor noise and a tone curve. JPEG quality and resolution (`mpp`) are part of the
profile too; the writers apply the JPEG.

What real scanners differ in besides colour (issue 31), each off by default, so the built-in
scanners' pixels are what they were:
- `defocus_um`: field curvature, the blur growing from each camera field's centre (sharp) to its
  corners (`blur_um` + `defocus_um`), as a focus map that misses off-centre gives;
- `astigmatism`: the blur's two axes differ (sigma x (1 + a) across, x (1 - a) down);
- `mpp_error`: the true pixel size is `mpp` x (1 + error) while the file states `mpp`, so tissue
  looks smaller or larger than the stated resolution says (calibration errors up to +-20%);
- `seams`: each camera field's brightness off by up to +-`seams` (relative): tile-stitching seams;
- `jpeg2000_psnr`: JPEG 2000 instead of JPEG (as Aperio's lossy SVS files store), at this target
  PSNR in dB (OpenJPEG's fixed-quality mode, `opj_compress -q`); `jpeg_quality` is then unused.
Ranges for a held-out optics scanner (`scanner-f`): blur and defocus within peers' blur
augmentation (albumentations' GaussianBlur default kernel 3-7 px, sigma 0.8-1.4 px, at 0.5-1 um/px),
astigmatism up to 0.3, a 15% calibration error (the issue's +-20%), seams of 3%. For a held-out
JPEG 2000 scanner (`scanner-j`): 33 dB, a compression ratio of about 1:35 on a real H&E image
(`../shared/data/he_carcinoma_1000.png`), where JPEG quality 60-90 gives 33.5-36 dB: the low end of
the training scanners' fidelity, with JPEG 2000's ringing and blur instead of JPEG's blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class ScannerProfile:
    """Acquisition of one scanner: stain appearance, optics, sensor and compression."""

    name: str
    mpp: float  # microns per pixel at level 0
    stain_h: tuple[float, float, float]  # haematoxylin optical-density direction (R, G, B)
    stain_e: tuple[float, float, float]  # eosin optical-density direction (R, G, B)
    stain_scale: float  # overall stain density (protocol and sensor gain)
    white: tuple[float, float, float]  # RGB of empty glass (white balance)
    vignetting: float  # relative darkening at the corners of each camera field
    field_um: float  # camera field of view (the vignetting repeats with it)
    gradient: float  # relative illumination change across the slide
    blur_um: float  # optical blur, Gaussian sigma
    gamma: float  # tone curve exponent (1 = linear)
    noise: float  # sensor noise, 8-bit levels (sigma)
    jpeg_quality: int
    defocus_um: float = 0.0  # extra blur sigma at the corners of each camera field (field curvature)
    astigmatism: float = 0.0  # relative difference of the blur's two axes
    mpp_error: float = 0.0  # the true pixel size is mpp x (1 + mpp_error); files state mpp
    seams: float = 0.0  # each camera field's brightness off by up to this (relative)
    jpeg2000_psnr: float = 0.0  # > 0: JPEG 2000 at this target PSNR (dB) instead of JPEG

    def __post_init__(self):
        if not 0.05 <= self.mpp <= 5:
            raise ValueError(f"{self.name}: mpp {self.mpp} is outside 0.05-5")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"{self.name}: JPEG quality must be 1-100")
        if not (0 <= self.astigmatism < 1 and -0.5 < self.mpp_error < 0.5 and self.defocus_um >= 0 and 0 <= self.seams < 0.5):
            raise ValueError(f"{self.name}: astigmatism 0-1, mpp error within +-0.5, defocus >= 0, seams 0-0.5")
        if self.jpeg2000_psnr and not 20 <= self.jpeg2000_psnr <= 80:
            raise ValueError(f"{self.name}: JPEG 2000 PSNR must be 0 (JPEG) or 20-80 dB")

    @property
    def codec(self) -> tuple[str, dict]:
        """How the scanner compresses: tifffile's compression name and its arguments."""
        if self.jpeg2000_psnr:
            return "jpeg2000", {"level": float(self.jpeg2000_psnr)}
        return "jpeg", {"level": int(self.jpeg_quality)}

    @property
    def true_mpp(self) -> float:
        """The pixel size the tissue is drawn at (the stated `mpp`, off by `mpp_error`)."""
        return self.mpp * (1 + self.mpp_error)


def scan(rng, c_h: np.ndarray, c_e: np.ndarray, s: ScannerProfile) -> np.ndarray:
    """Concentrations -> RGB uint8 as the scanner records them (before JPEG).

    Beer-Lambert with the scanner's stain vectors (jittered a little per slide), white point and
    illumination folded into the log intensity, then optical blur, sensor noise and tone curve.
    """
    h, w = c_h.shape
    v_h = np.asarray(s.stain_h, np.float64) * rng.normal(1, 0.03, 3)  # per-slide staining variation
    v_e = np.asarray(s.stain_e, np.float64) * rng.normal(1, 0.03, 3)
    scale = s.stain_scale * rng.normal(1, 0.04)
    v_h, v_e = scale * v_h / np.linalg.norm(v_h), scale * v_e / np.linalg.norm(v_e)
    # illumination: vignetting of each camera field and a slow gradient across the slide
    mpp = s.true_mpp
    field = s.field_um / mpp
    yy, xx = np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32)
    fy = np.sqrt(np.clip(np.sin(np.pi * (yy % field) / field), 0, 1))
    fx = np.sqrt(np.clip(np.sin(np.pi * (xx % field) / field), 0, 1))
    gdir = rng.uniform(0, 2 * np.pi)
    illum = (1 - s.vignetting * (1 - fy[:, None] * fx[None, :])
             - s.gradient * (np.cos(gdir) * xx[None, :] / w + np.sin(gdir) * yy[:, None] / h))
    if s.seams > 0:  # each camera field a little brighter or darker than its neighbours
        steps = rng.uniform(-s.seams, s.seams, (int(h // field) + 1, int(w // field) + 1)).astype(np.float32)
        illum = illum * (1 + steps[(yy // field).astype(int)][:, (xx // field).astype(int)])
    log_illum = np.log(np.clip(illum, 0.05, None)).astype(np.float32)
    # log I_k = log white_k + log illum - (c_H v_H,k + c_E v_E,k + background)
    m = np.zeros((3, 4), np.float32)
    m[:, 0], m[:, 1], m[:, 2] = -v_h, -v_e, 1
    m[:, 3] = np.log(np.asarray(s.white, np.float64)) - 0.015
    rgb = cv2.exp(cv2.transform(cv2.merge([c_h, c_e, log_illum]), m))
    rgb = optics(rgb, s, field, fy, fx)
    block = 499  # sensor noise: one random block, tiled with a random offset (not in step with tiles)
    noise = rng.standard_normal((block, block, 3), dtype=np.float32) * np.float32(s.noise)
    oy, ox = rng.integers(0, block, 2)
    noise = np.roll(noise, (oy, ox), (0, 1))
    for y in range(0, h, block):
        for x in range(0, w, block):
            view = rgb[y : y + block, x : x + block]
            view += noise[: view.shape[0], : view.shape[1]]
    out = cv2.convertScaleAbs(rgb)  # rounds and saturates to 0-255
    if s.gamma != 1:
        lut = np.clip(255 * (np.arange(256) / 255) ** (1 / s.gamma) + 0.5, 0, 255).astype(np.uint8)
        out = cv2.LUT(out, lut)
    return out


def _blur(rgb: np.ndarray, sigma: float, astigmatism: float) -> np.ndarray:
    if sigma <= 0.1:
        return rgb
    if not astigmatism:
        return cv2.GaussianBlur(rgb, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    return cv2.GaussianBlur(rgb, (0, 0), sigmaX=sigma * (1 + astigmatism), sigmaY=sigma * (1 - astigmatism),
                            borderType=cv2.BORDER_REFLECT)


def optics(rgb: np.ndarray, s: ScannerProfile, field: float, fy: np.ndarray, fx: np.ndarray) -> np.ndarray:
    """The scanner's point-spread function: Gaussian blur (`blur_um`), anisotropic with
    `astigmatism`, and with `defocus_um` more of it towards each camera field's corners (a blend
    of the sharp and the defocused image by the squared distance from the field's centre, `fy`,
    `fx` being 1 at the centre and 0 at the edges)."""
    mpp = s.true_mpp
    sharp = _blur(rgb, s.blur_um / mpp, s.astigmatism)
    if s.defocus_um <= 0:
        return sharp
    soft = _blur(rgb, (s.blur_um + s.defocus_um) / mpp, s.astigmatism)
    off = 1 - (fy[:, None] * fx[None, :]) ** 2  # 0 at each field's centre, 1 at its edges
    return sharp + (soft - sharp) * off[..., None].astype(np.float32)
