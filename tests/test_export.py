"""`histodg export` and `histodg info MODEL` (issue 29 §3): a model others can run, and its card.

The exported network must compute what `histodg predict` computes on a window: onnxruntime (and
torch.jit for TorchScript) on windows of the real slide, against `Predictor.probabilities` with
one pass (`--tta none`), within `TOLERANCE`. A DSBN model exports its shared slot, or one
training domain's; the metadata says which."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_hostile import crafted

from helpers import make_domains, tiny_checkpoint
from histodg.inference.options import PredictOptions
from histodg.inference.predictor import Predictor
from histodg.model import domain_bn
from histodg.model.checkpoint import load_checkpoint, save_checkpoint
from histodg.model.export import ExportError, check_export, export_model, exported_metadata

pytestmark = pytest.mark.slow
TOLERANCE = 1e-5  # probabilities: float32 reorderings between torch and onnxruntime give about 1e-6


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_torch_thread):
    """A DSBN model trained by the CLI (organ -> scanner, with validation): slots s1, s2, s3."""
    from click.testing import CliRunner

    from histodg.cli import main

    root = tmp_path_factory.mktemp("export")
    stores = make_domains(root / "stores", organs=("colon", "stomach"), stores_per_domain=2, n=8)
    r = CliRunner().invoke(main, ["train", str(stores), "-o", str(root / "run"), "--arch", "unet", "--encoder", "resnet18",
                                  "--encoder-weights", "none", "--pretrain", "organ", "--finetune", "scanner", "--steps", "2",
                                  "--batch-size", "2", "--workers", "0", "--val-fraction", "0.25", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return root / "run"


@pytest.fixture(scope="module")
def windows(cmu):
    """Eight 64 px windows of the real slide's tissue, (N, 64, 64, 3) uint8."""
    import openslide

    with openslide.OpenSlide(str(cmu)) as osr:
        w, h = osr.dimensions
        tiles = [np.asarray(osr.read_region((w // 3 + 64 * i, h // 3 + 96 * (i % 3)), 0, (64, 64)).convert("RGB"))
                 for i in range(8)]
    batch = np.stack(tiles)
    assert batch.std() > 10  # tissue, not glass
    return batch


def predicted(checkpoint, batch: np.ndarray, slot: int | None = None) -> np.ndarray:
    """`histodg predict`'s per-window probability (one pass, no adaptation), through `slot`."""
    pred = Predictor.from_checkpoint(checkpoint, PredictOptions(device="cpu", tta="none"))
    with domain_bn.domain(pred.model, slot) if slot is not None else torch.no_grad():
        return pred.probabilities(torch.from_numpy(batch)).numpy()


def onnx_probabilities(path, batch: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"rgb": np.ascontiguousarray(batch.transpose(0, 3, 1, 2))})[0]


def test_onnx_gives_predicts_probabilities_on_the_real_slide(cli, run, windows, tmp_path):
    r = cli("export", run / "best.pt", "-o", tmp_path / "model.onnx")
    assert r.exit_code == 0, r.output
    assert "DSBN slot shared" in r.output
    got = onnx_probabilities(tmp_path / "model.onnx", windows)
    assert got.shape == (8, 1, 64, 64) and got.dtype == np.float32
    want = predicted(run / "best.pt", windows)
    assert np.abs(got[:, 0] - want).max() < TOLERANCE
    assert got.std() > 1e-3  # the windows give the model something to say
    meta = exported_metadata(tmp_path / "model.onnx")
    mc = load_checkpoint(run / "best.pt")["model_config"]
    assert {k: meta[k] for k in ("mpp", "tile_size", "classes", "labels", "encoder", "method", "dsbn_slot")} == {
        "mpp": mc["mpp"], "tile_size": 64, "classes": 1, "labels": mc["labels"], "encoder": "resnet18", "method": "dsbn",
        "dsbn_slot": "shared"}
    import histodg

    assert meta["histodg_version"] == histodg.__version__ and meta["input"]["dtype"] == "uint8"


def test_a_dsbn_slot_exports_what_predict_uses_for_that_domain(run, windows, tmp_path):
    slots = load_checkpoint(run / "best.pt")["model_config"]["domain_bn"]
    assert slots == ["s1", "s2", "s3"]
    meta = export_model(run / "best.pt", tmp_path / "s2.onnx", domain="s2")
    assert meta["dsbn_slot"] == "s2"
    got = onnx_probabilities(tmp_path / "s2.onnx", windows)[:, 0]
    assert np.abs(got - predicted(run / "best.pt", windows, slot=1)).max() < TOLERANCE
    # the slot matters on these windows: the shared slot would give other numbers
    assert np.abs(got - predicted(run / "best.pt", windows)).max() > 100 * TOLERANCE
    with pytest.raises(ExportError, match="no slot of that name.*s1, s2, s3"):
        export_model(run / "best.pt", tmp_path / "x.onnx", domain="lung")


def test_torchscript_round_trip(cli, run, windows, tmp_path):
    r = cli("export", run / "best.pt", "-o", tmp_path / "model.pt")  # .pt: TorchScript
    assert r.exit_code == 0, r.output
    net = torch.jit.load(str(tmp_path / "model.pt"))
    got = net(torch.from_numpy(windows).permute(0, 3, 1, 2)).detach().numpy()
    assert np.abs(got[:, 0] - predicted(run / "best.pt", windows)).max() < TOLERANCE
    assert exported_metadata(tmp_path / "model.pt")["tile_size"] == 64
    info = json.loads(cli("info", tmp_path / "model.pt", "--json").output)[0]
    assert info["kind"] == "exported" and info["output"]["shape"] == ["N", 1, 64, 64]


def test_a_multi_class_model_exports_softmax_whose_background_complement_is_predicts(tmp_path, windows):
    from histodg.model.build import build_model
    from histodg.model.config import ModelConfig

    torch.manual_seed(3)
    model = build_model("unet", "resnet18", "none", 3)
    mc = ModelConfig(arch="unet", encoder="resnet18", mpp=1.0, tile_size=64, classes=3,
                     labels={"0": "background", "1": "tumor", "2": "stroma"})
    save_checkpoint(tmp_path / "mc.pt", {"model_state": model.state_dict(), "model_config": mc})
    meta = export_model(tmp_path / "mc.pt", tmp_path / "mc.onnx")
    got = onnx_probabilities(tmp_path / "mc.onnx", windows)
    assert got.shape == (8, 3, 64, 64) and meta["labels"]["2"] == "stroma"
    assert np.allclose(got.sum(1), 1, atol=1e-5)
    assert np.abs((1 - got[:, 0]) - predicted(tmp_path / "mc.pt", windows)).max() < TOLERANCE


def test_the_written_file_is_checked_against_the_network(tmp_path):
    """An export that does not compute what the checkpoint does is an error, not a file."""
    from histodg.model.checkpoint import model_from_checkpoint
    from histodg.model.export import Exported

    a, mc = model_from_checkpoint(load_checkpoint(tiny_checkpoint(tmp_path / "a.pt", tile=64, seed=0)))
    export_model(tmp_path / "a.pt", tmp_path / "a.onnx")
    b, _ = model_from_checkpoint(load_checkpoint(tiny_checkpoint(tmp_path / "b.pt", tile=64, seed=1)))
    assert check_export(Exported(a, mc).eval(), tmp_path / "a.onnx", "onnx") < TOLERANCE
    with pytest.raises(ValueError, match="differs from the checkpoint"):
        check_export(Exported(b, mc).eval(), tmp_path / "a.onnx", "onnx")


def test_export_refuses_in_one_line(cli, tmp_path):
    ck = tiny_checkpoint(tmp_path / "best.pt", tile=64)
    (tmp_path / "taken.onnx").write_bytes(b"keep me")
    r = cli("export", ck, "-o", tmp_path / "taken.onnx")
    assert r.exit_code == 1 and "exists: pass --overwrite" in r.stderr
    assert (tmp_path / "taken.onnx").read_bytes() == b"keep me"
    stained = load_checkpoint(ck)
    stained["model_config"]["normalization"]["stain"] = {"method": "reinhard", "means": [0, 0, 0], "stds": [1, 1, 1]}
    save_checkpoint(tmp_path / "stained.pt", stained)
    r = cli("export", tmp_path / "stained.pt", "-o", tmp_path / "s.onnx")
    assert r.exit_code == 1 and "stain normalisation (reinhard)" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "s.onnx").exists()
    marker = tmp_path / "pwned"
    r = cli("export", crafted(tmp_path / "evil.pt", marker, ck), "-o", tmp_path / "e.onnx")
    assert r.exit_code == 1 and "refused" in r.stderr and not marker.exists() and not (tmp_path / "e.onnx").exists()
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a protobuf at all")
    r = cli("info", tmp_path / "junk.onnx")
    assert r.exit_code == 1 and "not a model histodg exported" in r.stderr and "Traceback" not in r.output
    r = cli("info", crafted(tmp_path / "evil2.pt", marker, ck))
    assert r.exit_code == 1 and "refused" in r.stderr and not marker.exists()


def test_info_shows_the_model_card(cli, run):
    r = cli("info", run / "best.pt", "--json")
    assert r.exit_code == 0, r.output
    card = json.loads(r.output)[0]
    assert card["kind"] == "model" and card["method"]["name"] == "dsbn" and card["method"]["dsbn_slots"] == ["s1", "s2", "s3"]
    domains = {(d["organ"], d["scanner"]): (d["stores"], d["patches"]) for d in card["trained_on"]["domains"]}
    assert domains == {("colon", "unknown"): (2, 16), ("stomach", "unknown"): (2, 16), ("unknown", "s1"): (2, 16),
                       ("unknown", "s2"): (2, 16), ("unknown", "s3"): (2, 16)}
    assert card["trained_on"]["held_out"] == []
    assert [s["axis"] for s in card["trained_on"]["stages"]] == ["organ", "scanner"]
    assert card["training"]["command"].startswith("histodg train ") and "--pretrain organ" in card["training"]["command"]
    assert set(card["validation_dice"]["val"]) == {"s1", "s2", "s3"}
    assert all(0 <= v <= 1 for v in card["validation_dice"]["val"].values())
    assert card["shift_reference"] == ["colon", "s1", "s2", "s3", "stomach"] and card["input"]["tile_size"] == 64
    assert card["histodg_version"] and len(card["sha256"]) == 64
    table = cli("info", run / "best.pt").output
    assert "trained_on.domains" in table and "validation_dice" in table and "histodg train" in table
