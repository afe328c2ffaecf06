"""The one window plan of `histodg tile` and `histodg predict`: where windows go and how they are read.

Coordinates: every pair is (x, y) - level-0 pixels for where a window is read, patch pixels
(the target resolution, as read) for where it lands in a prediction.

Resolution. A window is `tile` px square at a target resolution; `scale` is level-0 px per
target px. It is read from the coarsest level not coarser than the target
(`Slide.best_level`), `read_size` level px square, and resized to `tile`. A level within
`tolerance` of the target (0.499 for 0.5 um/px) is read at exactly `tile` px, without
resampling; `level0_per_px` is the scale as read (= `scale` unless within the tolerance). A
target more than 2x finer than the slide is refused (no upsampling).

Placement, along each axis:
- ``pad`` (tile): windows start at 0 every `stride` px; the last one may run past the edge (read
  as white). A slide smaller than one window is refused.
- ``flush`` (predict): windows cover [0, length) exactly, the last one flush with the edge, evenly
  spaced at most `stride` apart (nnU-Net's steps). A slide less than half a window is refused.
Windows are visited in vertical strips (`strip_order`) so reads share decoded source tiles.
Read origins are snapped to whole pixels of the read level (readers take floor(x0 / ds)).

Tissue. A thumbnail with at least ~16 px per window is thresholded (`tissue.tissue_mask`); each
window's tissue fraction is the mask's mean over the box it reads. Windows with at least
`min_tissue` (None: any tissue at all) are kept, and so are windows touching parts of the slide
the thumbnail could not decode (they may hold tissue: they are tried, and failures recorded).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import SlideError
from .base import Slide, Thumbnail, resize
from .tissue import tissue_mask, window_fractions

STRIP_WINDOWS = 16  # windows are visited in vertical strips this wide (see strip_order)
MAG_TO_MPP = 10.0  # 10x ~ 1.0 um/px, 20x ~ 0.5, 40x ~ 0.25 (when the objective power is unknown)
PLACEMENTS = ("pad", "flush")
THUMBNAIL_MAX_PX = 4096


@dataclass(frozen=True)
class Resolution:
    """How a slide is read at a target resolution."""

    target_mpp: float  # as asked
    scale: float  # level-0 px per target px, as asked
    level: int
    level_downsample: float
    read_size: int  # level px read for each window
    tile: int  # patch px each window is resized to
    level0_per_px: float  # level-0 px per patch px, as read

    @property
    def level0_size(self) -> float:
        """A window's side in level-0 px."""
        return self.tile * self.level0_per_px

    def level0_xy(self, px_xy: np.ndarray) -> np.ndarray:
        """Read origins (level-0 px, on whole read-level pixels) of windows starting at patch px (x, y)."""
        ds = self.level_downsample
        snapped = np.round(np.asarray(px_xy, np.float64) * (self.level0_per_px / ds)) * ds
        return np.ceil(snapped - 1e-6).astype(np.int64)

    def read(self, slide: Slide, xy0) -> np.ndarray:
        """One patch: `read_size` level px at level-0 `xy0`, resized to `tile` (uint8 (tile, tile, 3))."""
        img = slide.read_region((int(xy0[0]), int(xy0[1])), self.level, (self.read_size, self.read_size))
        return resize(img, (self.tile, self.tile))


def resolve_target(slide: Slide, mpp: float | None = None, magnification: float | None = None) -> tuple[float, float]:
    """(target_mpp, scale) for a slide, from a target mpp or a magnification; scale = level-0 px per target px.

    `magnification` means the slide's objective power divided by it as downsample (10 / mag
    um/px when the objective power is unknown)."""
    if mpp is not None:
        return mpp, mpp / slide.require_mpp()
    if magnification is None:
        raise ValueError("give a target mpp or a magnification")
    if slide.objective_power:
        scale = slide.objective_power / magnification
        return (slide.mpp * scale if slide.mpp else MAG_TO_MPP / magnification), scale
    target = MAG_TO_MPP / magnification
    return target, target / slide.require_mpp()


def resolve(slide: Slide, target_mpp: float, scale: float, tile: int, tolerance: float = 0.02,
            what: str = "target") -> Resolution:
    """The read level and size for windows of `tile` target px; `what` names the target in errors."""
    if scale < 0.5:
        raise SlideError(slide.path, f"{what} {target_mpp:.3g} um/px is more than 2x finer than the slide's "
                                     f"{slide.mpp:.3g} um/px (upsampling refused)")
    level = slide.best_level(scale, tolerance=max(tolerance, 0.01))
    ds = slide.level_downsamples[level]
    read_size = tile if abs(ds / scale - 1) <= tolerance else max(1, round(tile * scale / ds))
    return Resolution(float(target_mpp), float(scale), level, float(ds), int(read_size), int(tile),
                      float(read_size * ds / tile))


# -- placement --------------------------------------------------------------------------------------
def axis_starts(length: float, window: float, stride: float) -> np.ndarray:
    """`pad` placement: starts (floats) 0, stride, 2 stride, ... until the windows cover [0, length)."""
    if length <= window:
        return np.zeros(1)
    n = math.ceil((length - window) / stride - 1e-9) + 1
    return np.arange(n) * stride


def window_starts(length: int, tile: int, stride: int) -> np.ndarray:
    """`flush` placement: integer starts covering [0, length) exactly.

    The first window starts at 0 and the last one ends flush with the edge (`length - tile`);
    between them the starts are evenly spaced, at most `stride` apart. When `length <= tile` a
    single window at 0 covers the axis (the reader pads it).
    """
    if tile <= 0 or stride <= 0:
        raise ValueError("tile and stride must be positive")
    if stride > tile:
        raise ValueError(f"stride {stride} larger than the tile {tile} would leave gaps")
    if length <= tile:
        return np.zeros(1, np.int64)
    n = math.ceil((length - tile) / stride) + 1
    return np.round(np.linspace(0, length - tile, n)).astype(np.int64)


def strip_order(rows: int, cols: int, width: int = STRIP_WINDOWS) -> np.ndarray:
    """Row-major indices of a rows x cols grid, visited strip by strip (strips `width` columns wide).

    Walking a strip row by row, a window shares source tiles with the window above it, read
    `width` windows earlier: the reader's fixed-size tile cache keeps them, however wide the
    slide is, so memory stays flat and each source tile is decoded about once.
    """
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    key = np.lexsort(((c % width).ravel(), r.ravel(), (c // width).ravel()))
    return (r.ravel() * cols + c.ravel())[key]


def _grid(slide: Slide, res: Resolution, stride: int, placement: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(x starts, y starts) in patch px and the (height, width) in patch px they cover."""
    w0, h0 = slide.dimensions
    if placement == "pad":
        if w0 < res.level0_size and h0 < res.level0_size:
            raise SlideError(slide.path, f"{w0}x{h0} px is smaller than one window ({res.tile} px at "
                                         f"{res.target_mpp:.3g} um/px = {res.level0_size:.0f} level-0 px): use a "
                                         f"smaller --tile-size or a coarser --mpp")
        stride0 = stride * res.level0_per_px
        nx, ny = len(axis_starts(w0, res.level0_size, stride0)), len(axis_starts(h0, res.level0_size, stride0))
        xs, ys = np.arange(nx, dtype=np.int64) * stride, np.arange(ny, dtype=np.int64) * stride
        return xs, ys, (int(ys[-1]) + res.tile, int(xs[-1]) + res.tile)
    out_w = max(1, math.ceil(w0 / res.level0_per_px - 1e-9))
    out_h = max(1, math.ceil(h0 / res.level0_per_px - 1e-9))
    if max(out_w, out_h) * 2 < res.tile:
        raise SlideError(slide.path, f"{w0}x{h0} px is too small to segment: less than half a window ({res.tile} px "
                                     f"at {res.target_mpp:.3g} um/px = {res.level0_size:.0f} level-0 px) on both "
                                     f"sides; use a smaller --tile-size or a coarser --mpp")
    return window_starts(out_w, res.tile, stride), window_starts(out_h, res.tile, stride), (out_h, out_w)


# -- the plan ---------------------------------------------------------------------------------------
@dataclass
class WindowPlan:
    """The windows of one slide that are worth reading, in visiting order."""

    resolution: Resolution
    out_shape: tuple[int, int]  # (height, width) in patch px covered by the full grid
    windows: np.ndarray  # (N, 2) patch px (x, y) of each kept window's top-left
    level0_xy: np.ndarray  # (N, 2) int64 level-0 (x, y) read origin of each kept window
    tissue: np.ndarray  # (N,) float32 tissue fraction
    unreadable: np.ndarray  # (N,) float32 fraction the thumbnail could not decode
    total_windows: int  # windows of the full grid, tissue or not
    thumbnail: Thumbnail = field(repr=False)
    tissue_mask: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return len(self.windows)


def plan_windows(slide: Slide, res: Resolution, stride: int, placement: str = "pad", tissue_method: str = "otsu",
                 min_tissue: float | None = None, thumbnail_min_px: int = 512) -> WindowPlan:
    """Every window of the grid, its tissue fraction, and the ones worth reading."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r} is not one of {', '.join(PLACEMENTS)}")
    xs, ys, out_shape = _grid(slide, res, stride, placement)
    order = strip_order(len(ys), len(xs))
    gx, gy = np.meshgrid(xs, ys)
    windows = np.stack([gx.ravel()[order], gy.ravel()[order]], 1)
    level0 = res.level0_xy(windows)
    w0, h0 = slide.dimensions
    px = int(np.clip(16 * max(w0, h0) / res.level0_size, thumbnail_min_px, THUMBNAIL_MAX_PX))
    thumb = slide.thumbnail_checked(px)
    if not thumb.readable.any():
        raise SlideError(slide.path, f"no part of the slide can be decoded: {thumb.first_error}")
    mask = tissue_mask(thumb.rgb, tissue_method) & thumb.readable
    boxes = np.concatenate([level0, level0 + res.level0_size], 1) / thumb.downsample
    tissue = window_fractions(mask, boxes)
    unreadable = window_fractions(~thumb.readable, boxes)
    enough = tissue > 0 if min_tissue is None else tissue >= min_tissue
    keep = enough | (unreadable > 0)
    return WindowPlan(res, out_shape, windows[keep].astype(np.int64), level0[keep], tissue[keep],
                      unreadable[keep], len(windows), thumb, mask)
