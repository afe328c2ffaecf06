"""The one window plan of tile and predict, on in-memory fake slides (no files needed)."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import tissue_field
from histodg import SlideError
from histodg.slides.backends import MemorySlide
from histodg.slides.plan import plan_windows, resolve, resolve_target


def fake(h=1200, w=1600, mpp=0.25, levels=4, objective_power=None):
    return MemorySlide(tissue_field(h, w), mpp, levels=levels, objective_power=objective_power)


def test_level_and_read_size_follow_the_target_resolution():
    s = fake()  # 0.25 um/px, levels at 1, 2, 4, 8x
    assert s.level_downsamples == [1.0, 2.0, 4.0, 8.0]
    r = resolve(s, 1.0, 4.0, 64)  # exactly level 2: read as is
    assert (r.level, r.read_size, r.level0_per_px, r.level0_size) == (2, 64, 4.0, 256.0)
    r = resolve(s, 1.01, 4.04, 64)  # within the 2% tolerance: still read as is, true scale 4
    assert (r.level, r.read_size, r.level0_per_px) == (2, 64, 4.0)
    r = resolve(s, 1.01, 4.04, 64, tolerance=0.0)  # no tolerance: resampled, 65 level px to 64
    assert (r.level, r.read_size) == (2, 65) and r.level0_per_px == 65 * 4 / 64
    r = resolve(s, 1.1, 4.4, 64)  # 10% off the level: resampled from it
    assert (r.level, r.read_size) == (2, 70)
    r = resolve(s, 0.4, 1.6, 64)  # between levels: the finer one, resampled down
    assert (r.level, r.read_size) == (0, 102)
    target, scale = resolve_target(s, magnification=10)  # no objective power: 10x ~ 1 um/px
    assert (target, scale) == (1.0, 4.0)
    s40 = fake(objective_power=40)
    assert resolve_target(s40, magnification=20) == (pytest.approx(0.5), 2.0)
    with pytest.raises(SlideError, match="upsampling refused"):
        resolve(s, 0.1, 0.4, 64)
    with pytest.raises(SlideError, match="model resolution 0.1 um/px"):
        resolve(s, 0.1, 0.4, 64, what="model resolution")


def test_pad_and_flush_placements():
    s = fake(h=700, w=1000, levels=1)  # 1000 x 700 level-0 px
    res = resolve(s, 0.25, 1.0, 256)
    pad = plan_windows(s, res, 256, "pad", "none", 0.0)
    # pad: from the origin every 256 px, the last row/column running past the edge
    assert pad.total_windows == 4 * 3 and pad.out_shape == (768, 1024)
    assert sorted({int(x) for x in pad.windows[:, 0]}) == [0, 256, 512, 768]
    np.testing.assert_array_equal(pad.level0_xy, pad.windows)  # native scale
    flush = plan_windows(s, res, 192, "flush", "none", None)
    # flush: the last window ends at the edge, starts at most 192 apart
    xs, ys = sorted({int(x) for x in flush.windows[:, 0]}), sorted({int(y) for y in flush.windows[:, 1]})
    assert xs[0] == 0 and xs[-1] == 1000 - 256 and max(np.diff(xs)) <= 192
    assert ys[0] == 0 and ys[-1] == 700 - 256 and flush.out_shape == (700, 1000)
    # visiting order: vertical strips, each strip row by row
    assert [tuple(w) for w in pad.windows[:3]] == [(0, 0), (256, 0), (512, 0)]


def test_tissue_selection_keeps_tissue_windows_only():
    s = fake(h=1200, w=1600, levels=1)
    res = resolve(s, 0.25, 1.0, 128)
    every = plan_windows(s, res, 128, "pad", "none", 0.0)
    tissue = plan_windows(s, res, 128, "pad", "otsu", 0.5)
    anything = plan_windows(s, res, 128, "flush", "otsu", None)
    assert len(every) == every.total_windows == 13 * 10
    assert 0 < len(tissue) < len(anything) < len(every)
    assert (tissue.tissue >= 0.5).all() and (anything.tissue > 0).all()
    # the blob is an ellipse centred at (0.45 w, 0.5 h): a kept window's centre is near it
    centres = tissue.level0_xy + 64
    inside = ((centres[:, 0] - 720) / 560) ** 2 + ((centres[:, 1] - 600) / 360) ** 2
    assert inside.max() < 1.6


def test_small_slides_are_refused_clearly():
    s = fake(h=100, w=120, levels=1)
    res = resolve(s, 0.25, 1.0, 256)
    with pytest.raises(SlideError, match="smaller than one window"):
        plan_windows(s, res, 256, "pad")
    with pytest.raises(SlideError, match="less than half a window"):
        plan_windows(s, res, 256, "flush")
    assert len(plan_windows(s, resolve(s, 0.25, 1.0, 200), 200, "flush", "none")) == 1  # half a window is enough
