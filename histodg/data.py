"""Training data over patch stores: validation, domains, balanced batches, augmentation.

- `load_stores(paths)` opens every store and refuses, before any training, stores that are
  incomplete, of another format version, without masks, or whose tile size or mpp differ.
- `domains_on(stores, axis)` groups stores by organ or scanner ("unknown" stores are left out).
- `PatchDataset` reads one patch (and mask) per item through zarr, applies a random flip/rot90
  chosen by the sampler, and returns uint8 tensors; normalisation and light colour jitter
  happen on the device, on whole batches (`Normalizer`, `color_jitter`).
- `BalancedBatchSampler` yields, per step, the same number of patches from every domain, in
  domain order, with each patch's augmentation seed: the batch content depends only on
  (seed, epoch, rank), so a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from . import HistodgError
from .store import open_store

AXES = ("organ", "scanner")


class DataError(HistodgError):
    """Training data cannot be used as asked."""


@dataclass
class StoreInfo:
    path: Path
    name: str
    n: int
    organ: str
    scanner: str
    tile_size: int
    mpp: float
    labels: dict
    meta: dict = field(default_factory=dict)

    def domain(self, axis: str) -> str:
        return self.organ if axis == "organ" else self.scanner


def load_stores(paths, require_masks: bool = True) -> list[StoreInfo]:
    """Open and validate every store; one clear error per problem, before any training."""
    from .store import find_stores

    found = find_stores(paths)
    if not found:
        raise DataError(paths[0] if paths else ".", "no patch stores found")
    infos = []
    for p in found:
        s = open_store(p)  # raises for incomplete / other version / broken
        if require_masks and s.masks is None:
            raise DataError(p, "store has no masks (tile it with --annotations, or a COSAS layout with mask folders)")
        if len(s) == 0:
            continue
        infos.append(StoreInfo(p, s.name, len(s), s.organ, s.scanner, s.tile_size, s.mpp, s.attrs.get("labels") or {},
                               s.attrs.get("meta") or {}))
    if not infos:
        raise DataError(found[0], "every store is empty (no tissue patches)")
    for key, what in (("tile_size", "tile sizes"), ("mpp", "resolutions (mpp)")):
        values = {}
        for s in infos:
            values.setdefault(getattr(s, key), s)
        if len(values) > 1:
            (va, a), (vb, b) = list(values.items())[:2]
            raise DataError(b.path, f"mixed {what}: {vb} here but {va} in {a.path}; tile all stores alike")
    names = {}
    for s in infos:
        if s.name in names:
            raise DataError(s.path, f"two stores named {s.name!r} (also {names[s.name]})")
        names[s.name] = s.path
    return infos


def label_set(stores: list[StoreInfo]) -> dict[int, str]:
    """Union of the stores' label names (background 0 always present)."""
    out = {0: "background"}
    for s in stores:
        for k, v in (s.labels or {}).items():
            out.setdefault(int(k), v)
    if len(out) == 1:
        out[1] = "tumor"
    return dict(sorted(out.items()))


def domains_on(stores: list[StoreInfo], axis: str) -> dict[str, list[StoreInfo]]:
    if axis not in AXES:
        raise DataError(axis, f"unknown domain axis (choose from {', '.join(AXES)})")
    out: dict[str, list[StoreInfo]] = {}
    for s in stores:
        d = s.domain(axis)
        if d and d != "unknown":
            out.setdefault(d, []).append(s)
    return dict(sorted(out.items()))


@dataclass
class Part:
    """A slice of one store's patches."""

    store: StoreInfo
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def split_domain(stores: list[StoreInfo], fraction: float, rng: np.random.Generator) -> tuple[list[Part], list[Part]]:
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

    def read_patch(self, store: StoreInfo, i: int) -> tuple[np.ndarray, np.ndarray]:
        arrs = self._arrays.get(store.path)
        if arrs is None:
            s = open_store(store.path)
            arrs = self._arrays[store.path] = (s.images, s.masks)
        images, masks = arrs
        return np.asarray(images[i]), np.asarray(masks[i])


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


class BalancedBatchSampler(Sampler):
    """Per step: `per_domain` patches from each domain, concatenated in domain order.

    `domain_indices[d]` are dataset indices of domain d. Sampling is with replacement across
    epochs but without replacement inside an epoch as long as a domain has patches left (each
    domain is walked in a fresh random order, restarted when exhausted). Items are
    (index, augmentation seed). The stream depends only on (seed, epoch, rank).
    """

    def __init__(self, domain_indices: list[np.ndarray], per_domain: int, steps: int, seed: int, epoch: int,
                 rank: int = 0, augment: bool = True):
        self.domain_indices = [np.asarray(d, np.int64) for d in domain_indices]
        if any(len(d) == 0 for d in self.domain_indices):
            raise DataError("sampler", "a training domain has no patches")
        self.per_domain = per_domain
        self.steps = steps
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.augment = augment

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 7])
        orders = [rng.permutation(d) for d in self.domain_indices]
        pos = [0] * len(orders)
        for _ in range(self.steps):
            batch = []
            for d, idx in enumerate(self.domain_indices):
                take = []
                while len(take) < self.per_domain:
                    if pos[d] >= len(orders[d]):
                        orders[d], pos[d] = rng.permutation(idx), 0
                    n = min(self.per_domain - len(take), len(orders[d]) - pos[d])
                    take.extend(orders[d][pos[d]: pos[d] + n].tolist())
                    pos[d] += n
                aug = rng.integers(0, 8, len(take)) if self.augment else np.zeros(len(take), np.int64)
                batch.extend(zip(take, aug.tolist()))
            yield batch


def collate(items):
    imgs = torch.stack([i[0] for i in items])
    masks = torch.stack([i[1] for i in items])
    return imgs, masks


class Normalizer:
    """uint8 NCHW on any device -> normalised float (ImageNet statistics by default)."""

    def __init__(self, mean, std, device, channels_last: bool = False):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised -> RGB in 0-255 (float)."""
        return x.float() * self.std + self.mean


def color_jitter(x: torch.Tensor, generator: torch.Generator, strength: float = 0.1) -> torch.Tensor:
    """Light per-image brightness, contrast and saturation jitter on uint8-range floats (0-255)."""
    if strength <= 0:
        return x
    b = x.shape[0]
    dev = x.device

    def rand(lo, hi):
        return (torch.rand(b, 1, 1, 1, generator=generator, device="cpu") * (hi - lo) + lo).to(dev)

    x = x * rand(1 - strength, 1 + strength)  # brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * rand(1 - strength, 1 + strength) + mean  # contrast
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * rand(1 - strength, 1 + strength) + grey  # saturation
    return x.clamp_(0, 255)
