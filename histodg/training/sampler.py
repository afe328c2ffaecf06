"""Domain-balanced batches: every step sees the same number of patches from every domain.

The stream depends only on (seed, epoch, rank), so a resumed run sees exactly the batches an
uninterrupted one would, and each rank of a distributed run draws its own patches.
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler

from .data import DataError


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
