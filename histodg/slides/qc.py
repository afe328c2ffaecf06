"""Artefact QC of a window, without weights: pen marks, out-of-focus tissue, folds and dark debris, glass.

    qc = WindowQC.from_plan(slide, plan)     # the slide's typical tissue density and sharpness
    flags = qc(window_rgb)                                           # a bitmask of FLAGS, 0 when clean

Every rule is a colour or sharpness test that clean H&E does not pass, measured on the real
slide in the tests' data and on the synthetic scanners (BENCHMARKS.md, "Artefact QC"):

- `pen`: marker ink, more than `PEN_FRACTION` of the window's pixels. Blue ink has a hue of
  190-235 degrees (haematoxylin is violet, 240-300), green ink 75-185 (neither stain reaches
  it), both saturated; black ink is dark and grey (value < 0.2, saturation < 0.35), where dark
  nuclei are saturated violet.
- `blur`: at least `BLUR_BLOCKS` of the window's 64 px tissue blocks have a Laplacian variance
  (at the window's own resolution) under `BLUR_RATIO` times the slide's typical one, the median
  over a sample of its windows: sharpness depends on the scanner, the resolution and the
  tissue, so it is judged against the slide itself (clean blocks stay above 0.15x the median
  on the real slide and on every synthetic scanner; a Gaussian blur of sigma 2 px at 0.5 um/px
  brings the real slide's under 0.05x). A slide out of focus everywhere is not flagged: no
  slide-relative rule can see it. Only windows with at least `MIN_TISSUE` tissue are tested.
- `dark`: a fold (tissue lying on itself doubles its optical density) or dark debris: the mean
  optical density of the window's tissue above `DARK_RATIO` times the slide's typical tissue
  density, which is measured on the thumbnail (so a heavily stained slide is not all "dark").
- `glass`: more than `GLASS_FRACTION` of the pixels bright and colourless: empty slide.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .. import SlideError
from ..constants import QC_FLAGS

FLAGS = QC_FLAGS  # the flag bits live in constants (stores and summaries use them)
PEN_FRACTION = 0.1
BLUR_RATIO = 0.1  # a block is out of focus under this fraction of the slide's typical sharpness
FOCUS_SAMPLE = 32  # windows read to measure the slide's typical sharpness
MIN_TISSUE = 0.25
DARK_RATIO = 1.9
GLASS_FRACTION = 0.9
FOCUS_BLOCK = 64  # the blur test's blocks, px at the window's resolution
BLUR_BLOCKS = 0.5  # a window is out of focus when at least this fraction of its tissue blocks is
QC_PX = 256  # windows are checked at most this large (area-averaged): 4x cheaper for 512 px windows
COLOUR_PX = 128  # colour tests on a regular sample of about 128 x 128 pixels: the same fractions, cheaper


def counts(flags) -> dict[str, int]:
    """How many of `flags` (bitmasks) carry each flag."""
    a = np.asarray(flags, dtype=np.uint8).ravel()
    return {name: int(np.count_nonzero(a & bit)) for name, bit in FLAGS.items()}


def _deg(d: float) -> int:
    """A hue in degrees in OpenCV's full-range 8-bit units (0-255 for 0-360)."""
    return round(d * 256 / 360)


def _u8(f: float) -> int:
    return round(f * 255)


# (low, high) HSV bounds, inclusive, in OpenCV's 8-bit full-range units (cv2.inRange is one C pass)
INK_RANGES = (((_deg(190), _u8(0.35) + 1, _u8(0.2) + 1), (_deg(235), 255, 255)),      # blue
              ((_deg(75), _u8(0.25) + 1, _u8(0.15) + 1), (_deg(185), 255, 255)),      # green
              ((0, 0, 0), (255, _u8(0.35) - 1, _u8(0.2) - 1)))                          # black
GLASS_RANGE = ((0, 0, _u8(0.86) + 1), (255, _u8(0.08) - 1, 255))
_OD = (-np.log(np.maximum(np.arange(256, dtype=np.float32), 1.0) / 255.0)).astype(np.float32)


def _hsv(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV_FULL)


def _ink(hsv: np.ndarray) -> np.ndarray:
    import cv2

    masks = [cv2.inRange(hsv, lo, hi) for lo, hi in INK_RANGES]
    out = masks[0]
    for m in masks[1:]:
        out = cv2.bitwise_or(out, m)
    return out


def _glass(hsv: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.inRange(hsv, *GLASS_RANGE)


def ink(rgb: np.ndarray) -> np.ndarray:
    """The pixels that are marker ink (blue, green or black), as a boolean (H, W)."""
    return _ink(_hsv(rgb)) > 0


def glass_pixels(rgb: np.ndarray) -> np.ndarray:
    """Bright, colourless pixels: glass (or the white outside a slide)."""
    return _glass(_hsv(rgb)) > 0


def optical_density(rgb: np.ndarray, where: np.ndarray) -> float:
    """The mean optical density (mean of the three channels) of the pixels `where` (0 when none)."""
    import cv2

    where = where.astype(np.uint8)
    if not cv2.countNonZero(where):
        return 0.0
    means = cv2.mean(cv2.LUT(np.ascontiguousarray(rgb), _OD), mask=where)
    return float(sum(means[:3]) / 3)


def block_variances(rgb: np.ndarray) -> np.ndarray:
    """The variance of the Laplacian of the grey window in each `FOCUS_BLOCK` px block that is at
    least half tissue (grey < 220), over the block's tissue pixels."""
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    lap = cv2.Laplacian(grey, cv2.CV_32F, ksize=3)
    tissue = (grey < 220).astype(np.float32)
    lap = lap * tissue
    h, w = grey.shape
    k = (max(1, w // FOCUS_BLOCK), max(1, h // FOCUS_BLOCK))
    frac = cv2.resize(tissue, k, interpolation=cv2.INTER_AREA)
    m1 = cv2.resize(lap, k, interpolation=cv2.INTER_AREA)
    m2 = cv2.resize(lap * lap, k, interpolation=cv2.INTER_AREA)
    ok = frac >= 0.5
    return m2[ok] / frac[ok] - (m1[ok] / frac[ok]) ** 2


def qc_view(rgb: np.ndarray) -> np.ndarray:
    """The window as QC sees it: RGB, at most `QC_PX` px on a side (area-averaged)."""
    import cv2

    rgb = rgb[..., :3]
    h, w = rgb.shape[:2]
    if max(h, w) <= QC_PX:
        return rgb
    f = QC_PX / max(h, w)
    return cv2.resize(np.ascontiguousarray(rgb), (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)


_REDUCED = {1: "IMREAD_COLOR", 2: "IMREAD_REDUCED_COLOR_2", 4: "IMREAD_REDUCED_COLOR_4", 8: "IMREAD_REDUCED_COLOR_8"}


def decode_for_qc(jpeg: bytes, side: int) -> np.ndarray:
    """A JPEG window of `side` px decoded straight to about `QC_PX` px (libjpeg's DCT scaling, in
    OpenCV: cheaper than decoding it whole), for windows stored as the slide's own JPEG tile."""
    import cv2

    factor = max(f for f in _REDUCED if f == 1 or side // f >= QC_PX)
    bgr = cv2.imdecode(np.frombuffer(bytes(jpeg), np.uint8), getattr(cv2, _REDUCED[factor]))
    if bgr is None:
        raise ValueError("not a decodable JPEG stream")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def sample_windows(slide, plan, n: int = FOCUS_SAMPLE) -> list[np.ndarray]:
    """Up to `n` windows of the plan, evenly spread over it (the ones that cannot be read left out)."""
    out = []
    for i in np.unique(np.linspace(0, len(plan) - 1, min(n, len(plan))).astype(int)) if len(plan) else []:
        try:
            out.append(plan.resolution.read(slide, plan.level0_xy[i]))
        except SlideError:
            continue
    return out


@dataclass(frozen=True)
class WindowQC:
    """The QC of one slide's windows: `reference_od` is its typical tissue density and
    `reference_focus` its typical sharpness (None: that test is not done)."""

    reference_od: float | None = None
    reference_focus: float | None = None

    @classmethod
    def for_slide(cls, thumbnail: np.ndarray, tissue_mask: np.ndarray, sample: Sequence[np.ndarray] = ()) -> WindowQC:
        """The slide's references: density from its thumbnail's tissue pixels (ink and glass left
        out), sharpness as the median block variance of a `sample` of its windows."""
        where = tissue_mask & ~glass_pixels(thumbnail) & ~ink(thumbnail)
        # the mean pixel: the median (which a fold moves less) made 2 false folds on the real slide
        od = optical_density(thumbnail, where) if where.sum() >= 16 else 0.0
        blocks = np.concatenate([block_variances(qc_view(w)) for w in sample]) if len(sample) else np.zeros(0)
        focus = float(np.median(blocks)) if len(blocks) >= 8 else 0.0
        return cls(od if od > 0 else None, focus if focus > 0 else None)

    @classmethod
    def from_plan(cls, slide, plan) -> WindowQC:
        """`for_slide` from a window plan and a sample of its windows."""
        return cls.for_slide(plan.thumbnail.rgb, plan.tissue_mask, sample_windows(slide, plan))

    def __call__(self, rgb: np.ndarray) -> int:
        """The bitmask (`FLAGS`) of one RGB uint8 window."""
        import cv2

        rgb = qc_view(rgb)
        step = max(1, min(rgb.shape[:2]) // COLOUR_PX)
        hsv = _hsv(rgb[::step, ::step])
        n = hsv.shape[0] * hsv.shape[1]
        glass = _glass(hsv)
        if cv2.countNonZero(glass) > GLASS_FRACTION * n:
            return FLAGS["glass"]
        flags = 0
        pen = _ink(hsv)
        if cv2.countNonZero(pen) > PEN_FRACTION * n:
            flags |= FLAGS["pen"]
        tissue = cv2.bitwise_not(cv2.bitwise_or(glass, pen))
        if cv2.countNonZero(tissue) < MIN_TISSUE * n:
            return flags
        if self.reference_od and optical_density(rgb[::step, ::step], tissue) > DARK_RATIO * self.reference_od:
            flags |= FLAGS["dark"]
        focus = self.reference_focus
        blocks = block_variances(rgb) if focus else None
        if focus and blocks is not None and len(blocks) and np.mean(blocks < BLUR_RATIO * focus) >= BLUR_BLOCKS:
            flags |= FLAGS["blur"]
        return flags

    def describe(self) -> dict:
        """The thresholds and references, as recorded with the results."""
        def r(v):
            return None if v is None else round(v, 4)

        return {"pen_fraction": PEN_FRACTION, "blur_ratio": BLUR_RATIO, "blur_blocks": BLUR_BLOCKS,
                "dark_ratio": DARK_RATIO, "glass_fraction": GLASS_FRACTION, "reference_od": r(self.reference_od),
                "reference_focus": r(self.reference_focus)}
