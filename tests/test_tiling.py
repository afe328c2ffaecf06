"""The window grid and the tissue mask, on the real CMU slide and on synthetic thumbnails."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from histodg import SlideError
from histodg.slides.opening import open_slide
from histodg.slides.plan import axis_starts, strip_order
from histodg.slides.tissue import otsu_level, tissue_mask, window_fractions
from histodg.tiling import TileSettings, plan_tiles


def test_axis_starts_cover_the_axis_exactly():
    for length, window, stride in [(1000, 256, 256), (1000, 256, 128), (255, 256, 256), (2220, 513.03, 513.03)]:
        xs = axis_starts(length, window, stride)
        assert xs[0] == 0
        assert xs[-1] + window >= length  # the last window reaches the edge
        assert len(xs) == 1 or xs[-2] + window < length  # and no window is wasted
        assert np.allclose(np.diff(xs), stride)


def test_settings_validate_in_post_init():
    with pytest.raises(ValueError, match="overlap"):
        TileSettings(tile_size=256, overlap=256)
    with pytest.raises(ValueError, match="min tissue"):
        TileSettings(min_tissue=1.5)
    with pytest.raises(ValueError, match="not both"):
        TileSettings(mpp=0.5, magnification=20)
    with pytest.raises(ValueError, match="tissue method"):
        TileSettings(tissue_method="unet")


def test_grid_on_the_real_slide(cmu):
    s = open_slide(cmu)
    g = plan_tiles(s, TileSettings(tile_size=256, mpp=0.5, min_tissue=0.25, mpp_tolerance=0))
    res = g.resolution
    w0, h0 = s.dimensions
    assert res.scale == pytest.approx(0.5 / 0.499)
    assert res.read_size == round(256 * 0.5 / 0.499) == 257  # resampled 257 -> 256
    # within the default 2% tolerance 0.499 um/px is read as is
    g_tol = plan_tiles(s, TileSettings(tile_size=256, mpp=0.5, min_tissue=0.25))
    assert g_tol.resolution.read_size == 256 and g_tol.resolution.level0_per_px == 1.0
    assert g_tol.resolution.scale == pytest.approx(0.5 / 0.499)
    # every kept window starts inside the slide and on the stride grid, in patch px and level-0 px alike
    assert ((g.level0_xy >= 0) & (g.level0_xy < [w0, h0])).all()
    assert (g.windows % 256 == 0).all()
    np.testing.assert_array_equal(g.level0_xy, np.ceil(np.round(g.windows * 257 / 256) - 1e-6).astype(np.int64))
    assert 0 < len(g) < g.total_windows == 9 * 12
    assert (g.tissue >= 0.25).all()
    # magnification 20x on a 20x slide is the native resolution
    g20 = plan_tiles(s, TileSettings(tile_size=256, mpp=None, magnification=20))
    assert g20.resolution.scale == 1.0 and g20.resolution.target_mpp == pytest.approx(0.499)
    g10 = plan_tiles(s, TileSettings(tile_size=256, mpp=None, magnification=10))
    assert g10.resolution.scale == 2.0 and g10.resolution.read_size == 512


def test_tissue_mask_covers_tissue_not_glass(cmu):
    """Clearly stained pixels are in the mask; clean glass is not."""
    s = open_slide(cmu)
    thumb = s.thumbnail(1024)
    mask = tissue_mask(thumb)
    hsv = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)
    sat = hsv[..., 1] / 255.0
    stained = sat > 0.25
    glass = (sat < 0.04) & (thumb.min(axis=2) > 225)
    # ignore a 3-px rim around each class (the morphology may move the boundary that much)
    k = np.ones((7, 7), np.uint8)
    stained_core = cv2.erode(stained.astype(np.uint8), k).astype(bool)
    glass_core = cv2.erode(glass.astype(np.uint8), k).astype(bool)
    assert mask[stained_core].mean() > 0.99
    assert mask[glass_core].mean() < 0.01
    assert 0.2 < mask.mean() < 0.6  # the section fills about a third of this field


def test_tissue_mask_keeps_an_all_tissue_field(data_dir):
    """A field that is all tissue (pale and dark) must not be split in two by Otsu."""
    s = open_slide(data_dir / "he_carcinoma_1000.png")
    mask = tissue_mask(s.thumbnail(512))
    assert mask.mean() > 0.9
    assert tissue_mask(s.thumbnail(512), "none").all()


def test_otsu_level_separates_two_modes():
    rng = np.random.default_rng(0)
    low, high = rng.normal(25, 5, 5000).clip(0, 255).astype(np.uint8), rng.normal(150, 12, 5000).clip(0, 255).astype(np.uint8)
    t = otsu_level(np.concatenate([low, high]))
    assert low.max() <= t < high.min()  # the two modes end up on either side
    v = np.concatenate([rng.normal(75, 25, 5000), rng.normal(180, 25, 5000)]).clip(0, 255).astype(np.uint8)
    assert abs(otsu_level(v) - 127) <= 8  # overlapping equal modes: the midpoint
    assert otsu_level(np.full(100, 40, np.uint8)) == 0  # one value: nothing to split


def test_window_fractions_are_the_exact_covered_area():
    m = np.zeros((10, 10), bool)
    m[:5, :5] = True
    boxes = np.array([[0, 0, 5, 5], [0, 0, 10, 10], [5, 5, 10, 10], [-5, -5, 5, 5], [2.5, 0, 7.5, 5],
                      [4.5, 4.5, 5.5, 5.5], [0.25, 0, 1.25, 1], [9, 9, 14, 14]], float)
    expected = [1.0, 0.25, 0.0, 0.25, 0.5, 0.25, 1.0, 0.0]
    np.testing.assert_allclose(window_fractions(m, boxes), expected, rtol=0, atol=1e-6)
    # against brute force on a random mask and random fractional boxes
    rng = np.random.default_rng(0)
    m = rng.random((23, 31)) > 0.6
    fine = np.repeat(np.repeat(m, 8, 0), 8, 1)  # each pixel as 8x8 sub-pixels
    for _ in range(50):
        x0, y0 = rng.integers(-16, 31 * 8, 2)
        x1, y1 = x0 + rng.integers(1, 120), y0 + rng.integers(1, 120)
        sub = np.zeros((y1 - y0, x1 - x0), bool)
        a0, b0 = max(y0, 0), max(x0, 0)
        a1, b1 = min(y1, fine.shape[0]), min(x1, fine.shape[1])
        if a0 < a1 and b0 < b1:
            sub[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = fine[a0:a1, b0:b1]
        got = window_fractions(m, np.array([[x0, y0, x1, y1]], float) / 8)[0]
        assert got == pytest.approx(sub.mean(), abs=1e-6)


def test_windows_are_visited_in_strips():
    order = strip_order(3, 5, width=2)
    rows, cols = np.divmod(order, 5)
    assert sorted(order.tolist()) == list(range(15))  # a permutation
    assert list(zip(rows, cols))[:6] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]  # strip 0 first
    assert list(zip(rows, cols))[-3:] == [(0, 4), (1, 4), (2, 4)]  # the last, narrower strip


def test_small_slide_and_upsampling_are_refused(data_dir):
    with pytest.raises(SlideError, match="smaller than one window"):
        plan_tiles(open_slide(data_dir / "bad" / "tiny_valid.svs"), TileSettings(tile_size=256))
    with pytest.raises(SlideError, match="upsampling"):
        plan_tiles(open_slide(data_dir / "cmu_small_region.svs"), TileSettings(tile_size=64, mpp=0.1))
