"""Slide backends on the real slides: geometry, pixels, metadata, errors."""
from __future__ import annotations

import numpy as np
import openslide
import pytest
from PIL import Image

from histodg import SlideError
from histodg.slides.opening import open_slide
from histodg.slides.tiffread import jpeg_scan_error


def test_fast_reader_matches_openslide_pixel_for_pixel(cmu):
    fast, ref = open_slide(cmu), open_slide(cmu, "openslide")
    assert fast.backend == "tiffslide" and ref.backend == "openslide"
    assert fast.dimensions == ref.dimensions == (2220, 2967)
    assert fast.mpp == pytest.approx(0.499) and ref.mpp == pytest.approx(0.499)
    assert fast.objective_power == 20 and fast.vendor == "aperio"
    assert "thumbnail" in fast.associated_images
    # regions inside, straddling tiles, and running off every edge (padded white)
    for xy, size in [((0, 0), (512, 512)), ((1000, 1500), (700, 300)), ((2000, 2800), (512, 512)), ((-10, -20), (64, 64))]:
        a = fast.read_region(xy, 0, size)
        b = ref.read_region(xy, 0, size)
        assert a.shape == (size[1], size[0], 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
    off = fast.read_region((2200, 2950), 0, (64, 64))
    assert (off[30:, :] == 255).all() and (off[:, 30:] == 255).all()


def test_tile_cache_decodes_each_tile_once(cmu):
    s = open_slide(cmu)
    s.read_region((0, 0), 0, (480, 480))  # 2x2 stored tiles of 240
    assert s.reader.decoded_tiles == 4
    s.read_region((100, 100), 0, (300, 300))  # the same four tiles
    assert s.reader.decoded_tiles == 4


def test_whole_tile_reads_can_bypass_the_cache(cmu):
    """Windows that are whole tiles, read once each (tiling without overlap), need no cache."""
    s = open_slide(cmu)
    cached = s.read_region((240, 480), 0, (240, 240)).copy()
    assert s.reader.decoded_tiles == 1 and s.reader.cached_tiles == 1
    s2 = open_slide(cmu)
    s2.reader.cache_whole_tiles = False
    np.testing.assert_array_equal(s2.read_region((240, 480), 0, (240, 240)), cached)
    assert s2.reader.decoded_tiles == 1 and s2.reader.cached_tiles == 0  # decoded, not kept
    s2.read_region((240, 480), 0, (240, 240))
    assert s2.reader.decoded_tiles == 2
    s2.read_region((0, 0), 0, (480, 480))  # not whole tiles: cached as before
    assert s2.reader.cached_tiles == 4


def test_thumbnail_is_an_exact_box_filter_of_the_slide(cmu):
    s = open_slide(cmu)
    thumb = s.thumbnail_checked(512)
    th, f = thumb.rgb, int(thumb.downsample)
    assert max(th.shape[:2]) <= 512 and thumb.readable.all() and f == 6
    full = s.read_region((0, 0), 0, s.dimensions).astype(np.float64)
    h, w = full.shape[0] // f * f, full.shape[1] // f * f
    ref = full[:h, :w].reshape(h // f, f, w // f, f, 3).mean((1, 3))
    assert np.abs(th[: h // f, : w // f] - ref).max() <= 0.5 + 1e-9  # rounding only


def test_jpeg_check_finds_exactly_the_tiles_openslide_rejects(data_dir):
    """libjpeg only warns on a marker inside the scan; the check turns that into an error."""
    bad = open_slide(data_dir / "bad" / "corrupt_tiles.svs")
    good = open_slide(data_dir / "cmu_small_region.svs")
    lv_bad, lv_good = bad.reader.levels[0], good.reader.levels[0]
    flagged_bad = [i for i in range(len(lv_bad.offsets)) if jpeg_scan_error(bad.reader.stored_bytes(0, i))]
    flagged_good = [i for i in range(len(lv_good.offsets)) if jpeg_scan_error(good.reader.stored_bytes(0, i))]
    assert flagged_good == []
    osr = openslide.OpenSlide(str(data_dir / "bad" / "corrupt_tiles.svs"))
    rejected = []
    for i in range(len(lv_bad.offsets)):
        ty, tx = divmod(i, lv_bad.nx)
        try:
            osr.read_region((tx * 240, ty * 240), 0, (240, 240))
        except openslide.OpenSlideError:
            rejected.append(i)
            osr = openslide.OpenSlide(str(data_dir / "bad" / "corrupt_tiles.svs"))  # errors are sticky
    assert flagged_bad == rejected and len(rejected) == 19


def test_openslide_backend_survives_sticky_errors(data_dir):
    s = open_slide(data_dir / "bad" / "corrupt_tiles.svs", "openslide")
    with pytest.raises(SlideError, match="cannot read region"):
        s.read_region((3 * 240, 0), 0, (240, 240))  # a corrupt tile
    good = s.read_region((0, 0), 0, (240, 240))  # the handle was replaced: this still works
    ref = open_slide(data_dir / "cmu_small_region.svs").read_region((0, 0), 0, (240, 240))
    np.testing.assert_array_equal(good, ref)
    s.close()


@pytest.mark.parametrize(
    "name, message",
    [
        ("empty.svs", "empty file"),
        ("not_a_slide.svs", "not a slide or image"),
        ("unopenable.tiff", "unsupported TIFF compression 52479"),
    ],
)
def test_unopenable_files_raise_one_clear_error(bad_dir, name, message):
    with pytest.raises(SlideError) as info:
        open_slide(bad_dir / name)
    assert message in str(info.value) and name in str(info.value)
    assert "\n" not in str(info.value)


def test_unreadable_tile_raises_on_read(bad_dir):
    s = open_slide(bad_dir / "unreadable.svs")
    with pytest.raises(SlideError, match="cannot decode tile"):
        s.read_region((0, 0), 0, (16, 16))
    thumb = s.thumbnail_checked(64)
    assert not thumb.readable.any() and "corrupt JPEG data" in thumb.first_error


def test_missing_paths_and_folders(tmp_path):
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SlideError, match="directory"):
        open_slide(tmp_path)
    with pytest.raises(SlideError, match="unknown backend"):
        open_slide(tmp_path, backend="vips")


def test_plain_png_needs_an_mpp(data_dir, tmp_path):
    s = open_slide(data_dir / "he_carcinoma_1000.png")
    assert s.backend == "image" and s.dimensions == (1000, 1000) and s.mpp is None
    with pytest.raises(SlideError, match="--mpp-override"):
        s.require_mpp()
    s2 = open_slide(data_dir / "he_carcinoma_1000.png", mpp=0.25)
    assert s2.mpp == 0.25 and s2.mpp_source == "override"
    with pytest.raises(SlideError, match="outside"):
        open_slide(data_dir / "he_carcinoma_1000.png", mpp=500)


def test_plain_image_metadata_and_alpha(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :15, 3] = 255  # left half opaque red, right half transparent
    Image.fromarray(rgba).save(tmp_path / "a.png", dpi=(50800, 50800))  # 0.5 um/px
    s = open_slide(tmp_path / "a.png")
    assert s.mpp == pytest.approx(0.5, rel=1e-3)
    px = s.read_region((0, 0), 0, (30, 20))
    assert tuple(px[5, 5]) == (200, 0, 0) and tuple(px[5, 25]) == (255, 255, 255)
    Image.fromarray(rgba[..., :3]).save(tmp_path / "b.png", dpi=(72, 72))  # screen dpi says nothing
    assert open_slide(tmp_path / "b.png").mpp is None


def test_box_reduce_handles_blocks_thinner_than_the_factor():
    from histodg.slides.base import box_reduce

    assert box_reduce(np.zeros((1, 10, 3), np.uint8), 2).shape == (1, 5, 3)
    a = np.arange(36, dtype=np.uint8).reshape(6, 6, 1).repeat(3, 2)
    np.testing.assert_array_equal(box_reduce(a, 2)[..., 0], [[4, 6, 8], [16, 18, 20], [28, 30, 32]])  # means rounded
    edge = box_reduce(np.arange(5, dtype=np.uint8).reshape(1, 5, 1).repeat(3, 2), 2)[0, :, 0]
    np.testing.assert_array_equal(edge, [1, 3, 4])  # (0+1)/2, (2+3)/2, 4 alone


@pytest.mark.parametrize("f", [2, 3, 4, 8])
def test_box_reduce_is_the_cell_mean_within_rounding(f):
    from histodg.slides.base import box_mean, box_reduce

    img = np.random.default_rng(f).integers(0, 256, (37, 50, 3), dtype=np.uint8)  # partial cells both ways
    fast, exact = box_reduce(img, f), box_mean(img, f)
    assert fast.shape == exact.shape == (-(-37 // f), -(-50 // f), 3)
    assert np.abs(fast.astype(int) - exact).max() <= 1
    h, w = 37 // f, 50 // f  # the partial strips are exact
    np.testing.assert_array_equal(fast[h:], exact[h:])
    np.testing.assert_array_equal(fast[:, w:], exact[:, w:])
