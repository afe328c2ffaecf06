"""Per-domain Dice and IoU of a model on validation or held-out patches, every epoch."""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..device import autocast
from ..evaluation.metrics import ScoreBoard, batch_counts
from .data import PickDataset, collate, loaded
from .splits import capped_indices


def quiet_worker(_worker_id: int) -> None:
    """Data workers only read and decompress: one torch thread each, so they never fight the
    training threads for cores (OpenMP spin-waits make oversubscription very slow)."""
    torch.set_num_threads(1)


@torch.no_grad()
def score_domains(model, parts_by_domain: dict, normalizer, runtime, binary: bool, batch_size: int,
                  max_patches: int, workers: int, route=None) -> dict:
    """Dice/IoU per domain on at most `max_patches` patches each (spread evenly over its slides);
    `route(domain)`, if given, is the context each domain is scored in (DSBN's BatchNorm slot)."""
    if not parts_by_domain:
        return {}
    was = model.training
    model.eval()
    board = ScoreBoard()
    device = runtime.device
    for domain, parts in parts_by_domain.items():
        loader = DataLoader(PickDataset(capped_indices(parts, max_patches)), batch_size=batch_size, collate_fn=collate,
                            num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=quiet_worker)
        for images, masks in loaded(loader):
            x = normalizer(images.to(device).float())
            with autocast(runtime.placement), (route(domain) if route else nullcontext()):
                logits = model(x)
            pred = logits[:, 0] > 0 if binary else logits.argmax(1)
            board.add_batch(domain, *batch_counts(pred, masks.to(device)))
    model.train(was)
    table = board.table()
    table["mean_domain_dice_pixels"] = float(np.mean([d["dice_pixels"] for d in table["domains"].values()]))
    return table
