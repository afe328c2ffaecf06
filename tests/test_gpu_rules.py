"""CUDA's rules, kept on a machine without a GPU: results read only once their copy has landed,
one device per process, CUDA's autocast policy (emulated on the CPU) for every method and stain
normalisation."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from helpers import DarkModel, raw_config, tissue_field
from histodg.device import HostCopy
from histodg.inference import PredictOptions, Predictor, predict_slide
from histodg.slides.inputs import SlideJob

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class LateCopy(HostCopy):
    """A copy to the host that lands `delay` seconds after it was started, as an asynchronous
    device -> host copy does; until then the host buffer holds NaN."""

    def __init__(self, src, delay: float):
        super().__init__(torch.full(src.shape, float("nan")))
        self.thread = threading.Thread(target=self._land, args=(src.clone(), delay))
        self.thread.start()

    def _land(self, src, delay):
        time.sleep(delay)
        self.host.copy_(src)

    def wait(self):
        self.thread.join()
        return self.host


class LateTransfers:
    def __init__(self, delay: float):
        self.delay, self.started = delay, []

    def to_host(self, src):
        copy = LateCopy(src, self.delay)
        self.started.append(copy)
        return copy


def _prob(pred, slide_png, out):
    r = predict_slide(pred, SlideJob(slide_png, "s", mpp=1.0), out)
    assert r.status == "done", r.error
    return zarr.open_array(str(out / "s" / "prob.zarr"), mode="r")[:]


def test_results_are_read_only_once_their_copy_to_the_host_has_landed(tmp_path):
    Image.fromarray(tissue_field(300, 260)).save(tmp_path / "slide.png")
    opts = dict(batch_size=2, overlap=0.25, device="cpu")
    reference = _prob(Predictor(DarkModel(), raw_config(1.0, 64), PredictOptions(**opts)), tmp_path / "slide.png",
                      tmp_path / "a")
    pred = Predictor(DarkModel(), raw_config(1.0, 64), PredictOptions(**opts))
    pred.transfers = LateTransfers(delay=0.05)
    late = _prob(pred, tmp_path / "slide.png", tmp_path / "b")
    first = pred.transfers.started[0]
    assert len(pred.transfers.started) > 3 and not first.thread.is_alive()
    np.testing.assert_array_equal(late, reference)  # no window stitched from a copy still in flight


def test_a_late_copy_is_not_there_before_its_wait():
    """The test above can fail: reading the host buffer before `wait()` gives what was there before."""
    copy = LateCopy(torch.ones(2, 4, 4), delay=0.2)
    assert torch.isnan(copy.host).all()
    assert torch.equal(copy.wait(), torch.ones(2, 4, 4))


def test_each_devices_worker_binds_its_own_gpu_before_it_builds_its_model(monkeypatch):
    import queue

    from histodg.inference import devices, predictor

    bound, seen = [], []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: bound.append(str(d)))

    def from_checkpoint(path, options):
        seen.append(list(bound))  # what was bound when the model was built
        raise RuntimeError("stop here")

    monkeypatch.setattr(predictor.Predictor, "from_checkpoint", staticmethod(from_checkpoint))
    results, jobs = queue.Queue(), queue.Queue()
    devices._worker("ck.pt", PredictOptions(device="cuda:1"), "out", jobs, results, 1)
    assert seen == [["cuda:1"]]
    assert results.get_nowait()[0] == "error"


def test_host_copies_record_their_event_on_the_stream_of_their_own_device(monkeypatch):
    """On CUDA (emulated): the copy's event goes to the stream of the tensors' device, never the current one's."""
    from histodg import device as dev

    recorded = []

    class Event:
        def record(self, stream):
            recorded.append(stream)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: f"stream of {d}")
    transfers = dev.HostTransfers.__new__(dev.HostTransfers)
    transfers.device, transfers.buffers, transfers.turn = torch.device("cuda:1"), [torch.zeros(2, 3)] * 2, 0
    copy = transfers.to_host(torch.ones(2, 3))
    assert recorded == ["stream of cuda:1"] and torch.equal(copy.host, torch.ones(2, 3))


# -- CUDA's autocast policy ----------------------------------------------------------------------------
from cuda_autocast import cuda_autocast_rules  # noqa: E402

from helpers import make_domains  # noqa: E402
from histodg.training.methods import METHODS  # noqa: E402


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return make_domains(tmp_path_factory.mktemp("stores"), organs=("colon",), scanners=("s1", "s2"), stores_per_domain=1,
                        n=6)


def _train(stores, out, data_dir, **kw):
    from histodg.training.config import TrainConfig
    from histodg.training.trainer import Trainer

    cfg = TrainConfig(stores=(str(stores),), out_dir=str(out), arch="unet", encoder="resnet18", encoder_weights="none",
                      domains="scanner", steps=1, batch_size=2, accumulate=2, val_fraction=0.0, device="cpu", workers=0,
                      amp="on", **kw)
    with cuda_autocast_rules() as rules:
        result = Trainer(cfg).run()
    assert rules.under_autocast > 100  # the step ran under autocast, with CUDA's rules
    return result


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_with_macenko_under_cudas_autocast_policy(method, stores, tmp_path, data_dir):
    result = _train(stores, tmp_path / "run", data_dir, method=method, stain_norm="macenko",
                    stain_ref=str(data_dir / "he_carcinoma_1000.png"))
    assert result["global_step"] == 1


@pytest.mark.parametrize("stain_norm", ["none", "reinhard"])
def test_the_other_stain_normalisations_train_under_cudas_autocast_policy(stain_norm, stores, tmp_path, data_dir):
    ref = {"stain_ref": str(data_dir / "he_carcinoma_1000.png")} if stain_norm != "none" else {}
    assert _train(stores, tmp_path / "run", data_dir, method="stain", stain_norm=stain_norm, **ref)["global_step"] == 1


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_stain_normalisation_gives_the_same_pixels_under_autocast_as_without(method, data_dir):
    """Training normalises inside autocast (SDS's and stain's jitter), predict outside: the pixels must agree."""
    from histodg.model.normalize import Normalizer
    from histodg.model.stain import reference_from_image

    rgb = np.asarray(Image.open(data_dir / "he_carcinoma_1000.png").convert("RGB"))
    x = torch.from_numpy(np.stack([rgb[:128, :128], rgb[500:628, 300:428]])).permute(0, 3, 1, 2).float()
    norm = Normalizer((0.5,) * 3, (0.25,) * 3, "cpu", stain=reference_from_image(method, data_dir / "he_carcinoma_1000.png"))
    plain = norm(x)
    with cuda_autocast_rules(), torch.autocast("cpu", dtype=torch.bfloat16):
        under = norm(x)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain, rtol=0, atol=0)


def test_predict_with_stain_normalisation_runs_under_cudas_autocast_policy(tmp_path, data_dir):
    from helpers import tiny_checkpoint

    ck = tiny_checkpoint(tmp_path / "ck.pt", mpp=1.0)
    Image.fromarray(np.asarray(Image.open(data_dir / "he_carcinoma_1000.png").convert("RGB"))[:200, :200]).save(
        tmp_path / "he.png")
    opts = PredictOptions(device="cpu", amp="on", stain_norm="macenko", stain_ref=str(data_dir / "he_carcinoma_1000.png"))
    with cuda_autocast_rules() as rules:
        r = predict_slide(Predictor.from_checkpoint(ck, opts), SlideJob(tmp_path / "he.png", "he", mpp=1.0), tmp_path / "p")
    assert r.status == "done", r.error
    assert rules.under_autocast > 0


def test_the_coral_penalty_is_float32_under_autocast():
    from histodg.training.methods.coral import coral_penalty

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(500, 16, generator=g) * 3 + 1, torch.randn(400, 16, generator=g)
    plain = coral_penalty(x, y)
    with cuda_autocast_rules(), torch.autocast("cpu", dtype=torch.bfloat16):
        under = coral_penalty(x, y)
    assert under.dtype == torch.float32 and torch.equal(under, plain)
