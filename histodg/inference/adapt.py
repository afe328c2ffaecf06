"""Test-time adaptation to one slide, and the route a DSBN model's slide takes: `--adapt bn` (AdaBN,
`adabn`), `--adapt tent` (`tent`), a domain slot or the shared one (`slide_batchnorm`).

A slide comes from one scanner and one organ: before predicting it, every BatchNorm layer's
running mean and variance are re-estimated from that slide's own tissue windows (a cumulative
average over up to `ADAPT_WINDOWS` windows, the most tissue first), the model's weights are not
touched, and the checkpoint's statistics are put back when the slide is done, so the next slide
starts from the checkpoint again and the order of slides changes nothing.

When it hurts: with few tissue windows (the statistics of a handful of patches are noise; below
`MIN_WINDOWS` the slide is predicted without adaptation, and done.json says so), and under label
shift (a slide that is nearly all tumour or all stroma moves the statistics away from what the
model's later layers expect). Models without BatchNorm (MiT / SegFormer encoders use LayerNorm)
are refused with one line.

The domain-shift score (`model.shift`) is measured on the unadapted model: each adaptation batch
also goes once through the checkpoint's statistics, and the adapted prediction is not counted.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..domains import Domain
from ..model.batchnorm import MIN_WINDOWS, adaptation_windows
from .adabn import adapted_batchnorm
from .tent import adapted_tent

__all__ = ["ADAPTERS", "AdaptNote", "adapted_batchnorm", "adapted_to", "dsbn_route", "dsbn_slot", "slide_batchnorm",
           "window_batches"]


@dataclass(frozen=True)
class AdaptNote:
    """What was done to a slide's BatchNorm before it was predicted: done.json's `adaptation` is its
    text; `adapted` says whether statistics were estimated on the slide (its time is then timed)."""

    text: str
    adapted: bool = False

    def __str__(self) -> str:
        return self.text

    def also(self, more: str) -> AdaptNote:
        """This note with `more` added in brackets."""
        return AdaptNote(f"{self.text} ({more})", self.adapted)


@contextmanager
def _bn(predictor, batches, n: int):
    with adapted_batchnorm(predictor, batches):
        yield AdaptNote(f"bn: statistics of {n} windows", adapted=True)


@contextmanager
def _tent(predictor, batches, n: int):
    with adapted_tent(predictor, list(batches)) as losses:
        yield AdaptNote(f"tent: statistics of {n} windows, {len(losses)} entropy steps "
                        f"(entropy {losses[0]:.4f} at the first, {losses[-1]:.4f} at the last)", adapted=True)


# --adapt's test-time adapters: mode -> (predictor, batches of the slide's windows, their count) -> a context
# yielding its AdaptNote; `none` is the absence of one (constants.ADAPT_MODES lists them all)
ADAPTERS: dict[str, Callable] = {"bn": _bn, "tent": _tent}


@contextmanager
def slide_batchnorm(predictor, job, tissue, read):
    """`adapted_to`, and for a DSBN model (`model.domain_bn`) the BatchNorm a slide is predicted
    with: its domain's slot when its organ or scanner is one of the model's domains, otherwise the
    shared slot with the slide's own statistics (AdaBN, or `--adapt tent`). An explicit `--adapt`
    adapts the shared slot for every slide. Yields what was done, for done.json."""
    names = predictor.config.domain_bn
    if not names:
        with adapted_to(predictor, tissue, read) as note:
            yield note
        return
    from ..model.domain_bn import domain

    k = dsbn_slot(predictor, job)
    if k is not None:
        with domain(predictor.model, k):
            yield AdaptNote(f"dsbn: the BatchNorm of {names[k]}")
        return
    mode = "bn" if predictor.options.adapt == "none" else predictor.options.adapt
    why = "asked for" if predictor.options.adapt != "none" else "not one of the model's domains"
    with adapted_to(predictor, tissue, read, mode) as note:
        yield note.also(f"dsbn: shared BatchNorm; {why}")


def dsbn_slot(predictor, job) -> int | None:
    """The domain slot a DSBN model predicts `job` through (the first of its organ, then its
    scanner, that is one of the model's domains), or None: the shared slot (`--adapt` asked for,
    or neither is a domain of the model), or a model without slots."""
    if not predictor.config.domain_bn or predictor.options.adapt != "none":
        return None
    return Domain.of(job).slot(predictor.config.domain_bn)


def dsbn_route(predictor, job) -> str | None:
    """For done.json: the name of the slot `job` goes through, "shared", or None (no slots)."""
    if not predictor.config.domain_bn:
        return None
    k = dsbn_slot(predictor, job)
    return "shared" if k is None else predictor.config.domain_bn[k]


@contextmanager
def adapted_to(predictor, tissue, read, mode: str | None = None):
    """Inside: with `--adapt bn` or `tent` (or `mode`: one of `ADAPTERS`), the model adapted to one
    slide (or store) whose windows have these `tissue` fractions and are read by `read(i)`; yields
    what was done (an `AdaptNote`, for done.json), or None without `--adapt`."""
    adapter = ADAPTERS.get(mode or predictor.options.adapt)
    if adapter is None:
        yield None
        return
    picks = adaptation_windows(tissue)
    if len(picks) < MIN_WINDOWS:
        yield AdaptNote(f"none: only {len(picks)} tissue windows (at least {MIN_WINDOWS} needed)")
        return
    with adapter(predictor, window_batches(read, picks, predictor.options.batch_size), len(picks)) as note:
        yield note


def window_batches(read, indices, batch_size: int):
    """Batches of (N, T, T, 3) uint8 tensors of the windows `read(i)` returns."""
    import torch

    for a in range(0, len(indices), batch_size):
        yield torch.from_numpy(np.stack([read(int(i)) for i in indices[a:a + batch_size]]))
