"""Map the ``trainer.strategy`` config value to a Lightning strategy (names or small mappings)."""

from __future__ import annotations

from typing import Any

from olm.registry import ConfigError


def resolve_strategy(trainer_cfg: dict[str, Any]) -> dict[str, Any]:
    """``strategy: {name: fsdp, activation_checkpointing: true, ...}`` -> a configured FSDPStrategy; strings pass
    through to Lightning (auto, ddp, ddp_spawn, ...)."""
    cfg = dict(trainer_cfg)
    strategy = cfg.get("strategy", "auto")
    if isinstance(strategy, dict):
        options = dict(strategy)
        name = options.pop("name", None)
        if name == "fsdp":
            cfg["strategy"] = _fsdp(options)
        elif name in ("ddp", "ddp_spawn", "ddp_find_unused_parameters_true"):
            from lightning.pytorch.strategies import DDPStrategy

            try:
                cfg["strategy"] = DDPStrategy(**options)
            except TypeError as exc:
                raise ConfigError(f"trainer.strategy: {exc}") from exc
        else:
            raise ConfigError(f"trainer.strategy.name={name!r} is not known; known: ddp, fsdp (or a Lightning strategy name)")
    return cfg


def _fsdp(options: dict[str, Any]):
    import torch
    from lightning.pytorch.strategies import FSDPStrategy

    from olm.nn.blocks import TransformerBlock

    checkpointing = options.pop("activation_checkpointing", False)
    try:
        return FSDPStrategy(
            auto_wrap_policy={TransformerBlock},  # one FSDP unit per transformer block
            activation_checkpointing_policy={TransformerBlock} if checkpointing else None,
            **options,
        )
    except TypeError as exc:
        raise ConfigError(f"trainer.strategy: {exc}") from exc
