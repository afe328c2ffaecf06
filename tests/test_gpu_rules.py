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
from torch.overrides import TorchFunctionMode

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
from cuda_autocast import cuda_autocast_rules, tensors_in  # noqa: E402

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
    Image.fromarray(np.asarray(Image.open(data_dir / "he_carcinoma_1000.png").convert("RGB"))[:128, :128]).save(
        tmp_path / "he.png")
    opts = PredictOptions(device="cpu", amp="on", stain_norm="macenko", stain_ref=str(data_dir / "he_carcinoma_1000.png"),
                          tta="none")  # bf16 convolutions are slow on a CPU: one pass over 4 windows
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


# -- host syncs ------------------------------------------------------------------------------------------
SYNCS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}  # wait for a GPU


class CountSyncs(TorchFunctionMode):
    """Counts reads of values that would live on the GPU: what derives from the model's parameters
    and buffers or the batch (taint tracking); a coin drawn on the CPU generator is no GPU sync."""

    def __init__(self, sources):
        super().__init__()
        self.device = {id(t): t for t in tensors_in(list(sources))}  # held, so that no id is reused meanwhile
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_device = any(id(t) in self.device for t in tensors_in((args, kwargs)))
        if on_device and getattr(func, "__name__", "") in SYNCS:
            self.count += 1
        out = func(*args, **kwargs)
        if on_device:
            self.device.update((id(t), t) for t in tensors_in(out))
        return out


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_micro_batch_never_waits_for_the_device(method, stores, tmp_path, monkeypatch):
    """Every read of a device value is a host sync that drains the GPU's queue: the loop reads a
    step's losses once, after its last micro-batch, never inside one."""
    from histodg.training import stage as stage_mod
    from histodg.training.config import TrainConfig
    from histodg.training.trainer import Trainer

    inside, backward = [], stage_mod.StageRun._backward

    def counted(self, batches, *a, **k):
        sources = [*self.method.parameters(), *self.method.buffers(), *tensors_in(batches)]
        with CountSyncs(sources) as c:
            out = backward(self, batches, *a, **k)
        inside.append(c.count)
        return out

    monkeypatch.setattr(stage_mod.StageRun, "_backward", counted)
    cfg = TrainConfig(stores=(str(stores),), out_dir=str(tmp_path / "run"), arch="unet", encoder="resnet18",
                      encoder_weights="none", domains="scanner", steps=2, batch_size=2, accumulate=2, val_fraction=0.0,
                      device="cpu", workers=0, method=method, hparams={"anneal": 0} if method == "fishr" else {})
    Trainer(cfg).run()
    assert len(inside) == 4 and inside == [0, 0, 0, 0]


def test_macenko_angle_percentiles_of_the_batch_are_each_images_own():
    """One sort for the batch gives what torchstain's per-image percentile gives (the loop it replaced)."""
    from histodg.model.stain import masked_percentiles

    g = torch.Generator().manual_seed(3)
    values = torch.randn(6, 999, generator=g)
    mask = torch.rand(6, 999, generator=g) < torch.linspace(0.05, 1, 6).unsqueeze(1)
    mask[0, :] = False
    mask[0, :51] = True  # n = 51: q (n - 1) = 0.5, rounded half to even
    lo, hi = masked_percentiles(values, mask, (0.01, 0.99))
    for i in range(6):
        p = values[i][mask[i]]
        assert lo[i] == p.kthvalue(1 + round(0.01 * (p.numel() - 1))).values
        assert hi[i] == p.kthvalue(1 + round(0.99 * (p.numel() - 1))).values


def test_binding_a_gpu_sets_it_current_and_lets_cudnn_pick_for_the_fixed_window(monkeypatch):
    from histodg.device import bind_device

    bound = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: bound.append(str(d)))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    bind_device("cpu")
    bind_device("auto")
    assert bound == [] and torch.backends.cudnn.benchmark is False
    bind_device("cuda:1")
    assert bound == ["cuda:1"] and torch.backends.cudnn.benchmark is True


def test_checkpoints_get_detached_cpu_tensors_whatever_device_they_came_from():
    """`histodg adapt` saved its model's state as it was (CUDA tensors on a GPU): `plain_data` moves every tensor."""
    from histodg.model.safe_load import plain_data

    class Elsewhere(torch.Tensor):  # a tensor that says where it is, as a CUDA one would
        moved = False

        def cpu(self, *a, **k):
            Elsewhere.moved = True
            return torch.Tensor(self)

    w = torch.ones(3, requires_grad=True)
    out = plain_data({"model_state": {"w": w * 2, "far": torch.zeros(2).as_subclass(Elsewhere)}})
    assert not out["model_state"]["w"].requires_grad and Elsewhere.moved
