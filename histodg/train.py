"""The training loop: stages, optimizer, AMP, accumulation, checkpoints, resume, metrics.

    result = Trainer(config).run()

A stage trains one method on per-domain minibatches (`BalancedBatchSampler`) with AdamW, linear
warm-up and cosine decay; a new stage gets a new optimizer and starts from the previous
stage's weights. After every epoch the seen domains' validation split and the held-out domains
are scored (Dice and IoU per domain), `last.pt` is replaced (atomically) and one line is
appended to `metrics.jsonl`; `best.pt` keeps the final stage's best epoch by the mean Dice of
the seen domains' validation (never the held-out ones). `--resume` restarts from `last.pt` at
the same step with the same optimizer, scheduler and RNG state, so a killed run loses at most
one epoch and continues exactly as if it had not been killed.

Under `torchrun` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (NCCL on
GPUs, gloo on CPUs), each rank samples its own patches, and rank 0 validates and writes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import HistodgError
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig, write_json_atomic
from .data import (
    BalancedBatchSampler,
    Normalizer,
    PatchDataset,
    PickDataset,
    collate,
    color_jitter,
    label_set,
    load_stores,
)
from .methods import METHODS, SegTask, parse_hparams
from .metrics import ScoreBoard, batch_counts
from .models import IMAGENET_MEAN, IMAGENET_STD, build_model
from .stages import Stage, capped_indices, plan_stages


class TrainError(HistodgError):
    """Training cannot start or had to stop."""


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_runtime(cfg: TrainConfig) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(cfg.out_dir, "--device cuda asked for, but no CUDA GPU is available")
    device = torch.device(f"cuda:{local}" if want == "cuda" and world > 1 else want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    on_gpu = device.type == "cuda"
    amp = cfg.amp == "on" or (cfg.amp == "auto" and on_gpu)
    amp_dtype = torch.bfloat16 if amp else None
    cl = cfg.channels_last == "on" or (cfg.channels_last == "auto" and on_gpu)
    return Runtime(device, amp_dtype, cl, rank, world, local)


def _quiet_worker(_worker_id: int) -> None:
    """Data workers only read and decompress: one torch thread each, so they never fight the
    training threads for cores (OpenMP spin-waits make oversubscription very slow)."""
    torch.set_num_threads(1)


def default_workers() -> int:
    return max(0, min(4, (os.cpu_count() or 1) - 1))


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


@dataclass
class Callbacks:
    """Hooks for a live view (the CLI) and for tests; all optional."""

    on_stage_start: object = None  # (stage, model, steps_total) -> None
    on_step: object = None  # (dict) -> None
    on_epoch: object = None  # (record dict) -> None


@dataclass
class _State:
    stage: int = 0
    epoch: int = 0  # next epoch to run within `stage`
    global_step: int = 0
    best: float = -1.0
    history: list = field(default_factory=list)
    optimizer: dict | None = None
    scheduler: dict | None = None
    method_extra: dict | None = None
    rng: dict | None = None


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, overwrite: bool = False, callbacks: Callbacks | None = None):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.resume = resume
        self.overwrite = overwrite
        self.cb = callbacks or Callbacks()

    # -- set-up --------------------------------------------------------------------------------
    def _prepare_dir(self, rt: Runtime) -> _State:
        last = self.out / "last.pt"
        if self.resume:
            if not last.is_file():
                raise TrainError(self.out, "nothing to resume: no last.pt here")
            ckpt = load_checkpoint(last)
            st = _State(**{k: ckpt[k] for k in ("stage", "epoch", "global_step", "best", "history")})
            st.optimizer, st.scheduler = ckpt.get("optimizer_state"), ckpt.get("scheduler_state")
            st.method_extra, st.rng = ckpt.get("method_state"), ckpt.get("rng")
            self._resume_model_state = ckpt["model_state"]
            if ckpt.get("done"):
                raise TrainError(self.out, "this run is finished (result.json); nothing to resume")
            return st
        if (self.out / "config.json").exists() or last.exists():
            if not self.overwrite:
                raise TrainError(self.out, "a run exists here: use --resume to continue it or --overwrite to start again")
            if rt.main:
                for name in ("last.pt", "best.pt", "metrics.jsonl", "config.json", "result.json", "curves.png"):
                    (self.out / name).unlink(missing_ok=True)
                for p in self.out.glob("stage*.pt"):
                    p.unlink()
        return _State()

    def run(self) -> dict:
        cfg = self.cfg
        rt = resolve_runtime(cfg)
        stores = load_stores(cfg.stores)  # every store checked before anything trains
        stages = plan_stages(stores, cfg.stage_axes, cfg.val_domains, cfg.val_fraction, cfg.seed)
        labels = label_set(stores)
        classes = 1 if len(labels) <= 2 else max(labels) + 1
        task = SegTask(classes=classes, loss=cfg.loss)
        if rt.main:
            self.out.mkdir(parents=True, exist_ok=True)
        st = self._prepare_dir(rt)
        if rt.world > 1:
            torch.distributed.barrier()  # every rank has looked at the folder before rank 0 writes
        torch.manual_seed(cfg.seed + rt.rank)
        np.random.seed(cfg.seed + rt.rank)
        model = build_model(cfg.arch, cfg.encoder, cfg.encoder_weights, classes)
        if self.resume:
            model.load_state_dict(self._resume_model_state)
        model.to(rt.device)
        if rt.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model_config = {
            "arch": cfg.arch, "encoder": cfg.encoder, "classes": classes, "labels": {str(k): v for k, v in labels.items()},
            "mpp": stores[0].mpp, "tile_size": stores[0].tile_size,
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "method": cfg.method, "hparams": dict(cfg.hparams), "loss": cfg.loss,
        }
        resolved = {**cfg.to_dict(), "resolved": {
            "model": self.model_config, "device": str(rt.device), "amp": str(rt.amp_dtype), "channels_last": rt.channels_last,
            "world_size": rt.world, "stores": [str(s.path) for s in stores], "stages": [s.summary() for s in stages]}}
        if rt.main:
            write_json_atomic(self.out / "config.json", resolved)
            self._rewrite_metrics(st.history)
        for stage in stages[st.stage:]:
            self._run_stage(stage, len(stages), model, task, rt, st)
            st.stage, st.epoch, st.optimizer, st.scheduler, st.method_extra = stage.index + 1, 0, None, None, None
            if rt.main:
                save_checkpoint(self.out / f"stage{stage.index + 1}.pt", self._payload(model, st, final=False, light=True))
                save_checkpoint(self.out / "last.pt", self._payload(model, st, final=False))
        result = self._finish(model, stages, st, rt)
        if rt.world > 1:
            torch.distributed.barrier()
        return result

    # -- one stage -------------------------------------------------------------------------------
    def _run_stage(self, stage: Stage, n_stages: int, model, task, rt: Runtime, st: _State) -> None:
        cfg = self.cfg
        domains = stage.domain_names
        normalizer = Normalizer(IMAGENET_MEAN, IMAGENET_STD, rt.device, rt.channels_last)
        hp = parse_hparams(METHODS[cfg.method], cfg.hparams)
        method = METHODS[cfg.method](model, len(domains), hp, task=task, normalizer=normalizer).to(rt.device)
        if rt.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            method.net = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        if st.method_extra:
            method.load_state_dict({**{f"model.{k}": v for k, v in model.state_dict().items()}, **st.method_extra})
        parts = [p for d in domains for p in stage.train[d]]
        dataset = PatchDataset(parts, augment=cfg.augment)
        bounds = np.cumsum([0] + [sum(len(p) for p in stage.train[d]) for d in domains])
        domain_indices = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(domains))]
        per_step = cfg.batch_size * len(domains) * cfg.accumulate * rt.world
        spe = cfg.steps_per_epoch or max(1, math.ceil(len(dataset) / per_step))
        total = cfg.steps if cfg.steps is not None else cfg.total_epochs * spe
        n_epochs = math.ceil(total / spe)
        warmup = int(cfg.warmup * total)
        optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=cfg.lr,
                                      weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
        if st.optimizer is not None:
            optimizer.load_state_dict(st.optimizer)
            scheduler.load_state_dict(st.scheduler)
        if st.rng is not None:
            set_rng_state(st.rng)
            st.rng = None
        if self.cb.on_stage_start:
            self.cb.on_stage_start(stage, model, total)
        for epoch in range(st.epoch, n_epochs):
            steps = min(spe, total - epoch * spe)
            t0 = time.perf_counter()
            train_logs = self._train_epoch(method, optimizer, scheduler, dataset, domain_indices, domains, steps, epoch,
                                           stage, normalizer, rt, st)
            seconds = time.perf_counter() - t0
            record = {"stage": stage.index + 1, "stage_axis": stage.axis, "epoch": epoch + 1, "epochs": n_epochs,
                      "step": st.global_step, "lr": scheduler.get_last_lr()[0], **train_logs,
                      "images_per_s": steps * per_step / seconds, "seconds": seconds}
            if rt.main:
                record["val"] = self.evaluate(model, stage.val, normalizer, rt, task)
                record["heldout"] = self.evaluate(model, stage.heldout, normalizer, rt, task)
                # no validation split: the last epoch is the best one
                score = record["val"]["mean_domain_dice_pixels"] if stage.val else float(epoch)
                final_stage = stage.index == n_stages - 1
                st.history.append(record)
                st.epoch = epoch + 1
                st.optimizer, st.scheduler = optimizer.state_dict(), scheduler.state_dict()
                st.method_extra = {k: v for k, v in method.state_dict().items() if not k.startswith("model.")}
                if final_stage and score > st.best:
                    st.best = score
                    record["best"] = True
                    save_checkpoint(self.out / "best.pt", self._payload(model, st, final=False, light=True, record=record))
                save_checkpoint(self.out / "last.pt", self._payload(model, st, final=False))
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                if self.cb.on_epoch:
                    self.cb.on_epoch(record)
            else:
                st.epoch = epoch + 1
            if rt.world > 1:
                torch.distributed.barrier()
        method.close()

    def _train_epoch(self, method, optimizer, scheduler, dataset, domain_indices, domains, steps, epoch, stage,
                     normalizer, rt: Runtime, st: _State) -> dict:
        cfg = self.cfg
        method.train()
        sampler = BalancedBatchSampler(domain_indices, cfg.batch_size, steps * cfg.accumulate,
                                       seed=cfg.seed + 1000 * stage.index, epoch=epoch, rank=rt.rank, augment=cfg.augment)
        gen = torch.Generator().manual_seed(cfg.seed)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=collate,
                            pin_memory=rt.device.type == "cuda", generator=gen, worker_init_fn=_quiet_worker,
                            persistent_workers=False, prefetch_factor=4 if cfg.workers else None)
        jitter_gen = torch.Generator()
        amp = torch.autocast(rt.device.type, dtype=rt.amp_dtype) if rt.amp_dtype else nullcontext()
        losses, micro = [], 0
        n_dom, b = len(domains), cfg.batch_size
        optimizer.zero_grad(set_to_none=True)
        for images, masks in loader:
            images = images.to(rt.device, non_blocking=True)
            masks = masks.to(rt.device, non_blocking=True)
            x = images.float()
            if cfg.augment and cfg.jitter > 0:
                jitter_gen.manual_seed(cfg.seed * 1_000_003 + st.global_step * 97 + micro)
                x = color_jitter(x, jitter_gen, cfg.jitter)
            x = normalizer(x)
            batches = [(x[i * b:(i + 1) * b], masks[i * b:(i + 1) * b]) for i in range(n_dom)]
            last_micro = (micro + 1) % cfg.accumulate == 0
            sync = nullcontext() if (last_micro or rt.world == 1) else method.net.no_sync()
            with sync:
                with amp:
                    loss, logs = method.loss(batches)
                if not torch.isfinite(loss):
                    self._nan(logs, domains, stage, st)
                (loss / cfg.accumulate).backward()
            micro += 1
            losses.append(float(logs.get("loss", loss.item())))
            if last_micro:
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                method.end_of_step()
                st.global_step += 1
                if self.cb.on_step:
                    self.cb.on_step({"stage": stage.index + 1, "epoch": epoch + 1, "step": st.global_step,
                                     "images": n_dom * b * cfg.accumulate * rt.world,
                                     "loss": losses[-1], "lr": scheduler.get_last_lr()[0], **{
                                         k: v for k, v in logs.items() if isinstance(v, float)}})
        out = {"train_loss": float(np.mean(losses)) if losses else float("nan")}
        extra = [k for k in logs if isinstance(logs[k], float) and k != "loss"] if losses else []
        for k in extra:
            out[f"train_{k}"] = float(logs[k])
        return out

    def _nan(self, logs, domains, stage, st):
        dl = logs.get("domain_losses") or []
        bad = [domains[i] for i, v in enumerate(dl) if not math.isfinite(v)]
        where = f"batch of domain {', '.join(bad)}" if bad else "batch of every domain"
        raise TrainError(self.out, f"loss is not finite at stage {stage.index + 1} ({stage.axis}), step {st.global_step + 1}, "
                                   f"{where}; stopped, last.pt (end of the previous epoch) is intact")

    # -- validation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, parts_by_domain: dict, normalizer, rt: Runtime, task) -> dict:
        """Dice/IoU per domain on at most `val_max_patches` patches each."""
        if not parts_by_domain:
            return {}
        was = model.training
        model.eval()
        board = ScoreBoard()
        amp = torch.autocast(rt.device.type, dtype=rt.amp_dtype) if rt.amp_dtype else nullcontext()
        bs = max(8, 2 * self.cfg.batch_size)
        for domain, parts in parts_by_domain.items():
            ds = PickDataset(capped_indices(parts, self.cfg.val_max_patches))
            loader = DataLoader(ds, batch_size=bs, collate_fn=collate, num_workers=self.cfg.workers,
                                pin_memory=rt.device.type == "cuda", worker_init_fn=_quiet_worker)
            for images, masks in loader:
                x = normalizer(images.to(rt.device).float())
                with amp:
                    logits = model(x)
                pred = logits[:, 0] > 0 if task.binary else logits.argmax(1)
                board.add_batch(domain, *batch_counts(pred, masks.to(rt.device)))
        model.train(was)
        table = board.table()
        table["mean_domain_dice_pixels"] = float(np.mean([d["dice_pixels"] for d in table["domains"].values()]))
        return table

    # -- output --------------------------------------------------------------------------------
    def _payload(self, model, st: _State, final: bool, light: bool = False, record: dict | None = None) -> dict:
        p = {"model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "model_config": self.model_config, "train_config": self.cfg.to_dict(),
             "stage": st.stage, "epoch": st.epoch, "global_step": st.global_step, "best": st.best, "done": final}
        if record is not None:
            p["metrics"] = record
        if not light:
            p.update({"optimizer_state": st.optimizer, "scheduler_state": st.scheduler, "method_state": st.method_extra,
                      "rng": rng_state(), "history": st.history})
        return p

    def _rewrite_metrics(self, history: list) -> None:
        tmp = self.out / "metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
        os.replace(tmp, self.out / "metrics.jsonl")

    def _finish(self, model, stages, st: _State, rt: Runtime) -> dict:
        checks = [params_checksum(model)]
        if rt.world > 1:
            gathered = [None] * rt.world
            torch.distributed.all_gather_object(gathered, checks[0])
            checks = gathered
        if not rt.main:
            return {}
        last = st.history[-1] if st.history else {}
        if not (self.out / "best.pt").exists():
            save_checkpoint(self.out / "best.pt", self._payload(model, st, final=True, light=True, record=last))
        result = {"run_dir": str(self.out), "stages": [s.summary() for s in stages], "epochs_run": len(st.history),
                  "global_step": st.global_step, "final": last,
                  "best_val_dice": st.best if any(s.val for s in stages) else None,
                  "world_size": rt.world, "param_checksums": checks}
        save_checkpoint(self.out / "last.pt", {**self._payload(model, st, final=True)})
        write_json_atomic(self.out / "result.json", result)
        try:
            from .curves import plot_curves

            plot_curves(st.history, self.out / "curves.png")
        except Exception as exc:  # a plot must never fail a finished run
            (self.out / "curves.error.txt").write_text(str(exc))
        return result


def clear_run(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
