"""Optimizer and learning-rate schedule of a run, from its typed ``optim`` and ``scheduler`` configs."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from olm.errors import ConfigError
from olm.train.config import (PARAMETER_ROLES, AdamWConfig, LionConfig, MuonConfig, OptimizerConfig, SchedulerConfig,
                               SGDConfig)

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


def parameter_roles(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """Every trainable tensor of ``model`` once (also when tied), by the role it plays (``PARAMETER_ROLES``):
    token and position tables are ``embedding``; the output projection, unless tied to the token table, ``head``;
    tensors of fewer than two dimensions (norm gains, biases) ``vector``; every other matrix ``hidden``."""
    from olm.nn.blocks import OutputHead

    embedding = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = {id(p) for m in model.modules() if isinstance(m, OutputHead) for p in m.parameters() if p.ndim >= 2}
    roles: dict[str, list[torch.nn.Parameter]] = {role: [] for role in PARAMETER_ROLES}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embedding:
            roles["embedding"].append(p)
        elif p.ndim < 2:
            roles["vector"].append(p)
        elif id(p) in head:
            roles["head"].append(p)
        else:
            roles["hidden"].append(p)
    return roles


def width_multiplier(model: torch.nn.Module) -> float:
    """muP's width / base width (1 for the standard parametrization): hidden learning rates of Adam-like optimizers
    are divided by it (Tensor Programs V, Table 3)."""
    return float(getattr(model, "width_multiplier", 1.0))


def _group(role: str, params: list, cfg: OptimizerConfig, lr_scale: float = 1.0) -> dict[str, Any]:
    decays = role in ("hidden", "head") or (role == "embedding" and cfg.decay_embeddings) or (
        role == "vector" and cfg.decay_norms_and_biases)
    lr = cfg.lr * getattr(cfg.lr_multipliers, role) * lr_scale
    return {"params": params, "role": role, "lr": lr, "weight_decay": cfg.weight_decay if decays else 0.0}


def parameter_groups(model: torch.nn.Module, cfg: OptimizerConfig) -> list[dict[str, Any]]:
    """One group per non-empty role, with its learning rate (``lr`` x the role's multiplier x muP's 1/width factor
    for hidden matrices) and weight decay; the optimizers take these as they are."""
    roles = parameter_roles(model)
    hidden_scale = 1.0 / width_multiplier(model)
    return [_group(role, params, cfg, hidden_scale if role == "hidden" else 1.0)
            for role, params in roles.items() if params]


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters as one (Muon + AdamW): one list of parameter groups for the
    LR schedule and gradient clipping, one state dict for checkpoints, one ``step``."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        super().__init__([g for o in optimizers for g in o.param_groups], {})
        self.optimizers = optimizers
        self._share()

    def _share(self) -> None:
        """Point each inner optimizer at its slice of this one's groups and at this one's state (keyed by tensor)."""
        start = 0
        for o in self.optimizers:
            o.param_groups = self.param_groups[start:start + len(o.param_groups)]
            o.state = self.state
            start += len(o.param_groups)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "optimizers"):  # after __init__: which inner optimizer would own it is not defined
            raise NotImplementedError("CombinedOptimizer takes its groups from its optimizers")
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # replaces self.param_groups and self.state with new objects
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss


def _adamw(groups: list[dict], cfg, device_type: str) -> torch.optim.Optimizer:
    fused = cfg.fused if getattr(cfg, "fused", None) is not None else device_type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=bool(fused) or None)


def muon_matrices(hidden: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The hidden tensors Muon updates (the 2-D ones); none is one ConfigError."""
    matrices = [p for p in hidden if p.ndim == 2]
    if not matrices:
        raise ConfigError("optim.name='muon' needs 2-D hidden matrices (the blocks' projections) and this model has "
                          "none; use optim=adamw, lion or sgd")
    return matrices


def _muon(groups: list[dict], cfg: MuonConfig, device_type: str) -> torch.optim.Optimizer:
    """Muon on the hidden role's 2-D matrices; AdamW (at ``adamw_lr``) on the rest, whose groups keep their roles."""
    matrices = muon_matrices([p for g in groups if g["role"] == "hidden" for p in g["params"]])
    muon_ids = {id(p) for p in matrices}
    adamw_lr = cfg.adamw_lr if cfg.adamw_lr is not None else cfg.lr
    muon_groups, adamw_groups = [], []
    for g in groups:
        mine = [p for p in g["params"] if id(p) in muon_ids]
        rest = [p for p in g["params"] if id(p) not in muon_ids]
        if mine:  # the hidden matrices keep the role's multiplier; Muon's own shape scaling stands in for muP's
            muon_groups.append(_group(g["role"], mine, cfg))
        if rest:
            adamw_groups.append({**g, "params": rest, "lr": g["lr"] / cfg.lr * adamw_lr})
    muon = torch.optim.Muon(muon_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                            nesterov=cfg.nesterov, ns_steps=cfg.ns_steps,
                            adjust_lr_fn=None if cfg.adjust_lr == "original" else cfg.adjust_lr)
    if not adamw_groups:
        return muon
    return CombinedOptimizer([muon, _adamw(adamw_groups, cfg, device_type)])


def _lion(groups: list[dict], cfg: LionConfig, device_type: str) -> torch.optim.Optimizer:
    from lion_pytorch import Lion

    return Lion(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def _sgd(groups: list[dict], cfg: SGDConfig, device_type: str) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


BUILDERS = {AdamWConfig: _adamw, MuonConfig: _muon, LionConfig: _lion, SGDConfig: _sgd}


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, device_type: str) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names over ``parameter_groups(model, cfg)``."""
    return BUILDERS[type(cfg)](parameter_groups(model, cfg), cfg, device_type)


def describe_groups(optimizer: torch.optim.Optimizer) -> list[str]:
    """One line per parameter group: role, tensors, parameters, learning rate, weight decay, update rule."""
    inner = getattr(optimizer, "optimizers", [optimizer])
    lines = []
    for o in inner:
        for g in o.param_groups:
            n = sum(p.numel() for p in g["params"])
            lines.append(f"{g.get('role', '?'):>9}: {len(g['params']):3d} tensors {n:>11,d} parameters  "
                         f"lr {g['lr']:.3g}  weight decay {g['weight_decay']:g}  ({type(o).__name__})")
    return lines


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
