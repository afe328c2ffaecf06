"""The slide contract every reader implements, and the pixel helpers they share.

    rgb = slide.read_region((x0, y0), level, (w, h))   # uint8 (h, w, 3), transparency on white

A `Slide` has level geometry (`level_dimensions`, `level_downsamples`), metadata (`mpp`,
`objective_power`, `vendor`, ...), `read_region` and a block-wise `thumbnail_checked` that
marks what cannot be decoded. Every failure raises `SlideError(path, reason)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .. import SlideError

MPP_RANGE = (0.02, 50.0)  # plausible microscope pixel sizes, um


@dataclass
class Thumbnail:
    rgb: np.ndarray  # (h, w, 3) uint8
    readable: np.ndarray  # (h, w) bool: False where the slide could not be decoded
    downsample: float  # level-0 px per thumbnail px
    first_error: str | None = None


class Slide:
    """Base class: geometry, metadata and the helpers every backend shares."""

    backend = "?"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.vendor: str | None = None
        self.level_dimensions: list[tuple[int, int]] = []
        self.level_downsamples: list[float] = []
        self.mpp: float | None = None
        self.mpp_source: str | None = None  # "metadata" | "override" | None
        self.objective_power: float | None = None
        self.associated_images: list[str] = []
        self.properties: dict[str, str] = {}

    # -- geometry ----------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_tile_size(self, level: int) -> tuple[int, int]:
        """Natural read block at a level (the stored tile size when known)."""
        return (1024, 1024)

    def best_level(self, downsample: float, tolerance: float = 0.01) -> int:
        """The coarsest level whose downsample does not exceed `downsample` (within tolerance)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + tolerance):
                best = i
        return best

    def require_mpp(self) -> float:
        if self.mpp is None:
            raise SlideError(self.path, "no microns-per-pixel in the slide's metadata; pass --mpp-override")
        return self.mpp

    def set_mpp_override(self, mpp: float | None) -> None:
        if mpp is not None:
            if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
                raise SlideError(self.path, f"mpp override {mpp} is outside {MPP_RANGE[0]}-{MPP_RANGE[1]} um")
            self.mpp, self.mpp_source = float(mpp), "override"

    # -- pixels ------------------------------------------------------------------------------
    def read_region(self, xy0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def thumbnail_checked(self, max_px: int) -> Thumbnail:
        """The slide at a downsample where the longest side is at most `max_px`.

        Read block by block (stored tiles) at the closest level so memory stays small and a
        corrupt block only marks its own area as unreadable (`readable` False, pixels white).
        """
        w0, h0 = self.dimensions
        ds = max(1.0, max(w0, h0) / max_px)
        level = self.best_level(ds)
        lds = self.level_downsamples[level]
        f = max(1, int(np.ceil(ds / lds - 1e-9)))  # integer box factor: level px per thumbnail px
        lw, lh = self.level_dimensions[level]
        tw, th = -(-lw // f), -(-lh // f)
        rgb = np.full((th, tw, 3), 255, np.uint8)
        ok = np.ones((th, tw), bool)
        first_error = None
        tile_w, tile_h = self.level_tile_size(level)
        bw, bh = f * max(1, round(tile_w / f)), f * max(1, round(tile_h / f))  # blocks of whole f x f cells
        for by in range(0, lh, bh):
            for bx in range(0, lw, bw):
                w, h = min(bw, lw - bx), min(bh, lh - by)
                dx0, dy0 = bx // f, by // f
                dx1, dy1 = dx0 + -(-w // f), dy0 + -(-h // f)
                try:
                    xy0 = (int(np.ceil(bx * lds - 1e-6)), int(np.ceil(by * lds - 1e-6)))
                    block = self.read_region(xy0, level, (w, h))
                except SlideError as exc:
                    ok[dy0:dy1, dx0:dx1] = False
                    first_error = first_error or exc.reason
                    continue
                rgb[dy0:dy1, dx0:dx1] = box_reduce(block, f)
        return Thumbnail(rgb, ok, lds * f, first_error)

    def thumbnail(self, max_px: int = 1024) -> np.ndarray:
        thumb = self.thumbnail_checked(max_px)
        if thumb.first_error:
            raise SlideError(self.path, f"{(~thumb.readable).mean():.1%} of the slide cannot be decoded: {thumb.first_error}")
        return thumb.rgb

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self) -> dict:
        """Plain-data summary (for `histodg info`)."""
        return {
            "path": str(self.path),
            "backend": self.backend,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": [round(d, 4) for d in self.level_downsamples],
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
            "associated_images": self.associated_images,
        }


def resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (w, h); area averaging when shrinking by more than 1.25x, bilinear otherwise."""
    w, h = size
    if img.shape[1] == w and img.shape[0] == h:
        return img
    shrink = img.shape[1] / w > 1.25 or img.shape[0] / h > 1.25
    out = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return out if out.ndim == img.ndim else out[..., None]


def box_reduce(img: np.ndarray, f: int) -> np.ndarray:
    """Mean over f x f cells; a partial cell at the right/bottom edge averages what it has.

    Whole cells go through OpenCV's area resize (an exact box mean for integer factors, about
    40x faster than numpy here; rounding may differ by 1), the partial edge strips through numpy.
    """
    if f == 1:
        return img
    h, w, c = img.shape
    H, W = h // f, w // f
    out = np.empty((-(-h // f), -(-w // f), c), np.uint8)
    if H and W:
        core = cv2.resize(np.ascontiguousarray(img[: H * f, : W * f]), (W, H), interpolation=cv2.INTER_AREA)
        out[:H, :W] = core.reshape(H, W, c)
    if h % f:
        out[H:, :] = box_mean(img[H * f :], f)
    if w % f and H:
        out[:H, W:] = box_mean(img[: H * f, W * f :], f)
    return out


def box_mean(img: np.ndarray, f: int) -> np.ndarray:
    """box_reduce in numpy (for the thin partial strips at the edges)."""
    h, w, c = img.shape
    H, W = -(-h // f), -(-w // f)
    padded = np.zeros((H * f, W * f, c), np.uint32)
    padded[:h, :w] = img
    acc = padded.reshape(H, f, W, f, c).sum((1, 3))
    cnt = np.minimum(f, h - np.arange(H) * f)[:, None, None] * np.minimum(f, w - np.arange(W) * f)[None, :, None]
    return (acc / cnt + 0.5).astype(np.uint8)
