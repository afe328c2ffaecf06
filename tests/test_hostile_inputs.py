"""Inputs that used to slip through: JSON nested thousands of levels deep, an empty `*.zarr`
folder given by name, an input without read permission, a file name that is not UTF-8."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers import make_store, tiny_checkpoint, tissue_field
from histodg.inference.done import read_done
from histodg.store import find_stores
from histodg.summary import read_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
IMAGE = ["--mpp", "1", "--mpp-override", "1", "--tile-size", "64", "--min-tissue", "0"]
DEEP = "[" * 10_000 + "]" * 10_000


def _png(path):
    Image.fromarray(tissue_field(192, 256)).save(path)
    return path


def _rows(out) -> dict:
    return {r["name"]: r for r in json.loads((out / "summary.json").read_text())}


# -- 1. JSON nested too deeply ----------------------------------------------------------------------
def test_annotations_nested_thousands_deep_fail_their_slide_alone(cli, tmp_path):
    anns = tmp_path / "anns"
    anns.mkdir()
    (anns / "a.geojson").write_text('{"type": "FeatureCollection", "features": ' + DEEP + "}")
    (anns / "b.geojson").write_text('{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", '
                                    '"coordinates": ' + DEEP + "}}")
    images = [_png(tmp_path / f"{n}.png") for n in "abc"]
    r = cli("tile", *images, "-o", tmp_path / "out", *IMAGE, "--annotations", anns)
    assert r.exit_code == 1 and "Traceback" not in r.output
    rows = _rows(tmp_path / "out")
    assert rows["c"]["status"] == "done"  # the rest of the batch ran
    for n in "ab":
        assert rows[n]["status"] == "failed"
        assert rows[n]["error"] == f"{anns / n}.geojson: not readable JSON (nested too deeply)"
        assert f"error: {anns / n}.geojson: not readable JSON" in r.stderr


def test_json_files_histodg_reads_back_may_be_nested_too_deeply(tmp_path):
    from histodg.files import parse_json

    with pytest.raises(ValueError, match="nested too deeply"):
        parse_json(DEEP)
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "done.json").write_text(DEEP)
    assert read_done(pred) is None  # an unfinished prediction: redone, not a crash
    (tmp_path / "summary.json").write_text(DEEP)
    assert read_rows(tmp_path) == []


# -- 2. an empty *.zarr folder given by name -----------------------------------------------------------
def test_an_empty_zarr_folder_given_to_evaluate_is_reported_and_the_rest_scored(cli, tmp_path):
    good = make_store(tmp_path / "stores" / "good.zarr", n=4)
    empty = tmp_path / "stores" / "empty.zarr"
    empty.mkdir()
    ck = tiny_checkpoint(tmp_path / "ck.pt", mpp=1.0, head_logit=10.0)
    r = cli("evaluate", ck, good, empty, "--json")
    assert r.exit_code == 1
    assert [x["name"] for x in json.loads(r.stdout)["images"]] == ["good"]
    assert f"{empty}: not a patch store (no zarr.json in it)" in r.stderr
    assert find_stores([tmp_path / "stores"]) == [good]  # a folder scan passes over it, as before


def test_an_empty_zarr_folder_given_to_train_is_refused_in_one_line(cli, tmp_path):
    good = make_store(tmp_path / "good.zarr", n=4, organ="colon")
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    r = cli("train", good, empty, "-o", tmp_path / "run", "--arch", "unet", "--encoder", "resnet18",
            "--encoder-weights", "none", "--steps", "1", "--workers", "0")
    assert r.exit_code == 1
    assert r.stderr.strip() == f"error: {empty}: not a patch store (no zarr.json in it)"
    assert not (tmp_path / "run" / "last.pt").exists()


# -- 3. an input without read permission ---------------------------------------------------------------
@pytest.mark.parametrize("command", ["tile", "predict"])
def test_an_input_without_read_permission_is_its_own_failed_row(cli, tmp_path, monkeypatch, command):
    """A real chmod 000 where it denies (not root; or root without its override:
    `setpriv --bounding-set=-dac_override,-dac_read_search python -m pytest ...`), else os.access denies it."""
    locked, good = _png(tmp_path / "locked.png"), _png(tmp_path / "good.png")
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads it anyway: deny it as the kernel denies a user (Click and histodg ask os.access)
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(locked) else real(p, mode, **k))
    out = tmp_path / "out"
    if command == "tile":
        r = cli("tile", locked, good, "-o", out, *IMAGE)
    else:
        r = cli("predict", tiny_checkpoint(tmp_path / "ck.pt", mpp=1.0), locked, good, "-o", out, "--mpp-override", "1")
    assert r.exit_code == 1, r.output  # not 2: no usage error, the batch ran
    rows = _rows(out)
    assert rows["good"]["status"] == "done"
    assert rows["locked"]["status"] == "failed"
    assert rows["locked"]["error"] == f"{locked}: cannot be read (permission denied)"


# -- 4. a file name that is not UTF-8 ------------------------------------------------------------------
@pytest.fixture
def latin1(tmp_path):
    """An image and a file that is not one, both under latin-1 names (bytes that are not UTF-8)."""
    d = tmp_path / "in"
    d.mkdir()
    image = _png(d / os.fsdecode(b"slide_\xe9.png"))
    junk = d / os.fsdecode(b"junk_\xe9.png")
    junk.write_bytes(b"not an image")
    return image, junk


def _summary_names_them(out, image, junk):
    rows = _rows(out)  # JSON keeps the name as \udce9: it reads back as the same str
    assert rows["slide"]["status"] == "done" and rows["slide"]["source"] == str(image)
    assert rows["junk"]["status"] == "failed" and rows["junk"]["error"].startswith(f"{junk}: ")
    csv = (out / "summary.csv").read_bytes()  # the name's own bytes
    assert os.fsencode(image) in csv and os.fsencode(junk) in csv


def test_a_name_that_is_not_utf8_is_kept_in_tile_outputs(cli, tmp_path, latin1):
    image, junk = latin1
    r = cli("tile", image, junk, "-o", tmp_path / "out", *IMAGE)  # a UnicodeEncodeError would raise here
    assert r.exit_code == 1 and "Traceback" not in r.output
    _summary_names_them(tmp_path / "out", image, junk)
    assert os.fsencode(junk) in r.stdout_bytes + r.stderr_bytes  # printed as its bytes, as `ls` does


def test_a_name_that_is_not_utf8_is_kept_in_predict_outputs(cli, tmp_path, latin1):
    image, junk = latin1
    out = tmp_path / "out"
    r = cli("predict", tiny_checkpoint(tmp_path / "ck.pt", mpp=1.0), image, junk, "-o", out, "--mpp-override", "1")
    assert r.exit_code == 1 and "Traceback" not in r.output
    _summary_names_them(out, image, junk)
    assert os.fsencode(junk) in (out / "report.html").read_bytes()
    assert read_done(out / "slide")["source"]["path"] == str(image.resolve())


def test_a_name_that_is_not_utf8_prints_on_a_strict_utf8_console(tmp_path, latin1):
    """A UTF-8 locale (en_US.UTF-8) makes stdout strict; PYTHONIOENCODING=utf-8 does the same here."""
    image, junk = latin1
    env = {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
           "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "histodg", "tile", os.fsencode(image), os.fsencode(junk), "-o", tmp_path / "out", *IMAGE]
    p = subprocess.run(args, env=env, capture_output=True, timeout=300)
    assert p.returncode == 1 and b"Traceback" not in p.stderr, p.stderr[-2000:]
    assert os.fsencode(junk) in p.stdout + p.stderr
    _summary_names_them(tmp_path / "out", image, junk)
