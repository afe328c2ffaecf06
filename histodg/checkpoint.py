"""Self-describing checkpoints: everything `predict` needs, and everything `--resume` needs.

    ckpt = load_checkpoint("runs/a/best.pt")
    model = model_from_checkpoint(ckpt)          # no download: weights come from the file

`model_config` holds arch, encoder, classes, labels, mpp, tile size and normalisation; `last.pt`
adds the optimizer, scheduler, RNG states, stage, epoch and step for an exact resume. Files are
written to a temporary name and renamed, so a killed run never leaves a half-written checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from . import HistodgError, __version__

FORMAT = "histodg-checkpoint"
VERSION = 1


class CheckpointError(HistodgError):
    """A checkpoint is missing, unreadable or not histodg's."""


def save_checkpoint(path: Path, payload: dict) -> None:
    payload = {"format": FORMAT, "version": VERSION, "histodg_version": __version__, **payload}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(path, f"not a readable checkpoint ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(path, "not a histodg checkpoint (train one with `histodg train`)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(path, f"checkpoint version {ckpt.get('version')}, this histodg reads {VERSION}")
    return ckpt


def model_from_checkpoint(ckpt: dict):
    from .models import build_model

    mc = ckpt["model_config"]
    model = build_model(mc["arch"], mc["encoder"], "none", mc["classes"])
    model.load_state_dict(ckpt["model_state"])
    return model


def rng_state() -> dict:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
