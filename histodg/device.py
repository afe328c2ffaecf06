"""Where and how models run: device, bf16 autocast and channels_last, resolved once.

`--device auto` means CUDA when there is a GPU, else the CPU; `--amp auto` and
`--channels-last auto` mean on for CUDA, off elsewhere. Both training and prediction resolve
their settings here, so they always agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .constants import DEVICE_MODES as MODES


@dataclass(frozen=True)
class Placement:
    device: Any  # torch.device (torch is imported only where it is used)
    amp_dtype: Any  # torch.bfloat16 or None
    channels_last: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def resolve_device(want: str, where, error, local_rank: int | None = None):
    """torch.device for `want` ("auto", "cpu", "cuda", "cuda:1", ...); `error(where, reason)` is
    the exception to raise. Under DDP, `local_rank` picks this process's GPU for plain "cuda"."""
    import torch

    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise error(where, "--device cuda asked for, but no CUDA GPU is available")
    if want == "cuda" and local_rank is not None:
        want = f"cuda:{local_rank}"
    try:
        return torch.device(want)
    except RuntimeError as exc:
        raise error(where, f"--device {want!r}: {exc}") from None


def resolve_placement(device, amp: str = "auto", channels_last: str = "auto") -> Placement:
    """bf16 autocast and channels_last for a device: "on", "off", or "auto" (on for CUDA)."""
    import torch

    for name, value in (("amp", amp), ("channels_last", channels_last)):
        if value not in MODES:
            raise ValueError(f"{name} {value!r}: choose from {', '.join(MODES)}")
    cuda = device.type == "cuda"
    use_amp = amp == "on" or (amp == "auto" and cuda)
    use_cl = channels_last == "on" or (channels_last == "auto" and cuda)
    return Placement(device, torch.bfloat16 if use_amp else None, use_cl)


def bind_device(device) -> None:
    """Make `device` this process's current CUDA device (a no-op for the CPU).

    Streams and events are per device, and CUDA's "current" device is cuda:0 until told
    otherwise: a process that computes on cuda:1 without this records its events on cuda:0's
    stream (where they complete at once, before the work they should wait for) and opens a
    context on GPU 0 too. Every process that uses a GPU binds it first (`Predictor`, each
    `--devices` worker, each training rank). cuDNN may then pick its fastest convolution for the
    one window size (`cudnn.benchmark`)."""
    import torch

    if isinstance(device, str) and not device.startswith("cuda"):
        return  # "cpu", "auto" (resolved later, by the code that binds again)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # every input histodg feeds a GPU has one size (windows, patches)


class HostCopy:
    """A device -> host copy in flight: `wait()` blocks until it has landed and returns the host tensor."""

    def __init__(self, host, event=None):
        self.host, self.event = host, event

    def wait(self):
        if self.event is not None:
            self.event.synchronize()
        return self.host


class HostTransfers:
    """Copies model outputs to the host while the device goes on: on CUDA into two pinned buffers
    in turn, with an event recorded on the stream of the tensors' own device (not the current
    device's); elsewhere the output is already on the host. The window pipeline only ever reads
    a result through `to_host(...).wait()`, so a test can drive it with copies that land late."""

    def __init__(self, device, shape):
        import torch

        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.buffers = [torch.empty(shape, dtype=torch.float32, pin_memory=True) for _ in range(2)] if cuda else None
        self.turn = 0

    def to_host(self, src) -> HostCopy:
        import torch

        if self.buffers is None:
            return HostCopy(src)
        host = self.buffers[self.turn % 2][: src.shape[0]]
        self.turn += 1
        host.copy_(src, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return HostCopy(host, event)


def place_model(model, placement: Placement):
    """The model on the placement's device, channels_last when the placement says so."""
    import torch

    model = model.to(placement.device)
    if placement.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def float32(device):
    """Autocast off (for `device`'s type) inside: what linear algebra and colour maths need. On CUDA
    a matmul under bf16 autocast gives bf16, and `linalg.solve`, `eigh`, `inv` have no bf16 kernel
    there (CPU autocast hides this by running them in float32); statistics of small differences
    lose their digits in bf16. Callers also make their inputs float32."""
    import torch

    return torch.autocast(torch.device(device).type, enabled=False)


def autocast(placement: Placement):
    """The autocast context for a placement (a no-op without AMP)."""
    from contextlib import nullcontext

    import torch

    if placement.amp_dtype is None:
        return nullcontext()
    return torch.autocast(placement.device.type, dtype=placement.amp_dtype)


def reader_threads() -> int:
    """Threads that read slide regions (decoding releases the GIL): the CPUs, at most 8."""
    import os

    return max(1, min(8, os.cpu_count() or 1))


def loader_processes() -> int:
    """DataLoader worker processes for training: the CPUs but one, at most 4."""
    import os

    return max(0, min(4, (os.cpu_count() or 1) - 1))
