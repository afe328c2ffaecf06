"""The model card of a checkpoint (`histodg info best.pt`): what the model is, what it was trained on
and how well it did, read from the checkpoint alone (as data, never run).

    card = model_card("runs/a/best.pt")      # plain data; `histodg info --json best.pt` prints it

Checkpoints written before `ModelConfig.trained_on` existed have no data section (`trained_on`
None) and no command; the card says "not recorded" for those rather than guessing.
"""
from __future__ import annotations

from pathlib import Path

from ..files import file_sha256
from .checkpoint import checkpoint_config, load_checkpoint


def _validation(metrics: dict | None) -> dict:
    """{"val"|"heldout": {domain: Dice}} of the epoch best.pt was chosen by ({} if none was scored)."""
    out = {}
    for kind in ("val", "heldout"):
        table = (metrics or {}).get(kind) or {}
        domains = table.get("domains") or {}
        if domains:
            out[kind] = {name: round(float(d["dice_pixels"]), 4) for name, d in sorted(domains.items())}
    return out


def _augmentation(aug: dict | None) -> dict | None:
    """The preset and the settings that are on (a zero strength is off)."""
    if not aug:
        return None
    return {k: v for k, v in aug.items() if k == "preset" or (v not in (0, 0.0, False, None))}


def model_card(path) -> dict:
    """Everything `histodg info` shows about a checkpoint, as plain data."""
    ckpt = load_checkpoint(path)
    mc = checkpoint_config(ckpt, path)
    tc = ckpt.get("train_config") or {}
    trained = mc.trained_on or {}
    shift = mc.shift or {}
    return {
        "kind": "model", "path": str(Path(path)), "sha256": file_sha256(path),
        "histodg_version": ckpt.get("histodg_version"),
        "network": {"arch": mc.arch, "encoder": mc.encoder, "encoder_weights": tc.get("encoder_weights"),
                    "classes": mc.classes, "labels": mc.labels},
        "input": {"mpp": mc.mpp, "tile_size": mc.tile_size, "normalization": {
            "mean": list(mc.normalization.mean), "std": list(mc.normalization.std),
            "stain": (mc.normalization.stain or {}).get("method", "none")}},
        "method": {"name": mc.method, "hparams": mc.hparams, "loss": mc.loss, "dsbn_slots": mc.domain_bn,
                   "augmentation": _augmentation(mc.augmentation)},
        "trained_on": {"stores": trained.get("stores", tc.get("stores")), "domains": trained.get("domains"),
                       "held_out": trained.get("held_out"),
                       "stages": [{"axis": s.get("axis"), "train_patches": s.get("train_patches")}
                                  for s in trained.get("stages") or []] or None},
        "training": {"steps": ckpt.get("global_step"), "stage": ckpt.get("stage"), "epoch": ckpt.get("epoch"),
                     "finished": ckpt.get("done"), "lr": tc.get("lr"), "batch_size": tc.get("batch_size"),
                     "seed": tc.get("seed"), "command": trained.get("command")},
        "validation_dice": _validation(ckpt.get("metrics")),
        "shift_reference": sorted(shift.get("domains", {})) or None,
        "adaptation": ({"from": mc.adaptation.get("from"), "target": mc.adaptation.get("target_domain"),
                        "steps": mc.adaptation.get("steps")} if mc.adaptation else None),
    }


MODEL_SUFFIXES = (".pt", ".pth", ".ckpt", ".ts", ".onnx")


def is_model_file(path) -> bool:
    """What `histodg info` reads as a model (a checkpoint or an export), not as a slide."""
    return Path(path).suffix.lower() in MODEL_SUFFIXES and Path(path).is_file()


def describe_model_file(path) -> dict:
    """A checkpoint's card, or the record an exported model (ONNX, TorchScript) carries."""
    from .export import exported_metadata, is_exported

    if is_exported(path):
        return {"kind": "exported", "path": str(Path(path)), **exported_metadata(path)}
    return model_card(path)
