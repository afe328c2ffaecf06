"""One `histodg adapt` run: a trained checkpoint fitted to a target domain without its labels.

    result = adapt(AdaptConfig(checkpoint="runs/a/best.pt", source=("stores/",), target=("new/",),
                               out_dir="runs/a-new"))

Every step takes `batch_size` labelled source patches and as many target patches (flipped and
rotated at random, the same seed giving the same run). The global part re-styles the source
patches to the target (`styles`) and they are trained with their labels; the local part sends
the target patches through the model too and adds the masked alignment of the two batches'
encoder features (`align`); the self-training part (`self_train=true`, off by default) trains
the model on a strong view of the target patches against a mean teacher's confident
pseudo-labels (`self_training`). AdamW with cosine decay from `lr`. At the end (`bn=true`) every
BatchNorm layer's statistics are re-estimated on target patches, the domain-shift reference
is made again (the source domains and the target), and RUN_DIR gets `best.pt`, an ordinary
checkpoint for `histodg predict`, then `result.json` (written last: a folder without it is
unfinished, and a rerun starts it again). `result.json` records the measurable effect:
`target_bn_gap`, the mean divergence between the BatchNorm layers' statistics and the
statistics of what they see on the target patches, before and after.

A DSBN model (`--method dsbn`, the default; `model.domain_bn`) is adapted as it was trained: each
source patch goes through its organ's or scanner's BatchNorm slot (a source domain without one,
and the target, through the shared slot), the shared slot is the slots' mixture again after the
steps, and with `bn=true` the shared slot's statistics are the target's and each slot's those of
its own source patches under the adapted weights, so source slides are predicted as well as
before. `histodg predict` still predicts a slide of the target (a domain without a slot) through
the shared slot with the slide's own statistics, as it does for any DSBN model.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ..constants import UNKNOWN
from ..domains import Domain
from ..files import file_sha256, write_json_atomic, write_text_atomic
from ..locks import run_lock
from ..model.checkpoint import Payload, checkpoint_config, load_checkpoint, model_from_checkpoint, save_checkpoint
from ..model.domain_bn import sync_shared
from ..model.normalize import Normalizer
from .align import FeatureTap, masked_alignment
from .batchnorm import bn_gap, patch_batches, reestimate_batchnorm
from .config import AdaptConfig
from .styles import MOSAIC, Restyler, fit_target_stain
from .targets import AdaptError, target_stores

BN_PATCHES = 256  # target patches the final BatchNorm statistics come from


class Patches:
    """Random patches (and masks) of a list of stores, read straight from zarr."""

    def __init__(self, stores, masks: bool):
        from ..store import open_store

        self.stores = [open_store(s.path) for s in stores]
        self.sizes = np.array([len(s) for s in self.stores])
        self.bounds = np.cumsum(self.sizes)
        self.masks = masks

    def store_of(self, flat: np.ndarray) -> np.ndarray:
        """The store each flat index is in."""
        return np.searchsorted(self.bounds, flat, side="right")

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def get(self, flat: np.ndarray):
        images, masks = [], []
        for i in flat:
            k = int(np.searchsorted(self.bounds, i, side="right"))
            j = int(i - (self.bounds[k - 1] if k else 0))
            images.append(np.asarray(self.stores[k].images[j]))
            if self.masks:
                masks.append(np.asarray(self.stores[k].masks[j]))
        return np.stack(images), (np.stack(masks) if self.masks else None)

    def spread(self, n: int, stores=None) -> np.ndarray:
        """`n` indices evenly spread over every patch (or over the patches of the `stores`, by index)."""
        pool = np.arange(len(self)) if stores is None else np.concatenate(
            [np.arange(self.bounds[k] - self.sizes[k], self.bounds[k]) for k in stores] or [np.zeros(0, int)])
        return pool[np.unique(np.linspace(0, len(pool) - 1, min(n, len(pool))).round().astype(int))]


def _slots(stores, names) -> np.ndarray:
    """For a DSBN model (`names`: its slots' domains), each store's slot: its organ's or scanner's
    (as `predict` chooses), -1 for the shared one."""
    slots = (Domain.of(s.attrs).slot(names) for s in stores)
    return np.array([-1 if k is None else k for k in slots], dtype=int)


def _routed(model, x: torch.Tensor, slots: np.ndarray | None, tap=None):
    """(model(x), the tapped features of x or None). With `slots` (one per image, sorted) each run
    of equal slots goes through its domain's BatchNorm (-1: the shared one), as in DSBN's
    training, and the features of the runs are put back together."""
    from ..model.domain_bn import domain

    if slots is None:
        out = model(x)
        return out, (tap.take() if tap is not None else None)
    outs, feats = [], []
    for k in np.unique(slots):
        a, b = np.searchsorted(slots, k), np.searchsorted(slots, k, side="right")
        with domain(model, int(k)) if k >= 0 else nullcontext():
            outs.append(model(x[a:b]))
        if tap is not None:
            feats.append(tap.take())
    return torch.cat(outs), ([torch.cat(f) for f in zip(*feats)] if tap is not None else None)


def _flip(x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator):
    """The same random flip and rot90 for a whole batch (NCHW images, NHW masks)."""
    k, flip = int(torch.randint(0, 4, (1,), generator=gen)), bool(torch.randint(0, 2, (1,), generator=gen))
    x = torch.rot90(x, k, (2, 3))
    x = x.flip(3) if flip else x
    if y is not None:
        y = torch.rot90(y, k, (1, 2))
        y = y.flip(2) if flip else y
    return x, y


def _domain_of(stores, fallback: str) -> str:
    names = {Domain.of(s.attrs).name(first="scanner") for s in stores}  # adapt's order (`domains`)
    names.discard(UNKNOWN)
    return names.pop() if len(names) == 1 else fallback


def _prepare(cfg: AdaptConfig):
    from ..device import resolve_device
    from ..training.data import load_stores

    out = Path(cfg.out_dir)
    if (out / "result.json").exists() and not cfg.overwrite:
        raise AdaptError(out, "an adapted model is here already (result.json): use --overwrite to make it again")
    ckpt = load_checkpoint(cfg.checkpoint)
    model, mc = model_from_checkpoint(ckpt, cfg.checkpoint)
    if mc.mpp is None or mc.tile_size is None:
        raise AdaptError(cfg.checkpoint, "the checkpoint records no resolution or tile size")
    source = load_stores(list(cfg.source))
    out.mkdir(parents=True, exist_ok=True)
    target = load_stores([str(p) for p in target_stores(cfg.target, out, mc.mpp, mc.tile_size, cfg.target_mpp)], require_masks=False)
    for s in (*source, *target):
        if s.attrs.tile_size != mc.tile_size or abs(s.attrs.mpp / mc.mpp - 1) > 0.02:
            raise AdaptError(s.path, f"patches are {s.attrs.tile_size} px at {s.attrs.mpp:g} um/px; the model was "
                                     f"trained on {mc.tile_size} px at {mc.mpp:g} um/px: tile it alike")
    device = resolve_device(cfg.device, "--device", AdaptError)
    return ckpt, model.to(device), mc, source, target, device


def adapt(cfg: AdaptConfig, on_step=None, on_note=None) -> dict:
    """Run `cfg`; returns what result.json says. One writer per run folder: another live `histodg
    adapt` into it is refused (`AdaptError`); `on_note(line)` hears of a stale lock taken over."""
    with run_lock(Path(cfg.out_dir), AdaptError, on_note):
        return _adapt(cfg, on_step)


def _adapt(cfg: AdaptConfig, on_step=None) -> dict:
    t0 = time.perf_counter()
    hp = cfg.settings
    ckpt, model, mc, source_refs, target_refs, device = _prepare(cfg)
    out = Path(cfg.out_dir)
    write_json_atomic(out / "config.json", {**cfg.to_dict(), "settings": hp.to_dict()})
    torch.manual_seed(cfg.seed)
    norm = mc.normalization
    normalizer = Normalizer(norm.mean, norm.std, device, stain=norm.stain)
    source, target = Patches(source_refs, masks=True), Patches(target_refs, masks=False)
    probe = torch.from_numpy(target.get(target.spread(64))[0]).permute(0, 3, 1, 2).to(device)
    gap_before = bn_gap(model, normalizer(probe))
    log = _train(cfg, model, mc, normalizer, source, target, device, on_step)
    if mc.domain_bn:
        sync_shared(model)  # the shared slot: the mixture of the adapted domain slots, as DSBN leaves it
    if hp.bn:
        reestimate_batchnorm(model, normalizer, target, BN_PATCHES, cfg.batch_size, device)
        if mc.domain_bn:
            _reestimate_slots(model, normalizer, source, mc.domain_bn, cfg.batch_size, device)
    model.eval()
    gap_after = bn_gap(model, normalizer(probe))
    domain = _domain_of(target_refs, "target")
    record = {"from": str(Path(cfg.checkpoint).resolve()), "from_sha256": file_sha256(cfg.checkpoint),
              "target_domain": domain, "target_stores": [str(s.path) for s in target_refs],
              "settings": hp.to_dict(), "steps": cfg.steps}
    new_mc = mc.replace(shift=_shift_reference(model, normalizer, source_refs, target_refs, domain, mc, device),
                        adaptation=record)
    save_checkpoint(out / "best.pt", Payload(model.state_dict(), new_mc, ckpt.get("train_config"), ckpt.get("stage"),
                                             ckpt.get("epoch"), cfg.steps, None))
    checkpoint_config(load_checkpoint(out / "best.pt"), out / "best.pt")  # it reads back
    write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in log))
    result = {"run_dir": str(out), "checkpoint": str(out / "best.pt"), **record,
              "target_bn_gap": {"before": gap_before, "after": gap_after},
              "final": log[-1] if log else {}, "seconds": time.perf_counter() - t0}
    write_json_atomic(out / "result.json", result)
    return result


def _restyler(hp, target: Patches, device):
    """The global part's re-styling to the target (None: the part is off)."""
    if not hp.global_:
        return None
    stain = None if hp.style == "fda" else fit_target_stain(hp.style, list(target.get(target.spread(MOSAIC))[0]))
    return Restyler(hp.style, hp.global_p, hp.beta, stain, device)


def _teacher(hp, model, mc):
    """The self-training part's (mean teacher, strong-view settings), or (None, None) when it is off.
    Made before the feature taps: the teacher is a plain copy of the model."""
    if not hp.self_train:
        return None, None
    from ..training.augment import resolve_augment
    from .self_training import MeanTeacher

    return MeanTeacher(model, hp.ema, hp.threshold, own_statistics=bool(mc.domain_bn)), resolve_augment(hp.self_augment)


def _train(cfg: AdaptConfig, model, mc, normalizer, source: Patches, target: Patches, device, on_step) -> list[dict]:
    """The adaptation steps; one log record per step."""
    hp = cfg.settings
    from ..training.methods.base import SegTask, seg_loss
    from ..training.state import optimizer_and_schedule

    rng, gen = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    restyler, (teacher, strong) = _restyler(hp, target, device), _teacher(hp, model, mc)
    task = SegTask(classes=mc.classes, loss=mc.loss)
    opt, sched = optimizer_and_schedule(model, cfg.lr, cfg.weight_decay, cfg.steps)  # training's recipe, no warm-up
    tap, log = FeatureTap(model), []
    by_store = _slots(source.stores, mc.domain_bn) if mc.domain_bn else None
    model.train()
    try:
        for step in range(cfg.steps):
            pick, slots = rng.integers(0, len(source), cfg.batch_size), None
            if by_store is not None:  # a DSBN model: each source patch through its domain's BatchNorm
                slots = by_store[source.store_of(pick)]
                order = np.argsort(slots, kind="stable")
                pick, slots = pick[order], slots[order]
            xs, ys = source.get(pick)
            xt, _ = target.get(rng.integers(0, len(target), cfg.batch_size))
            xs, ys = _flip(torch.from_numpy(xs).permute(0, 3, 1, 2).to(device).float(), torch.from_numpy(ys).to(device), gen)
            xt, _ = _flip(torch.from_numpy(xt).permute(0, 3, 1, 2).to(device).float(), None, gen)
            if restyler is not None:
                xs = restyler(xs, xt, gen)
            logits, fs = _routed(model, normalizer(xs), slots, tap)
            seg = seg_loss(logits, ys, task)
            loss, logs = seg, {"step": step + 1, "seg_loss": float(seg.detach())}
            if hp.local:
                model(normalizer(xt))  # the target: an unknown domain, through the shared BatchNorm
                local, gaps = masked_alignment(fs, tap.take(), hp.mask_ratio)
                loss = loss + hp.local_weight * local
                logs.update(local_loss=float(local.detach()), feature_gap=float(np.mean(gaps)))
            if teacher is not None:  # the target through the shared BatchNorm, as an unknown domain
                own, share = teacher.student_loss(model, xt, normalizer, task, strong, gen)
                loss = loss + hp.self_weight * own
                logs.update(self_loss=float(own.detach()), pseudo_share=share)
            if not math.isfinite(float(loss.detach())):
                raise AdaptError(cfg.out_dir, f"the loss is not finite at step {step + 1}; no checkpoint was written "
                                              f"(try a lower --lr)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if teacher is not None:
                teacher.update(model)
            log.append(logs)
            if on_step:
                on_step(logs, cfg.steps)
    finally:
        tap.remove()
    return log


def _reestimate_slots(model, normalizer, source: Patches, names, batch_size: int, device) -> None:
    """A DSBN model: each domain slot's statistics re-estimated on its own source patches with the
    adapted weights (a source slide keeps being predicted through its slot)."""
    from ..model.domain_bn import estimate_slot

    by_store = _slots(source.stores, names)
    for k in range(len(names)):
        idx = source.spread(BN_PATCHES, np.flatnonzero(by_store == k))
        estimate_slot(model, k, patch_batches(normalizer, source, idx, batch_size, device))
    model.eval()


def _shift_reference(model, normalizer, source_refs, target_refs, target_domain: str, mc, device):
    """The domain-shift reference of the adapted weights: the source domains and the target."""
    from ..training.data import Part
    from ..training.shift_reference import shift_reference
    from ..training.splits import Stage

    train: dict[str, list] = {}
    for s in source_refs:
        name = Domain.of(s.attrs).name(first="scanner")
        train.setdefault(name if name != UNKNOWN else "source", []).append(Part(s, 0, s.n))
    train[target_domain] = [Part(s, 0, s.n) for s in target_refs]
    from ..device import resolve_placement

    stage = Stage(0, "union", train, {}, {})  # the source domains and the target, as one stage's training domains
    return shift_reference(model, normalizer, [stage], device, domain_bn=mc.domain_bn,
                           placement=resolve_placement(device))  # under predict's autocast on this device
