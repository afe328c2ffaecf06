"""Self-describing checkpoints: everything `predict` needs, and everything `--resume` needs.

    ckpt = load_checkpoint("runs/a/best.pt")
    model, config = model_from_checkpoint(ckpt)     # no download: weights come from the file

A checkpoint is a dict: `format`, `version`, `histodg_version`, `model_state`, `model_config`
(a `ModelConfig` as plain data) and, in `last.pt`, what the trainer needs to continue exactly
(optimizer, scheduler, RNG states, stage, epoch, step). It holds tensors and plain data only
(`safe_load.plain_data`), and is read as data (`safe_load.read_torch_file`): a checkpoint from
elsewhere cannot run code. Files are written to a temporary name and renamed, so a killed run
never leaves a half-written checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import HistodgError, __version__, exc_line
from ..files import atomic_write
from .config import ModelConfig
from .safe_load import plain_data, read_torch_file

FORMAT = "histodg-checkpoint"
VERSION = 1


class CheckpointError(HistodgError):
    """A checkpoint is missing, unreadable or not histodg's."""


@dataclass
class Payload:
    """What a checkpoint holds, built in one place for the trainer (best.pt, stageN.pt, last.pt) and
    `histodg adapt` (its best.pt): the weights, the model contract, the training config, where in
    training it was made, and for a resumable last.pt `resume` (optimizer_state, scheduler_state,
    method_state, rng, history)."""

    model_state: dict
    model_config: ModelConfig
    train_config: dict | None
    stage: int | None
    epoch: int | None
    global_step: int
    best: float | None
    done: bool | None = None  # training finished (None: not a training checkpoint, an adapted one)
    metrics: dict | None = None  # best.pt: the validation record it was chosen by
    resume: dict | None = None

    def to_dict(self) -> dict:
        p = {"model_state": self.model_state, "model_config": self.model_config, "train_config": self.train_config,
             "stage": self.stage, "epoch": self.epoch, "global_step": self.global_step, "best": self.best}
        if self.done is not None:
            p["done"] = self.done
        if self.metrics is not None:
            p["metrics"] = self.metrics
        return {**p, **(self.resume or {})}


def save_checkpoint(path: Path, payload: dict | Payload) -> None:
    if isinstance(payload, Payload):
        payload = payload.to_dict()
    payload = {"format": FORMAT, "version": VERSION, "histodg_version": __version__, **payload}
    if isinstance(payload.get("model_config"), ModelConfig):
        payload["model_config"] = payload["model_config"].to_dict()
    payload = plain_data(payload)
    try:
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as a RuntimeError
        reason = exc_line(exc)
        raise CheckpointError(path, f"cannot be written ({reason}; is the disk full?); the previous "
                                    f"{Path(path).name}, if any, is unchanged") from None


def load_checkpoint(path) -> dict:
    """A histodg checkpoint, read as data onto the CPU (`CheckpointError` for anything else)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found")
    ckpt = read_torch_file(path, CheckpointError, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(path, "not a histodg checkpoint (train one with `histodg train`)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(path, f"checkpoint version {ckpt.get('version')}, this histodg reads {VERSION}")
    return ckpt


def checkpoint_config(ckpt: dict, path="checkpoint") -> ModelConfig:
    try:
        return ModelConfig.from_dict(ckpt["model_config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"no usable model description ({exc})") from None


def model_from_checkpoint(ckpt: dict, path="checkpoint"):
    """(model with the checkpoint's weights, its ModelConfig)."""
    from .build import build_model
    from .domain_bn import load_model_state

    mc = checkpoint_config(ckpt, path)
    try:
        model = build_model(mc.arch, mc.encoder, "none", mc.classes)
        load_model_state(model, ckpt["model_state"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(path, f"cannot rebuild the model ({exc_line(exc)})") from None
    except HistodgError as exc:  # an architecture or encoder this smp does not know: name the file too
        raise CheckpointError(path, f"cannot rebuild the model: {exc}") from None
    return model, mc
