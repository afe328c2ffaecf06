"""Slide formats histodg is tested on (issue 29 §5): the real SVS, and the same slide made into DICOM
WSI (wsidicomizer: lossless JPEG 2000 and JPEG q90), an OME-TIFF and a generic tiled TIFF
(tifffile, deflate). `info`, `tile` and `predict` read each and give the SVS's windows:
pixel-equal where the conversion is lossless, within the JPEG error otherwise."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from helpers import tiny_checkpoint
from histodg.store import open_store

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
TILE = ["--mpp", "2.0", "--tile-size", "64", "--compression", "lz4", "--qc", "off", "--organ", "skin"]


def to_dicom(svs: Path, out: Path, encoding) -> Path:
    """The slide as a DICOM WSI folder (wsidicomizer, read through tiffslide: no libjpeg-turbo needed)."""
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.sources import TiffSlideSource

    out.mkdir(parents=True)
    WsiDicomizer.convert(svs, out, preferred_source=TiffSlideSource, workers=1, include_label=False,
                         include_overview=False, include_thumbnail=False, tile_size=256, encoding=encoding)
    return out


def to_tiff(svs: Path, path: Path, ome: bool) -> Path:
    """The slide (one level, as the SVS has) as a tiled, deflate-compressed TIFF: an OME-TIFF with its
    pixel size in the OME-XML, or a generic TIFF with the resolution tags alone."""
    import tifffile

    from histodg.slides.opening import open_slide

    with open_slide(svs) as s:
        assert s.level_count == 1  # the same levels, so that the same level is read
        rgb, mpp = s.read_region((0, 0), 0, s.dimensions), s.mpp
    path.parent.mkdir(parents=True)
    meta = {"PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm",
            "axes": "YXS"} if ome else None
    tifffile.imwrite(path, rgb, ome=ome, tile=(256, 256), compression="zlib", photometric="rgb", metadata=meta,
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return path


@pytest.fixture(scope="module")
def slides(cmu, tmp_path_factory):
    from wsidicom.codec import Jpeg2kSettings, JpegSettings

    root = tmp_path_factory.mktemp("formats")
    return {"svs": cmu,
            "dicom": to_dicom(cmu, root / "dicom" / "cmu_small_region", Jpeg2kSettings(levels=[0])),  # lossless
            "dicom-jpeg": to_dicom(cmu, root / "dicom-jpeg" / "cmu_small_region", JpegSettings(quality=90)),
            "ome-tiff": to_tiff(cmu, root / "ome" / "cmu_small_region.ome.tiff", ome=True),
            "tiff": to_tiff(cmu, root / "tiff" / "cmu_small_region.tif", ome=False)}


def test_info_reads_every_format_with_the_svs_geometry(slides, cli):
    info = {}
    for name, path in slides.items():
        r = cli("info", path, "--json")
        assert r.exit_code == 0, (name, r.output)
        info[name] = json.loads(r.stdout)[0]
    for name, d in info.items():
        assert d["dimensions"] == [2220, 2967] and d["mpp"] == pytest.approx(0.499, abs=1e-3), name
    assert info["dicom"]["vendor"] == "dicom" and info["dicom"]["backend"] == "openslide"


@pytest.fixture(scope="module")
def stores(slides, tmp_path_factory):
    from click.testing import CliRunner

    from histodg.cli import main

    root = tmp_path_factory.mktemp("stores")
    for name, path in slides.items():
        r = CliRunner().invoke(main, ["tile", str(path), "-o", str(root / name), *TILE])
        assert r.exit_code == 0, (name, r.output)
    return {name: open_store(next((root / name).glob("*.zarr"))) for name in slides}


@pytest.mark.parametrize("name", ["dicom", "ome-tiff", "tiff"])
def test_a_lossless_conversion_tiles_to_the_svs_patches(stores, name):
    svs, other = stores["svs"], stores[name]
    assert len(svs) > 20 and np.array_equal(np.asarray(other.coords), np.asarray(svs.coords))
    assert np.array_equal(np.asarray(other.images[:]), np.asarray(svs.images[:]))


def test_a_jpeg_dicom_tiles_to_the_svs_patches_within_the_jpeg_error(stores):
    svs, other = stores["svs"], stores["dicom-jpeg"]
    same = {tuple(c): i for i, c in enumerate(np.asarray(svs.coords))}
    pairs = [(same[tuple(c)], j) for j, c in enumerate(np.asarray(other.coords)) if tuple(c) in same]
    assert len(pairs) >= 0.95 * len(svs)  # the tissue found is the same but for a window at its edge
    a = np.asarray(svs.images[:])[[i for i, _ in pairs]].astype(int)
    b = np.asarray(other.images[:])[[j for _, j in pairs]].astype(int)
    diff = np.abs(a - b)
    assert 0 < diff.mean() < 2.0 and np.percentile(diff, 99) <= 8  # resampled from q90 JPEG: about 1 grey level


def test_predict_on_a_lossless_dicom_is_the_svs_prediction(slides, cli, tmp_path):
    ck = tiny_checkpoint(tmp_path / "ck.pt", mpp=4.0, tile=64)
    probs = {}
    for name in ("svs", "dicom"):
        r = cli("predict", ck, slides[name], "-o", tmp_path / name, "--tta", "none", "--qc", "off")
        assert r.exit_code == 0, (name, r.output)
        probs[name] = zarr.open_array(str(tmp_path / name / "cmu_small_region" / "prob.zarr"), mode="r")[:]
    assert probs["svs"].any() and np.array_equal(probs["dicom"], probs["svs"])
