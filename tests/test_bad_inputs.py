"""A bad input fails alone, with one line naming it: inputs that cannot even be resolved (a folder
named like a slide, a dangling symlink, a FIFO, a file without read permission, a truncated
slide), manifest rows, annotation files that are JSON but not GeoJSON, outputs that are files,
checkpoints of unknown models."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from helpers import outputs, tiny_checkpoint
from histodg.slides.inputs import resolve_inputs

TILE = ["--tile-size", "256"]


@pytest.fixture
def unusable(tmp_path, cmu):
    """Inputs that fail before any slide is opened, and a truncated slide, beside a good one."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "folder.svs").mkdir()
    (d / "dangling.svs").symlink_to(tmp_path / "nowhere.svs")
    os.mkfifo(d / "fifo.svs")
    (d / "truncated.svs").write_bytes(cmu.read_bytes()[: int(cmu.stat().st_size * 0.6)])
    return d


def _rows(result):
    return {row["name"]: row for row in json.loads(result.stdout)}


def test_inputs_that_cannot_be_resolved_fail_alone_in_tile(cli, cmu, unusable, tmp_path):
    names = ["folder.svs", "dangling.svs", "fifo.svs", "truncated.svs"]
    r = cli("tile", *[unusable / n for n in names], cmu, "-o", tmp_path / "out", *TILE, "--json")
    assert r.exit_code == 1
    rows = _rows(r)
    assert rows["cmu_small_region"]["status"] == "done"
    expect = {"folder": "folder holds no slides", "dangling": "a dangling symlink (to ", "fifo": "not a regular file",
              "truncated": "truncated or damaged"}
    for name, why in expect.items():
        assert rows[name]["status"] == "failed" and why in rows[name]["error"], rows[name]
        assert rows[name]["error"].startswith(str(unusable / f"{name}.svs"))
        assert f"error: {unusable / name}.svs" in r.stderr
    assert "Traceback" not in r.output


def test_a_folder_names_its_unusable_entries_instead_of_skipping_them(cmu, unusable, tmp_path):
    shutil.copy(cmu, unusable / "good.svs")
    jobs = {j.name: j for j in resolve_inputs([unusable])}
    assert jobs["good"].problem is None
    assert "dangling symlink" in jobs["dangling"].problem and "not a regular file" in jobs["fifo"].problem
    assert "folder" not in jobs  # sub-folders of an input folder are not inputs


def test_a_file_without_read_permission_fails_alone(cmu, tmp_path, monkeypatch):
    locked = tmp_path / "locked.svs"
    shutil.copy(cmu, locked)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(locked) else real(p, mode, **k))
    jobs = {j.name: j for j in resolve_inputs([locked, cmu])}  # as root, chmod 000 would still read
    assert jobs["locked"].problem == "cannot be read (permission denied)" and jobs["cmu_small_region"].problem is None


def test_bad_manifest_rows_fail_alone(cli, cmu, tmp_path):
    m = tmp_path / "list.csv"
    m.write_text(f"path,organ\n{cmu},colon\n{cmu},colon,oops\n,colon\n")
    r = cli("tile", m, "-o", tmp_path / "out", *TILE, "--json")
    assert r.exit_code == 1
    rows = _rows(r)
    assert rows["cmu_small_region"]["status"] == "done"
    assert "line 3: 1 more field(s) than the header (an unquoted comma?)" in rows["list-line3"]["error"]
    assert "line 4: empty path" in rows["list-line4"]["error"]
    assert all(row["error"].startswith(str(m)) for n, row in rows.items() if n.startswith("list"))


POLY = {"type": "Polygon", "coordinates": [[[0, 0], [900, 0], [900, 900], [0, 0]]]}


@pytest.mark.parametrize("feature, why", [
    ({"type": "Feature", "properties": {}, "geometry": {"type": "Polygon"}}, "feature 0: Polygon without coordinates"),
    ({"type": "Feature", "properties": {}, "geometry": "POLYGON((0 0, 1 0, 1 1, 0 0))"}, "geometry must be an object, not str"),
    ({"type": "Feature", "properties": [1, 2], "geometry": POLY}, "properties must be an object, not list"),
    ({"type": "Feature", "properties": {}, "geometry": {"type": "GeometryCollection", "geometries": "x"}},
     "malformed coordinates"),
])
def test_json_that_is_not_valid_geojson_is_one_line(cli, cmu, tmp_path, feature, why):
    ann = tmp_path / "a.geojson"
    ann.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    r = cli("tile", cmu, "-o", tmp_path / "out", *TILE, "--annotations", ann, "--json")
    assert r.exit_code == 1 and "Traceback" not in r.output
    err = _rows(r)["cmu_small_region"]["error"]
    assert err.startswith(str(ann)) and why in err


def test_a_classification_of_the_wrong_type_is_unclassified_not_a_crash(cli, cmu, tmp_path):
    ann = tmp_path / "a.geojson"
    ann.write_text(json.dumps({"type": "Feature", "properties": {"classification": ["Tumor"]}, "geometry": POLY}))
    r = cli("tile", cmu, "-o", tmp_path / "out", *TILE, "--annotations", ann, "--label", "tumor=1", "--json")
    assert r.exit_code == 0, r.output  # no class name: not a tumour polygon, counted as skipped
    attrs = json.loads((tmp_path / "out" / "cmu_small_region.zarr" / "zarr.json").read_text())["attributes"]
    assert attrs["annotations_skipped"] == {"(unclassified)": 1}


@pytest.mark.parametrize("command", ["tile", "predict", "train", "synth"])
def test_an_output_that_is_a_file_is_a_usage_error(cli, cmu, tmp_path, command):
    f = tmp_path / "taken"
    f.write_text("")
    args = {"tile": ["tile", cmu, "-o", f], "predict": ["predict", tmp_path / "ck.pt", cmu, "-o", f],
            "train": ["train", tmp_path, "-o", f], "synth": ["synth", f]}[command]
    r = cli(*args)
    assert r.exit_code == 2 and f"'{f}' is a file" in r.stderr


def test_a_checkpoint_of_an_unknown_model_names_the_file(cli, cmu, tmp_path):
    ck = tiny_checkpoint(tmp_path / "ck.pt")
    payload = torch.load(ck, weights_only=False)
    payload["model_config"]["arch"] = "nonesuch"
    torch.save(payload, ck)
    r = cli("predict", ck, cmu, "-o", tmp_path / "p")
    assert r.exit_code == 1
    assert r.stderr.strip() == (f"error: {ck}: cannot rebuild the model: nonesuch: unknown architecture (choose from "
                                "DeepLabV3Plus, FPN, Linknet, MAnet, PAN, PSPNet, Segformer, UPerNet, Unet, UnetPlusPlus)")


def test_inputs_that_cannot_be_resolved_fail_alone_in_predict(cli, cmu, unusable, tmp_path):
    ck = tiny_checkpoint(tmp_path / "ck.pt")
    r = cli("predict", ck, unusable / "dangling.svs", unusable / "fifo.svs", unusable / "truncated.svs", cmu,
            "-o", tmp_path / "p", "--json")
    assert r.exit_code == 1
    rows = _rows(r)
    assert rows["cmu_small_region"]["status"] == "done"
    assert [rows[n]["status"] for n in ("dangling", "fifo", "truncated")] == ["failed"] * 3
    assert outputs(tmp_path / "p") == ["cmu_small_region"]  # nothing for the failed ones


def _png_header_bomb(path, width, height):
    """A PNG of a few hundred bytes whose header declares width x height RGB pixels."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1000)))
                     + chunk(b"IEND", b""))
    return path


def test_a_png_that_declares_a_huge_size_is_refused_before_decoding(cli, cmu, tmp_path):
    bomb = _png_header_bomb(tmp_path / "bomb.png", 100_000, 100_000)
    r = cli("tile", bomb, cmu, "-o", tmp_path / "out", *TILE, "--json")
    assert r.exit_code == 1
    rows = _rows(r)
    assert rows["cmu_small_region"]["status"] == "done"
    err = rows["bomb"]["error"]
    assert err.startswith(f"{bomb}: 100000 x 100000 px plain image (10000 Mpx") and "tiled pyramidal TIFF" in err


def test_the_image_size_limit_is_settable_and_covers_mask_images(cli, tmp_path, monkeypatch):
    from PIL import Image

    img, mask = tmp_path / "a.png", tmp_path / "a_mask.png"
    Image.fromarray(np.full((300, 400, 3), 200, np.uint8)).save(img)
    Image.fromarray(np.zeros((300, 400), np.uint8)).save(mask)
    args = ["tile", img, "-o", tmp_path / "out", "--mpp", "1", "--mpp-override", "1", "--tile-size", "64", "--min-tissue", "0",
            "--json"]
    monkeypatch.setenv("HISTODG_MAX_IMAGE_MPX", "0.1")  # 400 x 300 = 0.12 Mpx: over
    r = cli(*args)
    assert r.exit_code == 1 and "400 x 300 px plain image" in _rows(r)["a"]["error"]
    monkeypatch.setenv("HISTODG_MAX_IMAGE_MPX", "1")
    assert cli(*args).exit_code == 0
    from histodg.slides.annotation_files import read_label_mask
    from histodg.slides.annotations import AnnotationError

    monkeypatch.setenv("HISTODG_MAX_IMAGE_MPX", "0.1")
    with pytest.raises(AnnotationError, match="400 x 300 px mask image"):
        read_label_mask(mask)
