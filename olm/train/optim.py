"""Optimizer and learning-rate schedule of a run, from its typed ``optim`` and ``scheduler`` configs."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from olm.train.config import OptimConfig, SchedulerConfig

log = logging.getLogger("olm")


def lr_multiplier(step: int, *, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float,
                  decay_fraction: float = 0.2) -> float:
    """Learning-rate factor at ``step``: linear warmup, then the chosen decay down to ``min_lr_ratio``.

    - cosine: half-cosine from 1 to min_lr_ratio over the steps after warmup;
    - linear: straight line to min_lr_ratio;
    - constant: 1 after warmup;
    - wsd (warmup-stable-decay): 1 until the last ``decay_fraction`` of training, then linear to min_lr_ratio.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_start = int(total_steps * (1 - decay_fraction))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return 1.0 - (1.0 - min_lr_ratio) * progress
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, weight_decay: float, decay_embeddings: bool = False,
                     decay_norms_and_biases: bool = False) -> list[dict[str, Any]]:
    """AdamW groups of ``model``'s trainable parameters (each once, also when tied): weight decay on matrices; on
    embedding tables and on vectors (norms, biases) only when asked."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embedding_params:
            (decay if decay_embeddings else no_decay).append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            (decay if decay_norms_and_biases else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW over ``parameter_groups``: fused kernels on GPU unless ``optim.fused`` says otherwise, foreach on CPU."""
    fused = cfg.fused if cfg.fused is not None else device_type == "cuda"
    groups = parameter_groups(model, cfg.weight_decay, decay_embeddings=cfg.decay_embeddings,
                              decay_norms_and_biases=cfg.decay_norms_and_biases)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=bool(fused) or None)


def warmup_steps(cfg: SchedulerConfig, max_steps: int) -> int:
    """``scheduler.warmup_steps``, or a tenth of the schedule's steps when it is null."""
    total = cfg.total_steps or max_steps
    return cfg.warmup_steps if cfg.warmup_steps is not None else total // 10


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, max_steps: int):
    """A per-step LambdaLR of ``lr_multiplier`` over ``scheduler.total_steps`` (null: ``max_steps``)."""
    schedule = dict(schedule=cfg.name, warmup_steps=warmup_steps(cfg, max_steps),
                    total_steps=cfg.total_steps or max_steps, min_lr_ratio=cfg.min_lr_ratio,
                    decay_fraction=cfg.decay_fraction)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, **schedule))
