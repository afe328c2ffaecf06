"""The acquisition physics real scanners differ in besides colour (issue 31): defocus across the
camera field, astigmatism, a wrong stated resolution, stitching seams; and `scanner-f`, the
opt-in held-out scanner that differs in them rather than in stain; `scanner-j`, one that differs in
its codec alone (JPEG 2000)."""
from __future__ import annotations

import csv
from dataclasses import replace

import cv2
import numpy as np
import pytest

from histodg.synth import DatasetSpec, make_dataset
from histodg.synth.profiles import ORGANS, SCANNERS
from histodg.synth.scanner import scan
from histodg.synth.tissue import render_case

PLAIN = replace(SCANNERS["scanner-a"], vignetting=0.0, gradient=0.0, noise=0.0, blur_um=0.3, field_um=256)


def _texture(size=512, seed=0):
    """Stain concentrations with detail at every scale: what blur takes away is measurable."""
    rng = np.random.default_rng(seed)
    c = rng.random((size, size)).astype(np.float32) * 1.5
    return c, c[::-1].copy()


def _detail(rgb: np.ndarray) -> np.ndarray:
    """Per pixel: the squared Laplacian of the grey image (high-frequency energy)."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return cv2.Laplacian(grey, cv2.CV_32F) ** 2


def test_defocus_blurs_the_corners_of_each_camera_field_more_than_its_centre():
    c_h, c_e = _texture()
    field = int(PLAIN.field_um / PLAIN.mpp)  # 512 px: one field
    yy, xx = np.mgrid[:512, :512]
    r = np.hypot(yy % field - field / 2, xx % field - field / 2) / (field / 2)
    centre, corners = r < 0.3, r > 1.1
    flat = _detail(scan(np.random.default_rng(0), c_h, c_e, PLAIN))
    curved = _detail(scan(np.random.default_rng(0), c_h, c_e, replace(PLAIN, defocus_um=0.8)))
    assert flat[corners].mean() / flat[centre].mean() == pytest.approx(1, abs=0.15)  # without: the same everywhere
    assert curved[corners].mean() < 0.5 * curved[centre].mean()


def test_astigmatism_blurs_one_axis_more_than_the_other():
    c_h, c_e = _texture()
    rgb = scan(np.random.default_rng(0), c_h, c_e, replace(PLAIN, blur_um=0.6, astigmatism=0.4))
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    across, down = np.abs(np.diff(grey, axis=1)).mean(), np.abs(np.diff(grey, axis=0)).mean()
    assert across < 0.8 * down  # sigma x (1 + a) across, x (1 - a) down


def test_seams_make_each_camera_field_brighter_or_darker_than_its_neighbours():
    c = np.zeros((512, 512), np.float32)  # empty glass: only the illumination shows
    field = 128
    profile = replace(PLAIN, field_um=field * PLAIN.mpp, blur_um=0.0)
    plain = scan(np.random.default_rng(0), c, c, profile).astype(float)
    seamed = scan(np.random.default_rng(0), c, c, replace(profile, seams=0.05)).astype(float)
    means = [seamed[y:y + field, x:x + field].mean() for y in range(0, 512, field) for x in range(0, 512, field)]
    base = [plain[y:y + field, x:x + field].mean() for y in range(0, 512, field) for x in range(0, 512, field)]
    assert np.ptp(base) < 1.0 and np.ptp(means) > 4.0


def test_a_wrong_stated_resolution_draws_the_tissue_at_the_true_one():
    right = render_case(ORGANS["colon"], PLAIN, 500, 500, [1, 2, 3])
    wrong = render_case(ORGANS["colon"], replace(PLAIN, mpp_error=0.15), 500, 500, [1, 2, 3])
    assert wrong.mpp == right.mpp == PLAIN.mpp  # what the file will say
    assert wrong.rgb.shape[0] == round(500 / (PLAIN.mpp * 1.15)) and right.rgb.shape[0] == round(500 / PLAIN.mpp)
    # the same section in fewer pixels: its tissue covers 1/1.15^2 of the pixels
    assert wrong.label.astype(bool).sum() / right.label.astype(bool).sum() == pytest.approx(1 / 1.15**2, rel=0.1)


def test_scanner_f_differs_in_optics_and_resolution_not_in_stain():
    f, a = SCANNERS["scanner-f"], SCANNERS["scanner-a"]
    assert (f.stain_h, f.stain_e, f.white) == (a.stain_h, a.stain_e, a.white)
    assert f.defocus_um > 0 and f.astigmatism > 0 and f.mpp_error != 0 and f.seams > 0 and f.blur_um > a.blur_um
    for s in SCANNERS.values():  # the built-in scanners keep their pixels: none of the new physics
        if s.name != "scanner-f":
            assert (s.defocus_um, s.astigmatism, s.mpp_error, s.seams) == (0.0, 0.0, 0.0, 0.0)
        if s.name != "scanner-j":
            assert s.codec == ("jpeg", {"level": s.jpeg_quality})


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(float) - b.astype(float)) ** 2)))


def test_scanner_j_stores_jpeg_2000_tiles_at_its_psnr_and_tile_reads_them(tmp_path, cli):
    import tifffile

    from histodg.store import open_store
    from histodg.synth.dataset import codec_roundtrip

    j, a = SCANNERS["scanner-j"], SCANNERS["scanner-a"]
    assert replace(j, name="scanner-a", jpeg2000_psnr=0.0) == a  # scanner-a in all but its codec
    with pytest.raises(ValueError, match="JPEG 2000 PSNR"):
        replace(j, jpeg2000_psnr=10.0)
    rgb = render_case(ORGANS["colon"], j, 400, 400, [1, 2, 3]).rgb
    assert _psnr(rgb, codec_roundtrip(rgb, j.codec)) == pytest.approx(33, abs=1.5)  # OpenJPEG's target
    assert _psnr(rgb, codec_roundtrip(rgb, a.codec)) > 35  # scanner-a's JPEG q90 keeps more

    manifest = make_dataset(tmp_path / "x", DatasetSpec(cases=1, size_um=600, formats=("wsi",), extra_scanners=("scanner-j",)))
    with open(manifest, newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["scanner"] == "scanner-j")
    slide = manifest.parent / row["path"]
    with tifffile.TiffFile(slide) as tif:
        assert int(tif.pages[0].compression) == 34712  # JPEG 2000 in TIFF
    r = cli("tile", slide, "-o", tmp_path / "stores", "--mpp", "1.0", "--tile-size", "128", "--min-tissue", "0.5")
    assert r.exit_code == 0, r.output
    (store_path,) = [p for p in (tmp_path / "stores").iterdir() if p.suffix == ".zarr"]
    store = open_store(store_path)
    assert len(store) > 0 and store.attrs.compression == "jpeg"  # JPEG 2000 is lossy: auto stores JPEG


def test_synth_adds_scanner_f_on_request_and_refuses_an_unknown_name(tmp_path, cli):
    manifest = make_dataset(tmp_path / "x", DatasetSpec(cases=1, size_um=400, formats=("cosas",), extra_scanners=("scanner-f",)))
    with open(manifest, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["scanner"] == "scanner-f"]
    assert len(rows) == 1 and rows[0]["split"] == "heldout" and float(rows[0]["mpp"]) == 0.5
    r = cli("synth", tmp_path / "y", "--extra-scanner", "scanner-z")
    assert r.exit_code == 2 and "extra scanner 'scanner-z': give a seed" in r.output and "scanner-f" in r.output
    assert not (tmp_path / "y").exists()
