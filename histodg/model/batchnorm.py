"""BatchNorm statistics estimated on given inputs for a while, then put back exactly: the core of
AdaBN (Li et al. 2016) that `histodg predict --adapt bn`, a DSBN model's unknown slides and the
held-out validation of a DSBN run share."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

ADAPT_WINDOWS = 64  # windows (patches) a slide's statistics are estimated from, at most
MIN_WINDOWS = 8  # fewer tissue windows than this: the slide is not adapted


def adaptation_windows(tissue: np.ndarray, limit: int = ADAPT_WINDOWS) -> np.ndarray:
    """Indices of the windows to adapt on: the `limit` with the most tissue (stable order)."""
    order = np.argsort(-np.asarray(tissue, dtype=np.float64), kind="stable")
    return np.sort(order[:limit])


def batchnorm_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@contextmanager
def estimated_statistics(model, inputs, before_each=None):
    """Inside: every BatchNorm layer's running mean and variance are the cumulative average over
    `inputs` (model-ready batches, each sent once through the model in training mode; the weights
    are not touched), the layers in eval mode; after: the statistics, counters and momenta they had,
    exactly. `before_each(x, layers, saved)` runs before each batch's estimating forward (the
    domain-shift meter's unadapted pass). Yields the layers."""
    layers = batchnorm_layers(model)
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum) for m in layers]
    modes = [m.training for m in layers]
    try:
        with torch.no_grad():
            for m in layers:
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over every batch below
                m.train()
            for x in inputs:
                if before_each is not None:
                    before_each(x, layers, saved)
                model(x)
        for m in layers:
            m.eval()
        yield layers
    finally:
        with torch.no_grad():
            for m, (mean, var, tracked, momentum), mode in zip(layers, saved, modes):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(tracked)
                m.momentum = momentum
                m.train(mode)
