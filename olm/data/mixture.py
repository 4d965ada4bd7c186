"""Weighted mixtures of prepared sources: global sample index g -> (source, window), deterministic from the seed.

The datamodule's scheme is unchanged: rank r of W gets the global indices ``b*B*W + r*B + i`` of micro-batch b, so
ranks are disjoint, one process with batch B*W sees their union, and a resume from micro-batch b continues exactly.
What changes is only which window a global index names:

- **Source.** Indices come in blocks of ``BLOCK``; in every block source s has exactly ``counts[s]`` positions (the
  weights times BLOCK, rounded by largest remainder, at least one each), at places shuffled per block by
  ``default_rng([seed, block])``. So the proportions are the weights to within 1/BLOCK over every block, not only
  in expectation, and the k-th sample of source s is known from g alone.
- **Window.** The k-th sample of source s is window ``perm(k mod n_s)`` of its ``n_s`` windows, with a different
  permutation for each pass ``k // n_s`` over the source. The permutation is computed, not stored (a Feistel network
  on the next power of four, cycle-walked into [0, n)), so the sampler's memory does not grow with the corpus.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .sampling import INFINITE, WindowBatchSampler

BLOCK = 4096  # global indices per block of the source schedule
ROUNDS = 4  # Feistel rounds: four make a pseudo-random permutation (Luby-Rackoff)
MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic is the point)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A pseudo-random permutation of ``range(n)`` named by ``key``, evaluated at any index in O(1) memory."""

    def __init__(self, n: int, key: list[int]):
        assert n > 0
        self.n = n
        self.half = max(1, (int(n - 1).bit_length() + 1) // 2)  # 4**half >= n
        self.low = np.uint64((1 << self.half) - 1)
        self.keys = np.random.SeedSequence(key).generate_state(ROUNDS, np.uint64)

    def _once(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.low
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.low)
        return (left << h) | right

    def __call__(self, i) -> np.ndarray:
        x = np.atleast_1d(np.asarray(i, dtype=np.uint64)).copy()
        todo = np.ones(len(x), bool)
        while todo.any():  # cycle walking: a bijection of [0, 4**half) restricted to [0, n)
            x[todo] = self._once(x[todo])
            todo = x >= np.uint64(self.n)
        return x.astype(np.int64)


def block_counts(weights: list[float], block: int = BLOCK) -> np.ndarray:
    """Positions per block for each source: ``block * w / sum(w)`` by largest remainder, at least one each."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) > block:
        raise ValueError(f"data.sources has {len(w)} sources, more than the {block} a block of the schedule holds")
    share = block * w / w.sum()
    counts = np.maximum(np.floor(share).astype(np.int64), 1)
    order = np.argsort(-(share - np.floor(share)), kind="stable")  # largest remainder first
    i = 0
    while counts.sum() < block:
        counts[order[i % len(w)]] += 1
        i += 1
    while counts.sum() > block:  # the minimum of one took positions: give them back from the largest
        counts[int(np.argmax(counts))] -= 1
    return counts


class MixtureSchedule:
    """Global sample index -> (source, k) where the sample is source's k-th (see the module doc)."""

    def __init__(self, weights: list[float], seed: int, block: int = BLOCK):
        self.seed, self.block = seed, block
        self.counts = block_counts(weights, block)
        self._labels = np.repeat(np.arange(len(self.counts)), self.counts)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _layout(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Block b: the source of each position, and each position's rank among its source's positions."""
        if b not in self._cache:
            # a micro-batch's indices are contiguous, so with batch_size <= BLOCK they span at most two blocks
            if len(self._cache) > 1:
                self._cache.pop(min(self._cache))
            labels = self._labels[np.random.default_rng([self.seed, b]).permutation(self.block)]
            rank = np.empty(self.block, np.int64)
            for s in range(len(self.counts)):
                where = labels == s
                rank[where] = np.arange(int(where.sum()))
            self._cache[b] = (labels, rank)
        return self._cache[b]

    def __call__(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = np.asarray(g, dtype=np.int64)
        sources, ks = np.empty(len(g), np.int64), np.empty(len(g), np.int64)
        blocks, pos = np.divmod(g, self.block)
        for b in np.unique(blocks):
            labels, rank = self._layout(int(b))
            sel = blocks == b
            sources[sel] = labels[pos[sel]]
            ks[sel] = int(b) * self.counts[labels[pos[sel]]] + rank[pos[sel]]
        return sources, ks


class MixtureWindows(Dataset):
    """The windows of several sources as one index space: source s's window w is ``offsets[s] + w``."""

    def __init__(self, parts: list[Dataset]):
        self.parts = parts
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[s][i - int(self.offsets[s])]


class MixtureBatchSampler(WindowBatchSampler):
    """WindowBatchSampler over a mixture: the same global indices per rank and micro-batch, mapped to the windows
    of ``MixtureWindows`` by a ``MixtureSchedule`` and per-source, per-pass permutations."""

    def __init__(self, num_windows: list[int], weights: list[float], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start_batch: int = 0, num_batches: int = INFINITE):
        super().__init__(sum(num_windows), batch_size, seed, rank, world_size, start_batch, num_batches)
        self.source_windows = np.asarray(num_windows, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.source_windows)])
        self.schedule = MixtureSchedule(weights, seed)
        self._source_perms: dict[tuple[int, int], Permutation] = {}

    def sources_and_windows(self, gs) -> tuple[np.ndarray, np.ndarray]:
        """(source, window within the source) of each global index."""
        sources, ks = self.schedule(np.asarray(gs, np.int64))
        windows = np.empty(len(ks), np.int64)
        n = self.source_windows[sources]
        passes, within = np.divmod(ks, n)
        for s, e in set(zip(sources.tolist(), passes.tolist())):
            key = (s, e)
            if key not in self._source_perms:
                if len(self._source_perms) > 4 * len(self.source_windows):
                    self._source_perms.clear()
                self._source_perms[key] = Permutation(int(self.source_windows[s]), [self.seed, s, e])
            sel = (sources == s) & (passes == e)
            windows[sel] = self._source_perms[key](within[sel])
        return sources, windows

    def windows(self, gs: list[int]) -> list[int]:
        sources, windows = self.sources_and_windows(gs)
        return (self.offsets[sources] + windows).tolist()

    def window(self, g: int) -> int:
        return self.windows([g])[0]
