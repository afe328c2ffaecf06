"""`histodg tile --compression jpeg`: the `histodg.jpeg` zarr codec and source-tile copying."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import openslide
import pytest
import zarr

from helpers import openslide_rgb
from histodg.slides.inputs import SlideJob
from histodg.slides.opening import open_slide
from histodg.store import PROGRESS_FILE, open_store, store_state
from histodg.store.jpegcodec import NAME, JpegCodec, decode_patch, encode_patch
from histodg.tiling import TileOptions, TileSettings, tile_slide

TILE = 240  # cmu_small_region.svs stores JPEG tiles of 240 px
W, H = 2220, 2967


def _he(n=4, s=64, seed=0):
    """Smooth, H&E-coloured patches (JPEG-friendly, unlike noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:s, 0:s] / s
    out = []
    for _ in range(n):
        a, b = rng.uniform(2, 6, 2)
        base = 0.5 + 0.5 * np.sin(a * np.pi * xx + b * np.pi * yy)
        rgb = np.stack([200 - 60 * base, 120 - 60 * base, 190 - 30 * base], -1)
        out.append(np.clip(rgb, 0, 255).astype(np.uint8))
    return np.stack(out)


def test_codec_round_trips_through_plain_zarr_and_its_metadata(tmp_path):
    img = _he()
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    a = g.create_array("images", shape=img.shape, chunks=(1, 64, 64, 3), shards=(4, 64, 64, 3), dtype="uint8",
                       serializer=JpegCodec(quality=95), compressors=None)
    a[:] = img
    meta = json.loads((tmp_path / "s.zarr" / "images" / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]
    assert inner == [{"name": NAME, "configuration": {"quality": 95}}]
    back = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["images"][:]
    assert back.shape == img.shape and back.dtype == np.uint8
    err = np.abs(back.astype(int) - img).mean()
    assert 0 < err < 2  # lossy, but close at quality 95
    # each chunk is one plain JPEG stream, which any decoder reads
    one = encode_patch(img[1], 95)
    assert one[:2] == b"\xff\xd8" and one[-2:] == b"\xff\xd9"
    np.testing.assert_array_equal(decode_patch(one, (1, 64, 64, 3))[0], back[1])


def test_codec_refuses_bad_quality_and_dtype(tmp_path):
    with pytest.raises(ValueError, match="quality"):
        JpegCodec(quality=0)
    with pytest.raises(ValueError, match="uint8"):
        zarr.create_array(str(tmp_path / "x.zarr"), shape=(2, 8, 8, 3), chunks=(1, 8, 8, 3), dtype="float32",
                          serializer=JpegCodec(), compressors=None)


def test_store_opens_with_plain_zarr_in_a_fresh_process(cli, cmu, tmp_path):
    """The zarr.codecs entry point: user code reads a jpeg store without importing histodg."""
    r = cli("tile", cmu, "-o", tmp_path, "--tile-size", str(TILE), "--mpp", "0.499", "--compression", "jpeg")
    assert r.exit_code == 0, r.output
    code = ("import sys, zarr; g = zarr.open_group(sys.argv[1], mode='r'); a = g['images'][0]; "
            "print(a.shape, a.dtype, type(g['images'].metadata.codecs[0].codecs[0]).__module__)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cmu_small_region.zarr")],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["(240,", "240,", "3)", "uint8", "histodg.store.jpegcodec"]
    info = json.loads(cli("info", tmp_path / "cmu_small_region.zarr", "--json").stdout)[0]
    assert info["compression"] == "jpeg" and info["jpeg_quality"] == 90 and info["source_tiles_copied"] > 40


def test_source_tiles_are_copied_pixel_exact_and_the_rest_encoded(cli, cmu, tmp_path):
    r = cli("tile", cmu, "-o", tmp_path / "j", "--tile-size", str(TILE), "--mpp", "0.499", "--compression", "jpeg",
            "--min-tissue", "0.1")
    assert r.exit_code == 0, r.output
    st = open_store(tmp_path / "j" / "cmu_small_region.zarr")
    a = st.attrs
    assert a.compression == "jpeg" and a.jpeg_quality == 90 and a.source_tiles_not_copied is None
    assert "source_tiles_not_copied" not in zarr.open_group(str(st.path), mode="r").attrs
    coords = st.coords
    inside = (coords[:, 0] + TILE <= W) & (coords[:, 1] + TILE <= H)
    assert 0 < inside.sum() < len(coords)  # both kinds present
    assert a.source_tiles_copied == int(inside.sum())
    osr = openslide.OpenSlide(str(cmu))
    for i, (x, y) in enumerate(coords):
        ref = openslide_rgb(osr, x, y, TILE)
        diff = np.abs(st.images[i].astype(int) - ref)
        if inside[i]:
            assert diff.max() == 0, f"copied tile {i} differs from the slide"
        else:
            assert 0 < diff.mean() < 4, f"edge patch {i}"  # re-encoded, white padding kept
    # the same job with lz4 has the same windows in a store several times bigger
    r = cli("tile", cmu, "-o", tmp_path / "l", "--tile-size", str(TILE), "--mpp", "0.499", "--min-tissue", "0.1",
            "--compression", "lz4")
    assert r.exit_code == 0, r.output
    lz = open_store(tmp_path / "l" / "cmu_small_region.zarr")
    np.testing.assert_array_equal(lz.coords, coords)

    def size(p):
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

    assert size(tmp_path / "l") > 4 * size(tmp_path / "j")


def test_resampled_windows_are_encoded_and_say_why_nothing_was_copied(cmu, tmp_path):
    opts = TileOptions(TileSettings(tile_size=128, mpp=1.0), compression="jpeg", jpeg_quality=95)
    res = tile_slide(SlideJob(cmu, "cmu"), tmp_path, opts)
    assert res.status == "done", res.error
    st = open_store(tmp_path / "cmu.zarr")
    assert st.attrs.source_tiles_copied == 0 and "do not match" in st.attrs.source_tiles_not_copied
    assert st.attrs.jpeg_quality == 95
    meta = json.loads((tmp_path / "cmu.zarr" / "images" / "zarr.json").read_text())
    assert meta["codecs"][0]["configuration"]["codecs"][0]["configuration"] == {"quality": 95}
    ref = TileOptions(TileSettings(tile_size=128, mpp=1.0), compression="lz4")
    assert tile_slide(SlideJob(cmu, "ref"), tmp_path, ref).status == "done"
    lossless = open_store(tmp_path / "ref.zarr")
    assert 0 < np.abs(st.images[:].astype(int) - lossless.images[:]).mean() < 4


def test_corrupt_source_tiles_are_recorded_not_copied(cli, bad_dir, cmu, tmp_path):
    src = bad_dir / "corrupt_tiles.svs"
    args = ["--tile-size", str(TILE), "--mpp", "0.499", "--max-bad-fraction", "1", "--min-tissue", "0.1"]
    r = cli("tile", src, "-o", tmp_path / "j", *args, "--compression", "jpeg")
    assert r.exit_code == 0, r.output
    r = cli("tile", src, "-o", tmp_path / "l", *args)
    assert r.exit_code == 0, r.output
    j, lz = open_store(tmp_path / "j" / "corrupt_tiles.zarr"), open_store(tmp_path / "l" / "corrupt_tiles.zarr")
    bad = {(b["x"], b["y"]) for b in j.attrs.bad_windows}
    assert len(bad) >= 10 and bad == {(b["x"], b["y"]) for b in lz.attrs.bad_windows}
    assert all("corrupt JPEG data" in b["reason"] for b in j.attrs.bad_windows)
    np.testing.assert_array_equal(j.coords, lz.coords)
    assert j.attrs.source_tiles_copied > 10
    good = open_slide(cmu)
    for i in range(len(j)):  # what was stored is the intact slide, copied or encoded
        x, y = (int(v) for v in j.coords[i])
        ref = good.read_region((x, y), 0, (TILE, TILE))
        assert np.abs(j.images[i].astype(int) - ref).mean() < 4


def test_resumed_jpeg_store_counts_copies_across_the_interruption(cmu, tmp_path, monkeypatch, interrupt_after):
    monkeypatch.setattr("histodg.store.writer.SHARD_BYTES", 4 * TILE * TILE * 3)  # 4 patches per shard
    monkeypatch.setattr("histodg.store.writer.COMMIT_SECONDS", 0.0)
    opts = TileOptions(TileSettings(tile_size=TILE, mpp=0.499, min_tissue=0.1), compression="jpeg")
    ref = tile_slide(SlideJob(cmu, "ref"), tmp_path, opts)
    assert ref.status == "done"
    with pytest.raises(KeyboardInterrupt):
        tile_slide(SlideJob(cmu, "cut"), tmp_path, opts, progress=interrupt_after(21))
    assert store_state(tmp_path / "cut.zarr") == "partial"
    assert json.loads((tmp_path / "cut.zarr" / PROGRESS_FILE).read_text())["copied"] > 0
    again = tile_slide(SlideJob(cmu, "cut"), tmp_path, opts)
    assert again.resumed
    a, b = open_store(tmp_path / "ref.zarr"), open_store(tmp_path / "cut.zarr")
    assert a.attrs.source_tiles_copied == b.attrs.source_tiles_copied > 0
    np.testing.assert_array_equal(a.images[:], b.images[:])


def test_auto_compression_is_jpeg_for_lossy_sources_and_lz4_for_lossless_ones(cli, cmu, data_dir, tmp_path):
    import tifffile
    from PIL import Image

    from histodg.slides.opening import lossy_source

    rgb = np.asarray(Image.open(data_dir / "he_carcinoma_1000.png").convert("RGB"))[:300, :300]
    tifffile.imwrite(tmp_path / "lzw.tif", rgb, compression="lzw")
    tifffile.imwrite(tmp_path / "jpeg.tif", rgb, compression="jpeg", tile=(128, 128))
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=90)
    Image.fromarray(rgb).save(tmp_path / "plain.png")
    expected = {cmu: True, tmp_path / "lzw.tif": False, tmp_path / "jpeg.tif": True,
                tmp_path / "photo.jpg": True, tmp_path / "plain.png": False}
    assert {p: lossy_source(p) for p in expected} == expected
    assert TileOptions().compression == "auto" and TileOptions(compression="lz4").for_source(cmu).compression == "lz4"
    r = cli("tile", cmu, "-o", tmp_path / "s", "--tile-size", str(TILE), "--mpp", "0.499")
    assert r.exit_code == 0, r.stderr
    r = cli("tile", tmp_path / "plain.png", "-o", tmp_path / "s", "--tile-size", "128", "--mpp-override", "0.5")
    assert r.exit_code == 0, r.stderr
    assert open_store(tmp_path / "s" / "cmu_small_region.zarr").attrs.compression == "jpeg"
    assert open_store(tmp_path / "s" / "plain.zarr").attrs.compression == "lz4"
    # a rerun with the compression auto chose reuses the store; another one is refused
    r = cli("tile", cmu, "-o", tmp_path / "s", "--tile-size", str(TILE), "--mpp", "0.499", "--compression", "jpeg", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["status"] == "skipped"
    r = cli("tile", cmu, "-o", tmp_path / "s", "--tile-size", str(TILE), "--mpp", "0.499", "--compression", "lz4")
    assert r.exit_code == 1 and "compression 'jpeg' -> 'lz4'" in r.stderr
    # auto keeps the compression of a store made before (an lz4 store from an older default is reused)
    r = cli("tile", cmu, "-o", tmp_path / "old", "--tile-size", str(TILE), "--mpp", "0.499", "--compression", "lz4")
    assert r.exit_code == 0, r.stderr
    r = cli("tile", cmu, "-o", tmp_path / "old", "--tile-size", str(TILE), "--mpp", "0.499", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["status"] == "skipped"
    assert open_store(tmp_path / "old" / "cmu_small_region.zarr").attrs.compression == "lz4"
