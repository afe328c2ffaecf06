"""Small synthetic patch stores for training tests: a learnable toy task with domain shifts.

Each patch shows a disc of a textured 'tumour' on a 'stroma' background; the mask is the disc.
Each domain tints the whole patch (its 'scanner') so domains differ while the task stays the same.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from histodg.store import StoreWriter


def make_store(path: Path, n: int = 24, size: int = 64, organ: str = "unknown", scanner: str = "unknown",
               seed: int = 0, tint=(0, 0, 0), masks: bool = True, mpp: float = 1.0) -> Path:
    rng = np.random.default_rng(seed)
    attrs = {"tile_size": size, "mpp": mpp, "organ": organ, "scanner": scanner,
             "labels": {"0": "background", "1": "tumor"} if masks else None}
    w = StoreWriter(Path(path), attrs, n, size, masks).create()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cx, cy = rng.uniform(0.25, 0.75, 2) * size
        r = rng.uniform(0.15, 0.35) * size
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        if rng.random() < 0.2:
            disc[:] = False  # some patches without tumour
        img = np.empty((size, size, 3), np.float32)
        img[:] = (225, 160, 190)  # pink stroma
        noise = rng.normal(0, 12, (size, size, 1))
        stripes = 25 * (np.sin(xx / 2.0 + yy / 3.0) > 0)[..., None]  # tumour texture
        img = np.where(disc[..., None], np.array((120, 60, 150)) + stripes, img) + noise + np.asarray(tint)
        img = np.clip(img, 0, 255).astype(np.uint8)
        w.append(w.encode(img, disc.astype(np.uint8) if masks else None), (i * size, 0), 1.0)
        if w.buffered == w.shard:
            w.flush()
            w.commit(i + 1)
    w.finish()
    return Path(path)


def make_domains(root: Path, organs=("colon", "stomach", "lung"), scanners=("s1", "s2", "s3"), stores_per_domain: int = 2,
                 n: int = 16, size: int = 64) -> Path:
    """Organ-task stores (scanner unknown) and scanner-task stores (organ unknown), like COSAS."""
    k = 0
    for j, o in enumerate(organs):
        for s in range(stores_per_domain):
            make_store(root / f"organ-{o}-{s}.zarr", n, size, organ=o, seed=k, tint=(0, 10 * j, 0))
            k += 1
    for j, sc in enumerate(scanners):
        for s in range(stores_per_domain):
            make_store(root / f"scanner-{sc}-{s}.zarr", n, size, scanner=sc, seed=k, tint=(15 * j, -10 * j, 5 * j))
            k += 1
    return root
