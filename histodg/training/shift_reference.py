"""The training domains' description that `predict`'s domain-shift score compares slides with
(`model.shift`), made at the end of training for the weights of each checkpoint it goes into.

Every training store (slide) of every stage gives `PER_STORE` patches, evenly spaced over its
training part, through the model in eval mode; their encoder-stage moments are pooled per
domain and the stores are scored leave-one-out for the calibration. Deterministic: the same
weights and stores give the same description.
"""
from __future__ import annotations

import numpy as np
import torch

from ..model.shift import FeatureMeter, Moments, fit_reference

PER_STORE = 32  # patches per training store
BATCH = 16


def _patch_indices(part, per_store: int) -> np.ndarray:
    n = len(part)
    if n <= per_store:
        return np.arange(part.start, part.stop)
    return part.start + np.unique(np.linspace(0, n - 1, per_store).round().astype(int))


def store_moments(model, normalizer, images, indices, device) -> Moments:
    """Encoder-stage moments of the patches `images[indices]` (a store's uint8 (N, T, T, 3) array)."""
    meter = FeatureMeter(model)
    try:
        with torch.inference_mode():
            for a in range(0, len(indices), BATCH):
                batch = np.stack([np.asarray(images[int(i)]) for i in indices[a:a + BATCH]])
                x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2)
                model(normalizer(x))
        return meter.take()
    finally:
        meter.remove()


def shift_reference(model, normalizer, stages, device, per_store: int = PER_STORE, domain_bn=None) -> dict | None:
    """The description of every training domain of `stages`, for the current weights of `model`;
    a DSBN model (`domain_bn`: its slots' domains) describes each domain through its own slot."""
    from ..model.domain_bn import domain_context
    from ..store import open_store

    net = getattr(model, "module", model)
    was_training = net.training
    net.eval()
    try:
        per: dict[str, dict[str, Moments]] = {}
        for stage in stages:
            for domain, parts in stage.train.items():
                for part in parts:
                    images = open_store(part.store.path).images
                    with domain_context(net, domain_bn, domain):
                        m = store_moments(net, normalizer, images, _patch_indices(part, per_store), device)
                    key = str(part.store.path)
                    have = per.setdefault(domain, {})
                    have[key] = have[key] + m if key in have else m
        return fit_reference(per)
    finally:
        net.train(was_training)
