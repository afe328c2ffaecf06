"""`--adapt tent`: AdaBN, then a few steps of entropy minimisation on the BatchNorm affine
parameters (Tent: Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021).

Per slide: the BatchNorm statistics are re-estimated from the slide's adaptation windows as
`--adapt bn` does; then `TENT_STEPS` Adam steps (learning rate `TENT_LR`) on the BatchNorm
weights and biases only, each on the next batch of those windows in order, minimise the mean
per-pixel entropy of the model's predictions. Bounded and deterministic, unlike Tent's online
form: a fixed number of steps, the statistics held at their AdaBN estimate while stepping (eval
mode), the windows in a fixed order, no randomness. Every weight and statistic is put back when
the slide is done. Its known failure is collapse (entropy is lowest when everything is one
class); few steps at a small rate keep it close to AdaBN.
"""
from __future__ import annotations

from contextlib import contextmanager

from ..device import autocast
from ..model.batchnorm import batchnorm_layers
from .adabn import adapted_batchnorm

TENT_STEPS = 10
TENT_LR = 1e-3


def mean_entropy(logits, classes: int):
    """Mean per-pixel entropy (nats) of (N, C, H, W) logits: sigmoid for C = 1, softmax otherwise."""
    import torch.nn.functional as F

    logits = logits.float()
    if classes == 1:
        z = logits[:, 0]
        p = z.sigmoid()
        return (p * F.softplus(-z) + (1 - p) * F.softplus(z)).mean()
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1).mean()


def affine_parameters(model) -> list:
    """The BatchNorm layers' weights and biases (what Tent adapts)."""
    return [p for m in batchnorm_layers(model) for p in (m.weight, m.bias) if p is not None]


def entropy_steps(predictor, batches: list, steps: int = TENT_STEPS, lr: float = TENT_LR) -> list[float]:
    """`steps` Adam steps on the BatchNorm affine parameters; the entropy before each step."""
    import torch

    model = predictor.model
    affine = affine_parameters(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in affine:
        p.requires_grad_(True)
    opt = torch.optim.Adam(affine, lr=lr)
    losses = []
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for step in range(steps):
                x = predictor.model_input(batches[step % len(batches)])
                with autocast(predictor.placement):
                    loss = mean_entropy(model(x), predictor.classes)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
    return losses


@contextmanager
def adapted_tent(predictor, batches: list):
    """Inside: AdaBN statistics of `batches` and the affine parameters after `entropy_steps`; after:
    the checkpoint's, exactly. Yields the entropies before each step."""
    import torch

    affine = affine_parameters(predictor.model)
    saved = [p.detach().clone() for p in affine]
    with adapted_batchnorm(predictor, batches):
        try:
            yield entropy_steps(predictor, batches)
        finally:
            with torch.no_grad():
                for p, s in zip(affine, saved):
                    p.copy_(s)
