"""BatchNorm statistics against a domain's: how far they are (`bn_gap`), and re-estimated on it."""
from __future__ import annotations

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..model.shift import channel_kl


@torch.no_grad()
def bn_gap(model, x: torch.Tensor) -> float:
    """Mean over the BatchNorm layers of the mean channel divergence between each layer's running
    statistics and the mean and variance of what it sees for the (normalised) batch `x`, in eval
    mode: 0 when the statistics are exactly those of `x`."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    seen = {}

    def hook(m, inputs):
        f = inputs[0].float()
        seen[m] = (f.mean((0, 2, 3)), f.var((0, 2, 3), unbiased=False))

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    eps = 1e-5
    gaps = []
    for m in layers:
        if m in seen:
            mean, var = seen[m]
            gaps.append(float(channel_kl(m.running_mean.float(), m.running_var.float() + eps, mean, var + eps).mean()))
    return float(np.mean(gaps)) if gaps else float("nan")


@torch.no_grad()
def reestimate_batchnorm(model, normalizer, patches, n: int, batch_size: int, device) -> None:
    """Every BatchNorm layer's running statistics := the cumulative average over `n` patches of
    `patches` (spread evenly), weights untouched (AdaBN on the whole target domain)."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x in patch_batches(normalizer, patches, patches.spread(n), batch_size, device):
        model(x)
    for m, mom in zip(layers, saved):
        m.momentum = mom
    model.eval()


def patch_batches(normalizer, patches, idx: np.ndarray, batch_size: int, device):
    """The patches `idx` of `patches`, normalised, in NCHW batches of `batch_size`."""
    for a in range(0, len(idx), batch_size):
        x = torch.from_numpy(patches.get(idx[a:a + batch_size])[0]).permute(0, 3, 1, 2).to(device)
        yield normalizer(x)
