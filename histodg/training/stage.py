"""One training stage: a method, an optimizer and a schedule over the stage's domains, epoch by epoch.

Every optimizer step takes `accumulate` micro-batches; each micro-batch holds `batch_size`
patches of every domain, in domain order, handed to the method as a list of per-domain
(images, masks). Patches are flipped and rotated by the data loader; everything else of the
augmentation (`augment`) and the normalisation happens on the device, on the whole micro-batch.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..device import autocast
from ..model.normalize import Normalizer
from .augment import augment_batch
from .data import PatchDataset, collate, loaded
from .methods import METHODS, parse_hparams
from .sampler import BalancedBatchSampler
from .splits import Stage
from .state import TrainState, optimizer_and_schedule, restore_rng
from .validation import quiet_worker


class StageRun:
    """Sets a stage up (resuming its optimizer, scheduler, method and RNG state when there are
    any in `state`) and runs its epochs; `on_epoch_end(record)` saves and reports each epoch."""

    def __init__(self, cfg, stage: Stage, model, task, runtime, state: TrainState, normalization):
        self.cfg, self.stage, self.model, self.task, self.rt, self.st = cfg, stage, model, task, runtime, state
        self.domains = stage.domain_names
        self.normalizer = Normalizer(normalization.mean, normalization.std, runtime.device, runtime.placement.channels_last,
                                     normalization.stain)
        self.method = self._method()
        parts = [p for d in self.domains for p in stage.train[d]]
        self.augmentation = cfg.augmentation
        self.dataset = PatchDataset(parts, augment=self.augmentation.flips)
        bounds = np.cumsum([0] + [sum(len(p) for p in stage.train[d]) for d in self.domains])
        self.domain_indices = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(self.domains))]
        self.per_step = cfg.batch_size * len(self.domains) * cfg.accumulate * runtime.world
        self.steps_per_epoch = cfg.steps_per_epoch or max(1, math.ceil(len(self.dataset) / self.per_step))
        self.total = cfg.steps if cfg.steps is not None else cfg.total_epochs * self.steps_per_epoch
        self.n_epochs = math.ceil(self.total / self.steps_per_epoch)
        self.optimizer, self.scheduler = self._optimizer()
        self.method.start_stage(self.total)
        if state.rng is not None:
            restore_rng(state.rng, runtime, cfg.seed, state.global_step)  # each rank its own streams
            state.rng = None

    def _method(self):
        cfg, rt = self.cfg, self.rt
        cls = METHODS[cfg.method]
        method = cls(self.model, len(self.domains), parse_hparams(cls, cfg.hparams), task=self.task,
                     normalizer=self.normalizer).to(rt.device)
        if rt.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            method.use_net(DDP(self.model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None))
        if self.st.method_extra:
            own = {f"model.{k}": v for k, v in self.model.state_dict().items()}
            method.load_state_dict({**own, **self.st.method_extra})
        return method

    def _optimizer(self):
        cfg = self.cfg
        optimizer, scheduler = optimizer_and_schedule(self.method, cfg.lr, cfg.weight_decay, self.total,
                                                      int(cfg.warmup * self.total))
        if self.st.optimizer is not None:
            optimizer.load_state_dict(self.st.optimizer)
            scheduler.load_state_dict(self.st.scheduler)
        return optimizer, scheduler

    def run(self, on_epoch_end, on_step=None) -> None:
        for epoch in range(self.st.epoch, self.n_epochs):
            steps = min(self.steps_per_epoch, self.total - epoch * self.steps_per_epoch)
            t0 = time.perf_counter()
            logs = self.train_epoch(epoch, steps, on_step)
            seconds = time.perf_counter() - t0
            record = {"stage": self.stage.index + 1, "stage_axis": self.stage.axis, "epoch": epoch + 1,
                      "epochs": self.n_epochs, "step": self.st.global_step, "lr": self.scheduler.get_last_lr()[0], **logs,
                      "images_per_s": steps * self.per_step / seconds, "seconds": seconds}
            on_epoch_end(self, epoch, record)
        self.method.close()

    def method_state(self) -> dict:
        """The method's own state (buffers such as Fishr's moving averages), without the model's."""
        return {k: v for k, v in self.method.state_dict().items() if not k.startswith("model.")}

    # -- one epoch ---------------------------------------------------------------------------------
    def _loader(self, epoch: int, steps: int) -> DataLoader:
        cfg, rt = self.cfg, self.rt
        sampler = BalancedBatchSampler(self.domain_indices, cfg.batch_size, steps * cfg.accumulate,
                                       seed=cfg.seed + 1000 * self.stage.index, epoch=epoch, rank=rt.rank,
                                       augment=self.augmentation.flips)
        gen = torch.Generator().manual_seed(cfg.seed)
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=collate,
                          pin_memory=rt.device.type == "cuda", generator=gen, worker_init_fn=quiet_worker,
                          persistent_workers=False, prefetch_factor=4 if cfg.workers else None)

    def train_epoch(self, epoch: int, steps: int, on_step=None) -> dict:
        cfg = self.cfg
        self.method.train()
        jitter_gen = torch.Generator()
        losses: list = []
        micro = 0
        logs: dict = {}
        step: list = []
        self.optimizer.zero_grad(set_to_none=True)
        for images, masks in loaded(self._loader(epoch, steps)):
            step.append(self._batches(images, masks, jitter_gen, micro))
            micro += 1
            if len(step) < cfg.accumulate:
                continue
            with autocast(self.rt.placement):  # the same precision as the losses that follow
                self.method.begin_step(step)  # every micro-batch of the step, before their losses
            done = [self._backward(batches, last_micro=k == len(step) - 1) for k, batches in enumerate(step)]
            step = []
            step_losses, logs = self._read_step(done)  # the step's one wait for the device
            losses.extend(step_losses)
            self._optimizer_step()
            if on_step:
                on_step({"stage": self.stage.index + 1, "epoch": epoch + 1, "step": self.st.global_step,
                         "images": len(self.domains) * cfg.batch_size * cfg.accumulate * self.rt.world,
                         "loss": losses[-1], "lr": self.scheduler.get_last_lr()[0],
                         **{k: v for k, v in logs.items() if isinstance(v, float)}})
        out = {"train_loss": float(np.mean(losses)) if losses else float("nan")}
        for k in ([k for k in logs if isinstance(logs[k], float) and k != "loss"] if losses else []):
            out[f"train_{k}"] = float(logs[k])
        return out

    def _batches(self, images, masks, jitter_gen, micro: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One micro-batch on the device, augmented and normalised, split into per-domain batches."""
        cfg, dev = self.cfg, self.rt.device
        images = images.to(dev, non_blocking=True)
        masks = masks.to(dev, non_blocking=True)
        x = images.float()
        aug = self.augmentation
        if aug.photometric or aug.scale:
            jitter_gen.manual_seed(cfg.seed * 1_000_003 + self.st.global_step * 97 + micro + self.rt.rank * 7_919_111)
            x, masks = augment_batch(x, masks, aug, jitter_gen)
        x = self.normalizer(x)
        b = cfg.batch_size
        return [(x[i * b:(i + 1) * b], masks[i * b:(i + 1) * b]) for i in range(len(self.domains))]

    def _backward(self, batches, last_micro: bool):
        sync = nullcontext() if (last_micro or self.rt.world == 1) else self.method.net.no_sync()
        with sync:
            with autocast(self.rt.placement):
                loss, logs = self.method.loss(batches)
            (loss / self.cfg.accumulate).backward()
        return loss.detach(), logs

    def _read_step(self, done: list) -> tuple[list[float], dict]:
        """The losses of a step's micro-batches and the last one's logs as numbers: one host sync
        per optimizer step (not one per micro-batch, which would stall the GPU's queue). A loss that
        is not finite on any rank stops the run before the optimizer steps (NonFiniteLoss, with
        that micro-batch's logs), every rank alike."""
        values = torch.stack([loss.float() for loss, _ in done])
        finite = torch.isfinite(values).all().to(torch.int32)
        if self.rt.world > 1:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        numbers = values.tolist()
        if not bool(finite):
            bad = next((i for i, v in enumerate(numbers) if not math.isfinite(v)), len(done) - 1)
            raise NonFiniteLoss(plain_logs(done[bad][1]))
        logs = [plain_logs(lg) for _, lg in done]
        return [float(lg.get("loss", v)) for v, lg in zip(numbers, logs)], logs[-1]

    def _optimizer_step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.method.end_of_step():  # the method asks for fresh moment estimates (Fishr's penalty starts)
            self.optimizer.state.clear()
        self.st.global_step += 1


def plain_logs(logs: dict) -> dict:
    """A method's logs with its tensors as numbers: 0-d as float, 1-d (per domain) as lists."""
    return {k: (v.tolist() if v.ndim else float(v)) if isinstance(v, torch.Tensor) else v for k, v in logs.items()}


class NonFiniteLoss(Exception):
    """The loss of a micro-batch was NaN or infinite; `logs` holds its per-domain losses."""

    def __init__(self, logs: dict):
        super().__init__("loss is not finite")
        self.logs = logs
