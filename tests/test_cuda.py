"""What only a real GPU can show (skipped without CUDA; `benchmarks/gpu_check.sh` runs them).

bf16 close to float32, channels_last equal to contiguous, every method through a few bf16 +
channels_last steps, predict on CUDA equal to the CPU's within a stated tolerance, `--devices`
workers giving the masks one device gives, and a resumed run as close to the uninterrupted one
as two uninterrupted runs are to each other (cuDNN's convolutions need not be bit-deterministic).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from helpers import make_domains, tiny_checkpoint, tissue_field

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return make_domains(tmp_path_factory.mktemp("cuda"), organs=("colon",), scanners=("s1", "s2"), stores_per_domain=1,
                        n=16, size=128)


def _model_and_batch():
    from histodg.model.build import build_model

    torch.manual_seed(0)
    model = build_model("unet", "resnet18", "none", 1).cuda().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 256, 256, generator=g).cuda()
    y = (torch.rand(4, 256, 256, generator=g) > 0.5).to(torch.uint8).cuda()
    return model, x, y


def test_a_bf16_loss_is_close_to_the_float32_loss():
    from histodg.training.methods import SegTask, seg_loss

    model, x, y = _model_and_batch()
    with torch.no_grad():
        full = seg_loss(model(x), y, SegTask()).item()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = seg_loss(model(x), y, SegTask()).item()
    assert abs(half - full) / abs(full) < 0.02


def test_channels_last_gives_what_contiguous_gives():
    model, x, _ = _model_and_batch()
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out.contiguous(), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["erm", "dsbn", "sds", "stain", "mixstyle", "dsu", "coral", "fishr"])
def test_every_method_trains_with_bf16_and_channels_last(method, stores, tmp_path, data_dir):
    from histodg.training.config import TrainConfig
    from histodg.training.trainer import Trainer

    cfg = TrainConfig(stores=(str(stores),), out_dir=str(tmp_path / "run"), arch="unet", encoder="resnet18",
                      encoder_weights="none", domains="scanner", steps=3, batch_size=2, accumulate=2, val_fraction=0.25,
                      device="cuda", amp="on", channels_last="on", workers=0, method=method, stain_norm="macenko",
                      stain_ref=str(data_dir / "he_carcinoma_1000.png"))
    result = Trainer(cfg).run()
    assert result["global_step"] == 3 and np.isfinite(result["final"]["train_loss"])


def _predict(tmp_path, name, **opts):
    from histodg.inference import PredictOptions, Predictor, predict_slide
    from histodg.slides.inputs import SlideJob

    ck = tmp_path / "ck.pt"
    if not ck.exists():
        tiny_checkpoint(ck, mpp=1.0, tile=256)
    pred = Predictor.from_checkpoint(ck, PredictOptions(overlap=0.25, batch_size=4, **opts))
    r = predict_slide(pred, SlideJob(tmp_path / "slide.png", name, mpp=1.0), tmp_path / "p")
    assert r.status == "done", r.error
    return zarr.open_array(str(tmp_path / "p" / name / "prob.zarr"), mode="r")[:].astype(int)


@pytest.mark.parametrize("amp", ["off", "on"])
def test_predict_on_cuda_gives_the_cpus_probabilities(tmp_path, amp):
    Image.fromarray(tissue_field(900, 700)).save(tmp_path / "slide.png")
    cpu = _predict(tmp_path, "cpu", device="cpu", amp="off")
    gpu = _predict(tmp_path, f"gpu-{amp}", device="cuda", amp=amp)
    diff = np.abs(gpu - cpu)
    # prob.zarr is 0-255: float32 on both within 1 grey level; bf16 within 4 levels at most, 0.5 on average
    assert diff.max() <= (1 if amp == "off" else 4) and diff.mean() <= (0.05 if amp == "off" else 0.5)


def test_devices_workers_make_the_masks_one_device_makes(tmp_path, cli):
    Image.fromarray(tissue_field(700, 600, seed=3)).save(tmp_path / "a.png")
    Image.fromarray(tissue_field(600, 700, seed=4)).save(tmp_path / "b.png")
    ck = tiny_checkpoint(tmp_path / "ck.pt", mpp=1.0, tile=256)
    n = torch.cuda.device_count()
    devices = ",".join(f"cuda:{i % n}" for i in range(2))
    one = cli("predict", ck, tmp_path / "a.png", tmp_path / "b.png", "--mpp-override", "1", "-o", tmp_path / "one",
              "--device", "cuda:0", "--json")
    two = cli("predict", ck, tmp_path / "a.png", tmp_path / "b.png", "--mpp-override", "1", "-o", tmp_path / "two",
              "--devices", devices, "--json")
    assert one.exit_code == 0 and two.exit_code == 0, two.output
    for name in ("a", "b"):
        a = zarr.open_array(str(tmp_path / "one" / name / "prob.zarr"), mode="r")[:]
        b = zarr.open_array(str(tmp_path / "two" / name / "prob.zarr"), mode="r")[:]
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # the same GPU model: cuDNN's choice at most
        assert json.loads((tmp_path / "two" / name / "done.json").read_text())["settings"]["device"].startswith("cuda")


def test_a_resumed_run_is_as_close_to_the_whole_run_as_two_whole_runs_are(stores, tmp_path):
    from histodg.model.checkpoint import load_checkpoint
    from histodg.training.config import TrainConfig
    from histodg.training.trainer import Callbacks, Trainer

    def cfg(out, steps):
        return TrainConfig(stores=(str(stores),), out_dir=str(out), arch="unet", encoder="resnet18", encoder_weights="none",
                           domains="scanner", steps=steps, steps_per_epoch=3, batch_size=2, val_fraction=0.0,
                           device="cuda", workers=0, method="stain")

    def weights(run):
        return load_checkpoint(run / "last.pt")["model_state"]

    Trainer(cfg(tmp_path / "a", 6)).run()
    Trainer(cfg(tmp_path / "b", 6)).run()

    class Killed(Exception):
        pass

    def kill(record):  # after epoch 1: its last.pt is the resume point
        raise Killed

    with pytest.raises(Killed):
        Trainer(cfg(tmp_path / "r", 6), callbacks=Callbacks(on_epoch=kill)).run()
    Trainer(cfg(tmp_path / "r", 6), resume=True).run()
    a, b, r = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "r")
    noise = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    gap = max((a[k].float() - r[k].float()).abs().max().item() for k in a)
    assert gap <= 10 * noise + 1e-6, (gap, noise)
