"""The grid of windows at a target resolution.

A window is `tile_size` target pixels square at `target_mpp`; neighbours are `tile_size -
overlap` apart. With `scale = target_mpp / slide_mpp` (level-0 px per target px) a window is read
at the coarsest level not coarser than the target (`Slide.best_level`), `read_size` level pixels
square, and resized to `tile_size`. When that level's resolution is within `mpp_tolerance` of the
target (0.499 vs 0.5 um/px), it is read at exactly `tile_size` with no resampling; `eff_scale`
is the scale as read, so `level0_size = tile_size * eff_scale`. Windows start at the slide's
origin; the last row and column may run past the edge (read as white).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import SlideError
from .slide import Slide
from .tissue import METHODS, tissue_mask, window_fractions

STRIP_WINDOWS = 16  # windows are visited in vertical strips this wide (see strip_order)
MAG_TO_MPP = 10.0  # 10x ~ 1.0 um/px, 20x ~ 0.5, 40x ~ 0.25 (when the objective power is unknown)


@dataclass(frozen=True)
class TileSettings:
    """What `histodg tile` cuts: validated once, recorded in every store."""

    tile_size: int = 512
    mpp: float | None = 0.5
    magnification: float | None = None
    overlap: int = 0
    min_tissue: float = 0.25
    tissue_method: str = "otsu"
    mpp_tolerance: float = 0.02

    def __post_init__(self):
        if self.tile_size < 16 or self.tile_size > 8192:
            raise ValueError(f"tile size {self.tile_size} is outside 16-8192 px")
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"overlap {self.overlap} must be >= 0 and smaller than the tile size {self.tile_size}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min tissue {self.min_tissue} must be between 0 and 1")
        if self.tissue_method not in METHODS:
            raise ValueError(f"tissue method {self.tissue_method!r} is not one of {', '.join(METHODS)}")
        if self.mpp is None and self.magnification is None:
            raise ValueError("give a target resolution: mpp or magnification")
        if self.mpp is not None and self.magnification is not None:
            raise ValueError("give mpp or magnification, not both")
        if self.mpp is not None and not 0.05 <= self.mpp <= 100:
            raise ValueError(f"target mpp {self.mpp} is outside 0.05-100 um/px")
        if not 0.0 <= self.mpp_tolerance <= 0.25:
            raise ValueError(f"mpp tolerance {self.mpp_tolerance} must be between 0 and 0.25")
        if self.magnification is not None and not 0.1 <= self.magnification <= 200:
            raise ValueError(f"magnification {self.magnification} is outside 0.1-200x")

    @property
    def stride(self) -> int:
        return self.tile_size - self.overlap


@dataclass
class Grid:
    """The windows of one slide."""

    target_mpp: float
    scale: float  # level-0 px per target px, as asked
    eff_scale: float  # level-0 px per patch px, as read (== scale unless within mpp tolerance)
    level: int
    read_size: int  # level px read for each window
    level0_size: float  # window side in level-0 px
    coords: np.ndarray  # (N, 2) int64 level-0 (x, y) of each window's top-left
    tissue: np.ndarray  # (N,) float32 tissue fraction
    unreadable: np.ndarray  # (N,) float32 fraction of the window the thumbnail could not decode
    thumbnail_downsample: float = 1.0
    tissue_mask: np.ndarray | None = field(default=None, repr=False)
    total_windows: int = 0

    def __len__(self) -> int:
        return len(self.coords)


def resolve_target(slide: Slide, settings: TileSettings) -> tuple[float, float]:
    """(target_mpp, scale) for a slide; scale = level-0 px per target px."""
    if settings.mpp is not None:
        mpp0 = slide.require_mpp()
        return settings.mpp, settings.mpp / mpp0
    mag = settings.magnification
    if slide.objective_power:
        scale = slide.objective_power / mag
        target = slide.mpp * scale if slide.mpp else MAG_TO_MPP / mag
        return target, scale
    mpp0 = slide.require_mpp()
    target = MAG_TO_MPP / mag
    return target, target / mpp0


def axis_starts(length: float, window: float, stride: float) -> np.ndarray:
    """Start positions (floats) along one axis so the windows cover [0, length)."""
    if length <= window:
        return np.zeros(1)
    n = math.ceil((length - window) / stride - 1e-9) + 1
    return np.arange(n) * stride


def strip_order(rows: int, cols: int, width: int = STRIP_WINDOWS) -> np.ndarray:
    """Row-major indices of a rows x cols grid, visited strip by strip (strips `width` columns wide).

    Walking a strip row by row, a window shares source tiles with the window above it, read
    `width` windows earlier: the reader's fixed-size tile cache keeps them, however wide the
    slide is, so memory stays flat and each source tile is decoded about once.
    """
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    key = np.lexsort(((c % width).ravel(), r.ravel(), (c // width).ravel()))
    return (r.ravel() * cols + c.ravel())[key]


def plan_grid(slide: Slide, settings: TileSettings, thumbnail_px: int | None = None) -> Grid:
    """All windows of a slide with their tissue fraction, and the ones worth keeping."""
    target_mpp, scale = resolve_target(slide, settings)
    if scale < 0.5:
        raise SlideError(
            slide.path,
            f"target {target_mpp:.3g} um/px is more than 2x finer than the slide's {slide.mpp:.3g} um/px (upsampling refused)",
        )
    tol = settings.mpp_tolerance
    level = slide.best_level(scale, tolerance=max(tol, 0.01))
    ds = slide.level_downsamples[level]
    if abs(ds / scale - 1) <= tol:
        read_size = settings.tile_size  # close enough: no resampling
    else:
        read_size = max(1, round(settings.tile_size * scale / ds))
    eff_scale = read_size * ds / settings.tile_size
    level0_size = settings.tile_size * eff_scale
    w0, h0 = slide.dimensions
    if w0 < level0_size and h0 < level0_size:
        raise SlideError(
            slide.path,
            f"{w0}x{h0} px is smaller than one window ({settings.tile_size} px at {target_mpp:.3g} um/px "
            f"= {level0_size:.0f} level-0 px): use a smaller --tile-size or a coarser --mpp",
        )
    stride0 = settings.stride * eff_scale
    xs, ys = axis_starts(w0, level0_size, stride0), axis_starts(h0, level0_size, stride0)
    # snap to whole pixels of the read level: readers take floor(x0 / ds) as the level origin
    xs, ys = np.ceil(np.round(xs / ds) * ds - 1e-6), np.ceil(np.round(ys / ds) * ds - 1e-6)
    gx, gy = np.meshgrid(xs, ys)
    order = strip_order(len(ys), len(xs))
    coords = np.stack([gx.ravel()[order], gy.ravel()[order]], 1).astype(np.int64)

    # thumbnail with at least ~16 px per window, 512-4096 px on the long side
    longest = max(w0, h0)
    px = thumbnail_px or int(np.clip(16 * longest / level0_size, 512, 4096))
    thumb = slide.thumbnail_checked(px)
    readable = thumb.readable
    if not readable.any():
        raise SlideError(slide.path, f"no part of the slide can be decoded: {thumb.first_error}")
    thumb_ds = thumb.downsample
    mask = tissue_mask(thumb.rgb, settings.tissue_method) & readable
    boxes = np.concatenate([coords, coords + level0_size], 1) / thumb_ds
    tissue = window_fractions(mask, boxes)
    unreadable = window_fractions(~readable, boxes)
    # windows touching undecodable areas might hold tissue: try them and record what fails
    keep = (tissue >= settings.min_tissue) | (unreadable > 0)
    return Grid(
        target_mpp=float(target_mpp),
        scale=float(scale),
        eff_scale=float(eff_scale),
        level=level,
        read_size=int(read_size),
        level0_size=float(level0_size),
        coords=coords[keep],
        tissue=tissue[keep],
        unreadable=unreadable[keep],
        thumbnail_downsample=float(thumb_ds),
        tissue_mask=mask,
        total_windows=len(coords),
    )
