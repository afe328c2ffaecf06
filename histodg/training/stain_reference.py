"""The stain reference of `histodg train --stain-norm`: fitted once, before training, stored in the checkpoint.

From `--stain-ref IMAGE` when given, else from the training stores of every stage (never the
held-out domains): the `PER_STORE` patches of each store with the most tissue, at most
`MAX_PATCHES` in all, in a mosaic that torchstain fits (`model.stain.fit_reference`). The choice
is deterministic, so a resumed run fits the same reference.
"""
from __future__ import annotations

import numpy as np

from ..model.stain import fit_reference, reference_from_image

PER_STORE, MAX_PATCHES = 4, 64


def stain_reference(cfg, stages, error) -> dict | None:
    """The reference of cfg.stain_norm, or None; `error(path, message)` makes the exception raised."""
    if cfg.stain_norm == "none":
        return None
    if cfg.stain_ref:
        try:
            return reference_from_image(cfg.stain_norm, cfg.stain_ref)
        except ValueError as exc:
            raise error(cfg.stain_ref, f"cannot fit a {cfg.stain_norm} stain reference ({exc})") from None
    from ..store import open_store

    stores = sorted({part.store.path for stage in stages for parts in stage.train.values() for part in parts})
    per = max(1, min(PER_STORE, MAX_PATCHES // max(1, len(stores))))
    patches = []
    for path in stores:
        s = open_store(path)
        tissue = np.asarray(s.tissue[:])
        for i in np.argsort(-tissue, kind="stable")[:per]:
            patches.append(np.asarray(s.images[int(i)]))
    try:
        return fit_reference(cfg.stain_norm, patches[:MAX_PATCHES])
    except ValueError as exc:
        raise error(stores[0], f"cannot fit a {cfg.stain_norm} stain reference from the training stores ({exc})") from None
