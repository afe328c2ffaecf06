"""What a run carries from epoch to epoch and writes into its checkpoints, and the runtime it runs on."""
from __future__ import annotations

import hashlib
import math
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from ..device import Placement, bind_device, resolve_device, resolve_placement
from ..model.checkpoint import Payload


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


DDP_TIMEOUT_MIN = 120  # HISTODG_DDP_TIMEOUT_MIN: how long a rank waits for the others (rank 0 validating, describing the domains)


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by torchrun): readable before
    the process group starts."""
    return int(os.environ.get("RANK", "0"))


def resolve_runtime(cfg, error) -> Runtime:
    """The device (one GPU per rank under torchrun: LOCAL_RANK's), AMP and channels_last of a
    training run; starts the process group (NCCL on GPUs, gloo on CPUs) when WORLD_SIZE > 1, with
    a timeout long enough for the work rank 0 does alone at the end of an epoch and of training
    (NCCL's default, 10 minutes, is not)."""
    import datetime

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = launch_rank()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and cfg.device.startswith("cuda:"):
        raise error(f"--device {cfg.device}", "under torchrun each rank takes the GPU of its LOCAL_RANK: use --device cuda "
                                              "(or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs")
    device = resolve_device(cfg.device, cfg.out_dir, error, local_rank=local if world > 1 else None)
    bind_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        text = os.environ.get("HISTODG_DDP_TIMEOUT_MIN", str(DDP_TIMEOUT_MIN))
        try:
            minutes = float(text)
            if not minutes > 0:
                raise ValueError
        except ValueError:
            raise error("HISTODG_DDP_TIMEOUT_MIN", f"{text!r} is not a number of minutes above 0") from None
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(minutes=minutes))
    return Runtime(resolve_placement(device, cfg.amp, cfg.channels_last), rank, world, local)


def on_rank0(rt: Runtime, work, error):
    """`work()` on rank 0, its result handed to every rank; a `HistodgError` there is raised on every
    rank as `error(path, reason)`, so that no rank waits at a collective the others never reach."""
    from .. import HistodgError

    result, failed = None, None
    if rt.main:
        try:
            result = work()
        except HistodgError as exc:
            failed = (exc.path, exc.reason)
    if rt.world > 1:
        box = [(result, failed)]
        torch.distributed.broadcast_object_list(box, src=0)
        result, failed = box[0]
    if failed:
        raise error(*failed)
    return result


def end_process_group() -> None:
    """Leave the process group, if one was started (every rank, once the command's runs are done)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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
                record: dict | None = None, rng: dict | None = None) -> Payload:
        """A checkpoint's contents; `light` (best.pt, stageN.pt) leaves out what only a resume needs
        (`rng`: every rank's random states, `all_rng_states`; this process's alone when not given)."""
        resume = None if light else {"optimizer_state": self.optimizer, "scheduler_state": self.scheduler,
                                     "method_state": self.method_extra, "rng": rng or {"ranks": [rng_state()]},
                                     "history": self.history}
        return Payload({k: v.detach().cpu() for k, v in model.state_dict().items()}, model_config, train_config,
                       self.stage, self.epoch, self.global_step, self.best, done=final, metrics=record, resume=resume)


def rng_state(device=None) -> dict:
    """This process's random states: Python, NumPy, torch's CPU generator and, on a GPU, the
    generator of this process's own device only (a node with fewer GPUs can resume it)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def all_rng_states(rt: Runtime) -> dict:
    """Every rank's `rng_state`, gathered (collective: every rank calls it), for `last.pt`."""
    mine = rng_state(rt.device)
    if rt.world == 1:
        return {"ranks": [mine]}
    gathered: list = [None] * rt.world
    torch.distributed.all_gather_object(gathered, mine)
    return {"ranks": gathered}


def restore_rng(saved: dict, rt: Runtime, seed: int, step: int) -> None:
    """Each rank continues its own random streams: its own saved state when the run had as many
    ranks; otherwise (another world size, or a checkpoint that kept rank 0's state only) streams
    derived from (seed, rank, step), so no two ranks draw the same augmentation or dropout."""
    ranks = saved.get("ranks")
    if ranks is not None and len(ranks) == rt.world:
        set_rng_state(ranks[rt.rank], rt.device)
    elif ranks is None and rt.world == 1:
        set_rng_state(saved, rt.device)  # written before every rank's state was kept: rank 0's
    else:
        seed_all([seed, rt.rank, step, 29])


def seed_all(entropy) -> None:
    seq = np.random.SeedSequence(entropy)
    words = seq.generate_state(4)
    random.seed(int(words[0]))
    np.random.seed(words[1:2])
    torch.manual_seed(int(words[2]) << 32 | int(words[3]))


def set_rng_state(state: dict, device=None) -> None:
    random.setstate(_tuples(state["python"]))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device is None or torch.device(device).type != "cuda":
        return
    device = torch.device(device)
    if isinstance(cuda, (list, tuple)):  # every GPU's state (before): this device's, when it had one
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def _tuples(value):
    """Python's random state as `random.setstate` wants it (tuples, also after a round trip as lists)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def optimizer_and_schedule(module: torch.nn.Module, lr: float, weight_decay: float, total: int, warmup: int = 0):
    """The one optimisation recipe of training and `histodg adapt`: AdamW on the trainable
    parameters, a linear warm-up of `warmup` steps, then cosine decay to 0 at `total`."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))


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
