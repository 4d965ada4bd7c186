"""muP's coordinate check: do activation sizes stay put as a model gets wider?

Under the maximal update parametrization (``model.parametrization=mup``) every layer's output keeps a width-independent
size per coordinate during training, which is what lets a learning rate tuned at the base width transfer. The check
(Yang et al. 2022, "Tensor Programs V", section D.1) trains copies of one model at several widths for a few steps on
the same batch and records the mean absolute value of each layer's output before each step; in the standard
parametrization the later steps' sizes grow with width, under muP they stay flat.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

import olm
from olm.train.config import OptimizerConfig
from olm.train.optim import build_optimizer

LAYERS = ("embedding", "block_0", "last_block", "logits")


def coordinate_sizes(model_cfg: dict, width: int, optim: OptimizerConfig, *, steps: int = 5, seed: int = 0,
                     batch_size: int = 4, seq_len: int = 32) -> dict[str, list[float]]:
    """Mean |activation| of each of ``LAYERS`` before each of ``steps`` AdamW/Muon/... steps of a model of
    ``model_cfg`` at ``embed_dim=width``, trained on one fixed random batch."""
    torch.manual_seed(seed)
    model = olm.build_model({**model_cfg, "embed_dim": width})
    optimizer = build_optimizer(model, optim, "cpu")
    generator = torch.Generator().manual_seed(1000 + seed)  # the same batch at every width
    tokens = torch.randint(0, model.vocab_size, (batch_size, seq_len + 1), generator=generator)
    sizes: dict[str, list[float]] = {layer: [] for layer in LAYERS}
    modules = {"embedding": model.embedding, "block_0": model.blocks[0], "last_block": model.blocks[-1],
               "logits": model.head}
    handles = [module.register_forward_hook(lambda _m, _i, out, name=name: sizes[name].append(
        out.detach().abs().mean().item())) for name, module in modules.items()]
    try:
        for _ in range(steps):
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def coordinate_check(model_cfg: dict, widths: Iterable[int], optim: OptimizerConfig, *, steps: int = 5,
                     seeds: Iterable[int] = (0, 1), **batch) -> dict[int, dict[str, list[float]]]:
    """``coordinate_sizes`` at each width, averaged over ``seeds``: {width: {layer: [size before step t]}}."""
    seeds = list(seeds)
    out = {}
    for width in widths:
        runs = [coordinate_sizes(model_cfg, width, optim, steps=steps, seed=seed, **batch) for seed in seeds]
        out[width] = {layer: [sum(run[layer][t] for run in runs) / len(runs) for t in range(steps)]
                      for layer in LAYERS}
    return out
