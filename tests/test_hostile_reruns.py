"""Reruns that changed something: another `--mpp-override` (tile and predict) or another DSBN slot
(predict's `--organ` / `--scanner`) is refused in one line, `--overwrite` redoes it, the same
values still skip, and outputs made before these were recorded are not refused needlessly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import DarkModel, raw_config, tissue_field
from histodg.inference import PredictOptions, Predictor, WriteOptions, predict_slide
from histodg.model.config import ModelConfig
from histodg.slides.inputs import SlideJob

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TILE = ("--mpp", "1.0", "--tile-size", "64", "--min-tissue", "0.1", "--workers", "1")


@pytest.fixture
def png(tmp_path) -> Path:
    """A small plain image (no mpp of its own): tissue on glass."""
    path = tmp_path / "img.png"
    Image.fromarray(tissue_field(192, 256, seed=1)).save(path)
    return path


def _zarr_json(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())


def _drop_attr(store: Path, key: str) -> None:
    """Make the store look as if made before `key` was recorded."""
    meta = _zarr_json(store)
    meta["attributes"].pop(key, None)
    (store / "zarr.json").write_text(json.dumps(meta))


def _status(r) -> str:
    return json.loads(r.stdout)[0]["status"]


# -- histodg tile --------------------------------------------------------------------------------------
def test_tile_rerun_with_another_mpp_override_is_refused_and_overwrite_redoes_it(cli, png, tmp_path):
    out, store = tmp_path / "s", tmp_path / "s" / "img.zarr"
    r = cli("tile", png, "-o", out, *TILE, "--mpp-override", "1.0", "--json")
    assert r.exit_code == 0 and _status(r) == "done", r.output
    first = _zarr_json(store)["attributes"]
    assert first["mpp_override"] == 1.0 and first["slide_mpp"] == 1.0
    r = cli("tile", png, "-o", out, *TILE, "--mpp-override", "1.0", "--json")
    assert r.exit_code == 0 and _status(r) == "skipped"  # the same value: kept
    r = cli("tile", png, "-o", out, *TILE, "--mpp-override", "0.5")
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]  # (the progress bar is there too)
    assert r.exit_code == 1 and len(lines) == 1, repr(r.stderr)
    assert lines[0].startswith(f"error: {store}: ") and "other settings" in lines[0], lines[0]
    assert "mpp_override 1.0 -> 0.5" in lines[0] and "--overwrite" in lines[0], lines[0]
    assert _zarr_json(store)["attributes"]["n_patches"] == first["n_patches"]  # untouched
    r = cli("tile", png, "-o", out, *TILE, "--mpp-override", "0.5", "--overwrite", "--json")
    assert r.exit_code == 0 and _status(r) == "done", r.output
    again = _zarr_json(store)["attributes"]
    assert again["mpp_override"] == 0.5 and again["slide_mpp"] == 0.5
    assert again["n_patches"] < first["n_patches"]  # read at half the size: fewer 64 px windows


def test_tile_store_made_before_mpp_override_was_recorded(cli, png, tmp_path):
    """Its `slide_mpp` says what the slide was read at: the same override keeps it, another is refused."""
    out, store = tmp_path / "s", tmp_path / "s" / "img.zarr"
    assert cli("tile", png, "-o", out, *TILE, "--mpp-override", "1.0").exit_code == 0
    _drop_attr(store, "mpp_override")
    r = cli("tile", png, "-o", out, *TILE, "--mpp-override", "1.0", "--json")
    assert r.exit_code == 0 and _status(r) == "skipped", r.output
    r = cli("tile", png, "-o", out, *TILE, "--mpp-override", "0.5")
    assert r.exit_code == 1 and "mpp_override" in r.stderr and "--overwrite" in r.stderr, r.output


def test_tile_rerun_without_the_override_a_store_was_made_with_is_refused(cli, tmp_path, fake_slides):
    """A slide with an mpp of its own (0.5), tiled with --mpp-override 1.0: a rerun without the
    override would read it at 0.5, so the store is not kept."""
    from histodg.tiling import ReadOptions, TileOptions, TileSettings, tile_slide

    job = fake_slides("fake", tissue_field(192, 256), mpp=0.5)
    opts = TileOptions(TileSettings(tile_size=64, mpp=1.0, min_tissue=0.1), ReadOptions(workers=1), compression="lz4")
    assert tile_slide(SlideJob(job.path, "fake", mpp=1.0), tmp_path, opts).status == "done"
    assert tile_slide(SlideJob(job.path, "fake", mpp=1.0), tmp_path, opts).status == "skipped"
    r = tile_slide(SlideJob(job.path, "fake"), tmp_path, opts)
    assert r.status == "failed" and "mpp_override 1.0 -> None" in r.error and "\n" not in r.error, r.error


# -- histodg predict: --mpp-override ---------------------------------------------------------------------
def _dark(**opts) -> Predictor:
    return Predictor(DarkModel(), raw_config(1.0, 64), PredictOptions(device="cpu", **opts))


def test_predict_rerun_with_another_mpp_override_is_refused_and_overwrite_redoes_it(png, tmp_path):
    out, done = tmp_path / "p", tmp_path / "p" / "img" / "done.json"
    assert predict_slide(_dark(), SlideJob(png, "img", mpp=1.0), out).status == "done"
    first = json.loads(done.read_text())
    assert first["settings"]["mpp_override"] == 1.0 and first["slide"]["mpp"] == 1.0
    assert predict_slide(_dark(), SlideJob(png, "img", mpp=1.0), out).status == "skipped"
    r = predict_slide(_dark(), SlideJob(png, "img", mpp=0.5), out)
    assert r.status == "failed" and "\n" not in r.error, r.error
    assert r.error.startswith(f"{out / 'img'}: ") and "mpp_override 1.0 -> 0.5" in r.error, r.error
    assert "--overwrite" in r.error and json.loads(done.read_text()) == first  # untouched
    r = predict_slide(_dark(write=WriteOptions(overwrite=True)), SlideJob(png, "img", mpp=0.5), out)
    assert r.status == "done", r.error
    again = json.loads(done.read_text())
    assert again["settings"]["mpp_override"] == 0.5 and again["slide"]["mpp"] == 0.5
    assert again["output"]["shape"] == [96, 128]  # read at 1 um/px: half the image's size


def test_predict_done_json_made_before_mpp_override_was_recorded(png, tmp_path):
    out, done = tmp_path / "p", tmp_path / "p" / "img" / "done.json"
    assert predict_slide(_dark(), SlideJob(png, "img", mpp=1.0), out).status == "done"
    record = json.loads(done.read_text())
    record["settings"].pop("mpp_override")
    done.write_text(json.dumps(record))
    assert predict_slide(_dark(), SlideJob(png, "img", mpp=1.0), out).status == "skipped"
    r = predict_slide(_dark(), SlideJob(png, "img", mpp=0.5), out)
    assert r.status == "failed" and "mpp_override" in r.error, r.error


# -- histodg predict: the DSBN slot ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def dsbn_model():
    """An untrained Unet-resnet18 with BatchNorm slots for s1 and s2 (no training: only the routing matters)."""
    from histodg.model import domain_bn
    from histodg.model.build import build_model

    torch.manual_seed(0)
    model = build_model("unet", "resnet18", "none", 1)
    domain_bn.convert(model, 2)
    config = ModelConfig(arch="unet", encoder="resnet18", mpp=1.0, tile_size=64, method="dsbn", domain_bn=["s1", "s2"])
    return model, config


def _dsbn(dsbn_model, **opts) -> Predictor:
    model, config = dsbn_model
    return Predictor(model, config, PredictOptions(device="cpu", **opts))


def test_predict_rerun_through_another_dsbn_slot_is_refused_and_overwrite_redoes_it(dsbn_model, png, tmp_path):
    out, done = tmp_path / "p", tmp_path / "p" / "img" / "done.json"

    def run(overwrite=False, **domains):
        return predict_slide(_dsbn(dsbn_model, write=WriteOptions(overwrite=overwrite)), SlideJob(png, "img", mpp=1.0, **domains), out)

    assert run(scanner="s1").status == "done"
    first = json.loads(done.read_text())
    assert first["settings"]["dsbn_route"] == "s1" and first["adaptation"] == "dsbn: the BatchNorm of s1"
    assert run(scanner="s1").status == "skipped"
    assert run(scanner="s1", organ="colon").status == "skipped"  # another organ, the same slot: kept
    r = run(scanner="s2")
    assert r.status == "failed" and "\n" not in r.error and "dsbn_route 's1' -> 's2'" in r.error, r.error
    assert r.error.startswith(f"{out / 'img'}: ") and "--overwrite" in r.error, r.error
    r = run(scanner="s3")  # not one of the model's domains: the shared slot
    assert r.status == "failed" and "dsbn_route 's1' -> 'shared'" in r.error, r.error
    r = run(organ="s2")  # the organ comes first: an organ that names a slot routes there
    assert r.status == "failed" and "dsbn_route 's1' -> 's2'" in r.error, r.error
    assert json.loads(done.read_text()) == first  # untouched
    assert run(overwrite=True, scanner="s2").status == "done"
    again = json.loads(done.read_text())
    assert again["settings"]["dsbn_route"] == "s2" and again["adaptation"] == "dsbn: the BatchNorm of s2"


def test_predict_dsbn_done_json_made_before_the_route_was_recorded_is_kept(dsbn_model, png, tmp_path):
    out, done = tmp_path / "p", tmp_path / "p" / "img" / "done.json"
    job = SlideJob(png, "img", mpp=1.0, scanner="s1")
    assert predict_slide(_dsbn(dsbn_model), job, out).status == "done"
    record = json.loads(done.read_text())
    record["settings"].pop("dsbn_route")
    done.write_text(json.dumps(record))
    assert predict_slide(_dsbn(dsbn_model), job, out).status == "skipped"


def test_a_plain_model_records_no_dsbn_route(png, tmp_path):
    assert predict_slide(_dark(), SlideJob(png, "img", mpp=1.0, scanner="s1"), tmp_path).status == "done"
    settings = json.loads((tmp_path / "img" / "done.json").read_text())["settings"]
    assert settings["dsbn_route"] is None and settings["mpp_override"] == 1.0
