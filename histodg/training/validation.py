"""Per-domain Dice and IoU of a model on validation or held-out patches, every epoch."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..device import autocast
from ..evaluation.metrics import ScoreBoard, batch_counts
from ..model.batchnorm import MIN_WINDOWS, adaptation_windows, estimated_statistics
from ..store import open_store
from .data import PickDataset, collate, loaded
from .splits import capped_indices


def quiet_worker(_worker_id: int) -> None:
    """Data workers only read and decompress: one torch thread each, so they never fight the
    training threads for cores (OpenMP spin-waits make oversubscription very slow)."""
    torch.set_num_threads(1)


@dataclass(frozen=True)
class ScoreSettings:
    """How validation scores: a binary (one-logit) or multi-class model, patches per forward pass,
    patches per domain at most, and loader workers."""

    binary: bool
    batch_size: int
    max_patches: int
    workers: int


@torch.no_grad()
def score_domains(model, parts_by_domain: dict, normalizer, runtime, settings: ScoreSettings, route=None,
                  own_statistics=None) -> dict:
    """Dice/IoU per domain on at most `settings.max_patches` patches each (spread evenly over its slides);
    `route(domain)`, if given, is the context each domain is scored in (DSBN's BatchNorm slot);
    where `own_statistics(domain)` is true, each slide of the domain is scored with BatchNorm
    statistics estimated on its own patches with most tissue (as `histodg predict` adapts a slide)."""
    if not parts_by_domain:
        return {}
    was = model.training
    model.eval()
    board = ScoreBoard()
    device = runtime.device
    binary, batch_size, workers = settings.binary, settings.batch_size, settings.workers
    for domain, parts in parts_by_domain.items():
        picks = capped_indices(parts, settings.max_patches)
        per_slide = own_statistics is not None and own_statistics(domain)
        for part, group in (_by_part(picks) if per_slide else [(None, picks)]):
            loader = DataLoader(PickDataset(group), batch_size=batch_size, collate_fn=collate,
                                num_workers=0 if per_slide else workers, pin_memory=device.type == "cuda",
                                worker_init_fn=quiet_worker)
            with (route(domain) if route else nullcontext()):
                with (slide_statistics(model, part, normalizer, device, batch_size) if per_slide else nullcontext()):
                    for images, masks in loaded(loader):
                        x = normalizer(images.to(device).float())
                        with autocast(runtime.placement):
                            logits = model(x)
                        pred = logits[:, 0] > 0 if binary else logits.argmax(1)
                        board.add_batch(domain, *batch_counts(pred, masks.to(device)))
    model.train(was)
    table = board.table()
    table["mean_domain_dice_pixels"] = float(np.mean([d["dice_pixels"] for d in table["domains"].values()]))
    return table


def _by_part(picks: list) -> list:
    """(part, its picks) in order of first appearance."""
    groups: dict[int, tuple] = {}
    for part, i in picks:
        groups.setdefault(id(part), (part, []))[1].append((part, i))
    return list(groups.values())


def slide_statistics(model, part, normalizer, device, batch_size: int):
    """The context of one slide (a store's part) scored with its own BatchNorm statistics: estimated
    on its `ADAPT_WINDOWS` patches with most tissue; nothing with fewer than `MIN_WINDOWS`."""
    store = open_store(part.store.path)
    picks = part.start + adaptation_windows(store.tissue[part.start:part.stop])
    if len(picks) < MIN_WINDOWS:
        return nullcontext()
    images = store.images
    inputs = (normalizer(torch.from_numpy(np.stack([np.asarray(images[int(i)]) for i in picks[a:a + batch_size]]))
                         .permute(0, 3, 1, 2).to(device).float()) for a in range(0, len(picks), batch_size))
    return estimated_statistics(model, inputs)
