"""AdaBN on one slide (`--adapt bn`; Li et al., "Revisiting Batch Normalization for Practical Domain
Adaptation", 2016): every BatchNorm's statistics estimated on the slide's windows, the domain-shift
score measured on the unadapted model meanwhile. `tent` builds on it; `adapt` decides when."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def adapted_batchnorm(predictor, batches):
    """Inside: every BatchNorm of `predictor.model` uses statistics estimated on `batches`
    ((N, T, T, 3) uint8 tensors); after: the checkpoint's statistics, exactly."""
    from ..model.batchnorm import estimated_statistics

    meter = predictor.meter  # the shift score sees the unadapted model on these windows

    # with --tta flip the prediction measures every flip of a window (`Predictor.probabilities`): so
    # does this, so that the score does not depend on --adapt
    flips = ((), (3,), (2,), (2, 3)) if predictor.options.tta == "flip" else ((),)  # NCHW: 3 = width

    def measure(x, layers, saved):
        with meter.measuring():
            for dims in flips:
                with meter.flip(first=not dims):  # a window counts once, however many flips are measured
                    _unadapted_forward(predictor, layers, saved, x.flip(dims) if dims else x)
        meter.measured_apart()  # not the estimating pass, nor the adapted prediction after it

    inputs = (predictor.model_input(batch) for batch in batches)
    with estimated_statistics(predictor.model, inputs, measure if meter is not None else None) as layers:
        yield len(layers)


def _unadapted_forward(predictor, layers, saved, x) -> None:
    """One forward of `x` with the checkpoint's statistics (eval mode), leaving the statistics being
    estimated as they were; through the slide's runtime (`Predictor.network`: onnxruntime, when chosen)."""
    import torch

    current = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]
    for m, (mean, var, _, _) in zip(layers, saved):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.eval()
    predictor.network(x)
    with torch.no_grad():
        for m, (mean, var, tracked) in zip(layers, current):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(tracked)
            m.train()
