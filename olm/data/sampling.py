"""Deterministic, resumable train sampling shared by the datamodule and mixtures (the scheme: olm.data.datamodule's
module doc): a global sample index names a window; rank r of W takes the indices ``b*B*W + r*B + i`` of micro-batch b.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

INFINITE = 10**12  # "length" of the train sampler when the number of steps is unknown


class WindowBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches of train window indices, from micro-batch ``start_batch`` on (see module doc)."""

    def __init__(self, num_windows: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0, num_batches: int = INFINITE):
        assert num_windows > 0 and batch_size > 0 and 0 <= rank < world_size
        self.num_windows, self.batch_size, self.seed = num_windows, batch_size, seed
        self.rank, self.world_size, self.start_batch, self.num_batches = rank, world_size, start_batch, num_batches
        self._perms: dict[int, np.ndarray] = {}

    def global_indices(self, b: int) -> list[int]:
        """Global sample indices of this rank's micro-batch b (absolute: counted from the start of training)."""
        B, W = self.batch_size, self.world_size
        return [b * B * W + self.rank * B + i for i in range(B)]

    def window(self, g: int) -> int:
        e, i = divmod(g, self.num_windows)
        if e not in self._perms:
            if len(self._perms) > 1:  # a batch spans at most two epochs: keep the latest two permutations
                self._perms.pop(min(self._perms))
            self._perms[e] = np.random.default_rng([self.seed, e]).permutation(self.num_windows)
        return int(self._perms[e][i])

    def windows(self, gs: list[int]) -> list[int]:
        return [self.window(g) for g in gs]

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start_batch, self.start_batch + self.num_batches):
            yield self.windows(self.global_indices(b))
        # exhausted: if Lightning iterates again (next epoch), continue rather than repeat
        self.start_batch += self.num_batches

    def __len__(self) -> int:
        return self.num_batches
