"""olm's grid sweeper: Hydra's basic sweeper with seeds as an axis of its own.

``seeds=N`` (an experiment's or the command line's) runs every variant of the grid N times, with ``seed`` taking
the values seed, seed+1, ..., seed+N-1: one job per (variant, seed), the seed varying fastest. Everything else is
Hydra's basic sweeper (``hydra.sweeper.params``, the command line's sweeps, ``max_batch_size``).
"""

from __future__ import annotations

from typing import Any, List

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class OlmSweeper(BasicSweeper):
    def sweep(self, arguments: List[str]) -> Any:
        from olm.train.compose import seed_sweep

        assert self.config is not None
        extra = seed_sweep(int(self.config.seeds), int(self.config.seed), list(arguments), dict(self.params or {}))
        return super().sweep([*arguments, *extra])
