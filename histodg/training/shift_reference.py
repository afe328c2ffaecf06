"""The training domains' description that `predict`'s domain-shift score compares slides with
(`model.shift`), made at the end of training for the weights of each checkpoint it goes into.

Every training store (slide) of every stage gives `PER_STORE` patches, evenly spaced over its
training part, through the model in eval mode (a domain of more than `MAX_STORES` stores, such
as thousands of COSAS images, by `MAX_STORES` of them evenly spaced: the description's cost stays
bounded by the domains, not the images); their encoder-stage moments are pooled per
domain and the stores are scored leave-one-out for the calibration. Deterministic: the same
weights and stores give the same description. The patches go through the model under the
autocast of the run's placement (bf16 on a GPU), as `predict` sends a slide's windows on that
device, so the score has no offset from precision alone; the reference records it
(`precision`). Under DDP every rank describes its share of the stores and rank 0 gathers them.
"""
from __future__ import annotations

import numpy as np
import torch

from ..model.shift import FeatureMeter, Moments, fit_reference

PER_STORE = 32  # patches per training store
MAX_STORES = 64  # stores described per domain: a domain of thousands of small stores (COSAS images) by an even sample
BATCH = 16


def _patch_indices(part, per_store: int) -> np.ndarray:
    n = len(part)
    if n <= per_store:
        return np.arange(part.start, part.stop)
    return part.start + np.unique(np.linspace(0, n - 1, per_store).round().astype(int))


def store_moments(model, normalizer, images, indices, device, placement=None) -> Moments:
    """Encoder-stage moments of the patches `images[indices]` (a store's uint8 (N, T, T, 3) array)."""
    from contextlib import nullcontext

    from ..device import autocast

    meter = FeatureMeter(model)
    try:
        with torch.inference_mode(), autocast(placement) if placement is not None else nullcontext():
            for a in range(0, len(indices), BATCH):
                batch = np.stack([np.asarray(images[int(i)]) for i in indices[a:a + BATCH]])
                x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2)
                model(normalizer(x))
        return meter.take()
    finally:
        meter.remove()


def shift_reference(model, normalizer, stages, device, per_store: int = PER_STORE, domain_bn=None, placement=None,
                    rt=None) -> dict | None:
    """The description of every training domain of `stages`, for the current weights of `model`;
    a DSBN model (`domain_bn`: its slots' domains) describes each domain through its own slot.
    `placement`: the autocast to measure under (None: float32); `rt` (a DDP runtime): every rank
    calls this, each describes every `world`-th store, and all get the whole description."""
    from ..model.domain_bn import domain_context
    from ..store import open_store

    net = getattr(model, "module", model)
    was_training = net.training
    net.eval()
    world, rank = (rt.world, rt.rank) if rt is not None else (1, 0)
    try:
        work = sampled([(domain, part) for stage in stages for domain, parts in stage.train.items() for part in parts])
        mine = []
        for i in range(rank, len(work), world):
            domain, part = work[i]
            images = open_store(part.store.path).images
            with domain_context(net, domain_bn, domain):
                mine.append((i, store_moments(net, normalizer, images, _patch_indices(part, per_store), device, placement)))
        done = dict(_gathered(mine, world) if world > 1 else mine)
        per: dict[str, dict[str, Moments]] = {}
        for i, (domain, part) in enumerate(work):  # pooled in the listed order, whoever measured it
            key, m = str(part.store.path), done[i]
            have = per.setdefault(domain, {})
            have[key] = have[key] + m if key in have else m
        ref = fit_reference(per)
        if ref is not None:
            amp = placement.amp_dtype if placement is not None else None
            ref["precision"] = str(amp).removeprefix("torch.") if amp is not None else "float32"
        return ref
    finally:
        net.train(was_training)

def sampled(work: list, most: int | None = None) -> list:
    """The (domain, part) items of at most `most` (`MAX_STORES`) stores per domain, evenly spaced in
    their order (every part of a chosen store: a store in two stages stays one slide); all of them
    when fewer."""
    most = MAX_STORES if most is None else most
    stores: dict[str, list[str]] = {}
    for domain, part in work:
        keys = stores.setdefault(domain, [])
        if str(part.store.path) not in keys:
            keys.append(str(part.store.path))
    chosen = {d: set(k) if len(k) <= most else {k[int(i)] for i in np.unique(np.linspace(0, len(k) - 1, most).round())}
              for d, k in stores.items()}
    return [(d, part) for d, part in work if str(part.store.path) in chosen[d]]


def _gathered(mine: list, world: int) -> list:
    """Every rank's (index, moments), from every rank (a collective)."""
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, mine)
    return [item for theirs in parts for item in theirs]
