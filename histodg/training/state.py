"""What a run carries from epoch to epoch and writes into its checkpoints, and the runtime it runs on."""
from __future__ import annotations

import hashlib
import math
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from ..device import Placement, resolve_device, resolve_placement


@dataclass
class Runtime:
    """Where this process trains: its placement (device, AMP, channels_last) and its DDP rank."""

    placement: Placement
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def device(self):
        return self.placement.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_runtime(cfg, error) -> Runtime:
    """The device (one GPU per rank under torchrun), AMP and channels_last of a training run;
    starts the process group (NCCL on GPUs, gloo on CPUs) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device, cfg.out_dir, error, local_rank=local if world > 1 else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(resolve_placement(device, cfg.amp, cfg.channels_last), rank, world, local)


@dataclass
class TrainState:
    """Where a run is: stage, epoch, step, best score, history; the optimizer, scheduler, method
    and RNG states to continue exactly (set while a stage runs, cleared between stages)."""

    stage: int = 0
    epoch: int = 0  # next epoch to run within `stage`
    global_step: int = 0
    best: float = -1.0
    history: list = field(default_factory=list)
    optimizer: dict | None = None
    scheduler: dict | None = None
    method_extra: dict | None = None
    rng: dict | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> TrainState:
        st = cls(**{k: ckpt[k] for k in ("stage", "epoch", "global_step", "best", "history")})
        st.optimizer, st.scheduler = ckpt.get("optimizer_state"), ckpt.get("scheduler_state")
        st.method_extra, st.rng = ckpt.get("method_state"), ckpt.get("rng")
        return st

    def next_stage(self, index: int) -> None:
        self.stage, self.epoch, self.optimizer, self.scheduler, self.method_extra = index + 1, 0, None, None, None

    def payload(self, model, model_config, train_config: dict, final: bool, light: bool = False,
                record: dict | None = None) -> dict:
        """A checkpoint's contents; `light` (best.pt, stageN.pt) leaves out what only a resume needs."""
        p = {"model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "model_config": model_config, "train_config": train_config, "stage": self.stage, "epoch": self.epoch,
             "global_step": self.global_step, "best": self.best, "done": final}
        if record is not None:
            p["metrics"] = record
        if not light:
            p.update({"optimizer_state": self.optimizer, "scheduler_state": self.scheduler,
                      "method_state": self.method_extra, "rng": rng_state(), "history": self.history})
        return p


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def params_checksum(model: torch.nn.Module) -> str:
    """Hash of the trainable parameters (not BatchNorm running statistics: under DDP each rank
    updates those on its own batch after rank 0's are broadcast, and rank 0's are saved)."""
    h = hashlib.sha256()
    for k, v in sorted(model.named_parameters()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
