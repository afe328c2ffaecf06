"""Leave-one-domain-out cross-validation (`histodg train --cv`).

For each training domain of the last stage, a run holds that domain out and trains on the
others; the fold's score is the held-out domain's Dice at the end of training (no model
selection on the held-out domain). With `--pretrain A --finetune B` the pretraining stage is
trained once (RUN_DIR/cv/_pretrain) and every fold fine-tunes from it with a fresh optimizer,
which is what a two-stage run does. Results: RUN_DIR/cv/<domain>/ (a full run each; the domain's name made a safe folder name, `fold_folders`) and
RUN_DIR/cv_summary.json with each fold's Dice and IoU, their mean and standard deviation.
Finished folds (result.json present) are skipped when the command is run again.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from ..files import safe_name, write_json_atomic
from ..locks import run_lock
from .config import TrainConfig
from .data import load_stores
from .splits import default_axis, group, heldout_stores
from .state import launch_rank
from .trainer import Callbacks, Trainer, TrainError


def cv_domains(cfg: TrainConfig) -> tuple[str, list[str]]:
    stores = load_stores(cfg.stores)
    held = {s.path for ss in heldout_stores(stores, cfg.val_domains).values() for s in ss}
    usable = [s for s in stores if s.path not in held]
    axis = cfg.stage_axes[-1] or default_axis(usable)
    names = list(group(usable, axis))
    if len(names) < 2:
        raise TrainError(cfg.out_dir, f"--cv needs at least 2 domains on the {axis} axis (found {len(names)})")
    return axis, names


def run_cv(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, callbacks: Callbacks | None = None,
           on_fold=None) -> dict:
    """Every fold (one writer of RUN_DIR at a time: another live `--cv` run into it is refused).
    Under torchrun every rank trains every fold and rank 0 alone writes; all return the summary."""
    main = launch_rank() == 0
    with run_lock(Path(cfg.out_dir), TrainError, callbacks and callbacks.on_note) if main else nullcontext():
        return _run_folds(cfg, resume, overwrite, callbacks, on_fold, main)


def _run_folds(cfg: TrainConfig, resume: bool, overwrite: bool, callbacks, on_fold, main: bool) -> dict:
    out = Path(cfg.out_dir)
    axis, names = cv_domains(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if main and (overwrite or not (out / "config.json").exists()):
        write_json_atomic(out / "config.json", cfg.to_dict())  # `histodg train -o RUN_DIR --resume` needs no more
    base = cfg
    if cfg.pretrain:
        pre = cfg.replace(out_dir=str(out / "cv" / "_pretrain"), pretrain=None, finetune=None, domains=cfg.pretrain, cv=False)
        _run_once(pre, resume, overwrite, callbacks)
        union = cfg.finetune == "union"
        base = cfg.replace(pretrain=None, finetune=None, domains=None if union else cfg.finetune, union=union,
                           encoder_weights=str(out / "cv" / "_pretrain" / "last.pt"))
    folds = {}
    for name, folder in fold_folders(names, out / "cv").items():
        fold_cfg = base.replace(out_dir=str(out / "cv" / folder), val_domains=tuple(cfg.val_domains) + (name,), cv=False)
        result = _run_once(fold_cfg, resume, overwrite, callbacks)
        scores = result["final"]["heldout"]["domains"][name]
        folds[name] = {"dice": scores["dice"], "iou": scores["iou"], "dice_pixels": scores["dice_pixels"],
                       "run_dir": fold_cfg.out_dir}
        if on_fold:
            on_fold(name, folds[name])
    dice = np.array([f["dice"] for f in folds.values()])
    iou = np.array([f["iou"] for f in folds.values()])
    summary = {"axis": axis, "folds": folds, "dice_mean": float(dice.mean()), "dice_std": float(dice.std()),
               "iou_mean": float(iou.mean()), "iou_std": float(iou.std()), "pretrain": cfg.pretrain}
    if main:
        write_json_atomic(out / "cv_summary.json", summary)
    return summary


def fold_folders(names: list[str], cv_dir: Path | None = None) -> dict[str, str]:
    """Each domain's fold folder under RUN_DIR/cv: its name made a safe path component (domain
    names come from store attributes and manifests, so `../x` or `/abs` must not leave the run
    folder), `_pretrain` kept for the pretraining stage, and names that clash numbered. A fold
    folder an earlier histodg made under the name as it was (`cv/Aperio GT450`) is kept, when
    that name is one plain folder name, so `--resume` finds its finished folds."""
    folders: dict[str, str] = {}
    for name in names:
        plain = name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name
        if cv_dir is not None and plain and (cv_dir / name).is_dir() and not (cv_dir / name).is_symlink():
            folders[name] = name
            continue
        base = safe_name(name, "domain")
        folder, k = base, 2
        while folder in folders.values():  # never `_pretrain`: safe_name strips leading `_`
            folder, k = f"{base}-{k}", k + 1
        folders[name] = folder
    return folders


def _run_once(cfg: TrainConfig, resume: bool, overwrite: bool, callbacks) -> dict:
    out = Path(cfg.out_dir)
    done = out / "result.json"
    if done.is_file() and not overwrite:
        return json.loads(done.read_text())
    can_resume = resume and (out / "last.pt").is_file()
    result = Trainer(cfg, resume=can_resume, overwrite=overwrite, callbacks=callbacks).run()
    # another rank than 0 gets nothing back: rank 0 wrote result.json before the run's last barrier
    return result or json.loads(done.read_text())
