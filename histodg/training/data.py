"""Training data over patch stores: validation, domains, datasets.

- `load_stores(paths)` opens every store and refuses, before any training, stores that are
  incomplete, of another format version, without masks, or whose tile size or mpp differ.
- `domains_on(stores, axis)` groups stores by organ or scanner ("unknown" stores are left out).
- `PatchDataset` reads one patch (and mask) per item through the store reader, applies the
  flip/rot90 the sampler chose, and returns uint8 tensors; normalisation and colour
  augmentation happen on the device, on whole batches (`model.normalize`, `augment`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import HistodgError, exc_line
from ..constants import AXES, UNKNOWN
from ..store import StoreRef, find_stores, open_store


class DataError(HistodgError):
    """Training data cannot be used as asked."""


def load_stores(paths, require_masks: bool = True) -> list[StoreRef]:
    """Open and validate every store; one clear error per problem, before any training."""
    found = find_stores(paths)
    if not found:
        raise DataError(paths[0] if paths else ".", "no patch stores found")
    refs: list[StoreRef] = []
    for p in found:
        store = open_store(p)  # raises for incomplete / other version / broken
        if require_masks and not store.has_masks:
            raise DataError(p, "store has no masks (tile it with --annotations, or a COSAS layout with mask folders)")
        if len(store):
            refs.append(store.ref())
    if not refs:
        raise DataError(found[0], "every store is empty (no tissue patches)")
    for key, what in (("tile_size", "tile sizes"), ("mpp", "resolutions (mpp)")):
        values: dict = {}
        for s in refs:
            values.setdefault(getattr(s.attrs, key), s)
        if len(values) > 1:
            (va, a), (vb, b) = list(values.items())[:2]
            raise DataError(b.path, f"mixed {what}: {vb} here but {va} in {a.path}; tile all stores alike")
    names: dict[str, Path] = {}
    for s in refs:
        if s.name in names:
            raise DataError(s.path, f"two stores named {s.name!r} (also {names[s.name]})")
        names[s.name] = s.path
    return refs


def label_set(stores: list[StoreRef]) -> dict[int, str]:
    """Union of the stores' label names (background 0 always present)."""
    out = {0: "background"}
    for s in stores:
        for k, v in (s.attrs.labels or {}).items():
            out.setdefault(int(k), v)
    if len(out) == 1:
        out[1] = "tumor"
    return dict(sorted(out.items()))


def domains_on(stores: list[StoreRef], axis: str) -> dict[str, list[StoreRef]]:
    if axis not in AXES:
        raise DataError(axis, f"unknown domain axis (choose from {', '.join(AXES)})")
    out: dict[str, list[StoreRef]] = {}
    for s in stores:
        d = s.domain(axis)
        if d and d != UNKNOWN:
            out.setdefault(d, []).append(s)
    return dict(sorted(out.items()))


@dataclass
class Part:
    """A slice of one store's patches."""

    store: StoreRef
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def split_domain(stores: list[StoreRef], fraction: float, rng: np.random.Generator) -> tuple[list[Part], list[Part]]:
    """(train, val) parts of one domain: whole stores held out while at least one stays for
    training; a domain of one store is split by a contiguous block of its patches."""
    whole = [Part(s, 0, s.n) for s in stores]
    if fraction <= 0:
        return whole, []
    if len(stores) >= 2:
        k = min(len(stores) - 1, max(1, round(fraction * len(stores))))
        order = rng.permutation(len(stores))
        val = [whole[i] for i in sorted(order[:k])]
        train = [whole[i] for i in sorted(order[k:])]
        return train, val
    s = stores[0]
    k = int(round(fraction * s.n))
    if k == 0 or k == s.n:
        return whole, []
    return [Part(s, 0, s.n - k)], [Part(s, s.n - k, s.n)]


class _Reader:
    """Patch reads through zarr; arrays are opened lazily, so in each DataLoader worker."""

    def __init__(self):
        self._arrays: dict[Path, tuple] = {}

    def read_patch(self, store: StoreRef, i: int) -> tuple[np.ndarray, np.ndarray]:
        arrs = self._arrays.get(store.path)
        if arrs is None:
            s = open_store(store.path)
            arrs = self._arrays[store.path] = (s.images, s.masks)
        images, masks = arrs
        try:
            return np.asarray(images[i]), np.asarray(masks[i])
        except Exception as exc:  # the codecs' own errors: a chunk that does not decode
            why = exc_line(exc, 120)
            raise DataError(store.path, f"damaged: patch {i} cannot be read ({why}); `histodg info --check` lists "
                                        f"what is damaged, `histodg tile --overwrite` remakes the store") from None


def loaded(loader):
    """Iterate a DataLoader; a `DataError` raised in a worker process (which torch re-raises as a
    RuntimeError carrying the worker's traceback) comes out as the one-line error it was."""
    try:
        yield from loader
    except RuntimeError as exc:
        last = [x for x in str(exc).splitlines() if x.strip()][-1:]
        m = re.search(r"DataError: (.+?): (.*)$", last[0]) if last else None
        if m is None:
            raise
        raise DataError(m.group(1), m.group(2)) from None


class PatchDataset(Dataset, _Reader):
    """Items are (global index, augmentation seed); returns (image uint8 CHW, mask uint8 HW)."""

    def __init__(self, parts: list[Part], augment: bool = True):
        _Reader.__init__(self)
        self.parts = parts
        self.augment = augment
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[Part, int]:
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        part = self.parts[k]
        return part, part.start + index - int(self.offsets[k])

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        part, i = self.locate(index)
        return self.read_patch(part.store, i)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, 0)
        img, mask = self.read(int(index))
        if self.augment:
            k, flip = seed % 4, (seed // 4) % 2
            img, mask = np.rot90(img, k), np.rot90(mask, k)
            if flip:
                img, mask = img[:, ::-1], mask[:, ::-1]
        img = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        return img, torch.from_numpy(np.ascontiguousarray(mask))


class PickDataset(Dataset, _Reader):
    """Given (part, patch index) pairs, in order, without augmentation (for validation)."""

    def __init__(self, picks: list[tuple[Part, int]]):
        _Reader.__init__(self)
        self.picks = picks

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, j: int):
        part, i = self.picks[j]
        img, mask = self.read_patch(part.store, i)
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), torch.from_numpy(mask)


def collate(items):
    imgs = torch.stack([i[0] for i in items])
    masks = torch.stack([i[1] for i in items])
    return imgs, masks


