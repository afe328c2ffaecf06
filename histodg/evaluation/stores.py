"""Scoring a checkpoint on patch stores with masks (`histodg evaluate CHECKPOINT STORES...`).

An image is a store: its counts (|P & T|, |P|, |T|) are summed over its patches, which is the
image's Dice for a tiling without overlap (a COSAS image, a slide tiled with `--overlap 0`).
"""
from __future__ import annotations

import numpy as np

from ..batch import collected
from ..inference.adapt import slide_batchnorm
from ..inference.rasters import threshold_u8
from ..slides.inputs import SlideJob
from ..store import StoreError, find_stores, open_store
from .metrics import batch_counts
from .scoring import EvaluateError, Evaluation, binarise_truth, domain_of


def score_store(predictor, store, cut: int) -> tuple[int, int, int]:
    """(|P & T|, |P|, |T|) summed over the patches of one store."""
    return score_and_shift(predictor, store, cut)[0]


def score_and_shift(predictor, store, cut: int) -> tuple[tuple[int, int, int], dict | None]:
    """The counts of `score_store`, and the store's domain-shift score (`model.shift.slide_shift`:
    its patches against the checkpoint's training domains, as `predict` scores a slide; None when
    the checkpoint has no reference)."""
    if store.masks is None:
        raise EvaluateError(store.path, "store has no masks to score against (tile it with --annotations)")
    if abs(store.attrs.mpp / predictor.mpp - 1) > predictor.options.mpp_tolerance:
        raise EvaluateError(store.path, f"patches are at {store.attrs.mpp:g} um/px but the model runs at {predictor.mpp:g} um/px: "
                                        f"tile the images at the model's resolution")
    job = SlideJob(store.path, store.path.stem, organ=store.attrs.organ, scanner=store.attrs.scanner)  # a DSBN route
    read = lambda i: np.asarray(store.images[i])  # noqa: E731
    with predictor.shift_of_slide() as shift, slide_batchnorm(predictor, job, store.tissue, read):  # --adapt bn: per store
        counts = _score_patches(predictor, store, cut)
    return counts, shift.score


def _score_patches(predictor, store, cut: int) -> tuple[int, int, int]:
    import torch

    B = predictor.options.batch_size
    total = np.zeros(3, np.int64)
    for i in range(0, len(store), B):
        images = torch.from_numpy(np.ascontiguousarray(store.images[i : i + B]))
        truth = torch.from_numpy(binarise_truth(np.asarray(store.masks[i : i + B])))
        p = predictor.probabilities(images)
        pred = (torch.floor(p * 255 + 0.5) >= cut).cpu()
        inter, n_pred, n_true = batch_counts(pred, truth)
        total += [inter.sum(), n_pred.sum(), n_true.sum()]
    return int(total[0]), int(total[1]), int(total[2])


def evaluate_stores(predictor, paths, domain_axis: str | None = None, threshold: float | None = None,
                    progress=None) -> Evaluation:
    """Run `predictor` on every store's patches and score them against the stores' masks."""
    cut = threshold_u8(predictor.options.threshold if threshold is None else threshold)
    ev = Evaluation()
    stores = []
    for p in paths:
        try:
            stores.extend(find_stores([p]))
        except (StoreError, OSError) as exc:
            ev.errors.append(str(exc))
    if progress:
        progress(total=len(stores), done=0)
    opened = []
    for path in stores:
        with collected(ev.errors, path):
            opened.append(open_store(path))  # lazy: the attributes and array shapes
    if progress and len(opened) < len(stores):
        progress(advance=len(stores) - len(opened))  # those that did not open are done
    # --runtime auto decides on all the patches together: a COSAS set is thousands of small stores
    with predictor.runtime_for(sum(len(s) for s in opened)):
        for store in opened:
            with collected(ev.errors, store.path):
                counts, shift = score_and_shift(predictor, store, cut)
                ev.add(store.name, domain_of(store.attrs.organ, store.attrs.scanner, domain_axis), *counts,
                       source=str(store.path), shift=shift)
            if progress:
                progress(advance=1)
    return ev
