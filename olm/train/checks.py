"""The pre-training checks every entry point runs on a composed config (a single run, each job of a multirun,
``--cfg job``, ``train(cfg)`` on a config from Hydra's compose API), before any data or model work.

Each failure is one ConfigError naming the key, the value and what it may be. Types and unknown keys are enforced
while composing (olm.train.config's schemas); this adds the declared choices and ranges, the rules between keys, the
model itself (built on the meta device, so impossible shapes fail here), a memory estimate for the sequence length,
and what a config may make Hydra instantiate.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from olm.errors import ConfigError, closest, config_error_cause, did_you_mean, first_line
from olm.train.config import STRATEGIES, TrainConfig, check_settings, declared_keys, undeclared_keys
from olm.train.speed import check_float8, float8_recipe, processes_on_this_machine

# What Hydra may instantiate from a config (launcher, sweeper, sampler, callbacks: ``_target_``; logging handlers:
# ``class``/``()``): Hydra's own classes, its plugins, Optuna's samplers and the logging module. Anything else would
# let a config file run arbitrary code; olm's own code is imported only through the explicit ``model.imports`` list.
SAFE_TARGETS = ("hydra.", "hydra_plugins.", "logging.", "optuna.samplers.", "optuna.pruners.")
# Top-level keys that are not run settings: Hydra's node and the groups that only select other configs.
NOT_SETTINGS = {"hydra"}


def check_run(cfg: DictConfig, *, model: bool = True, memory: bool = True, dry_run: bool = False) -> None:
    """All checks, in the order a user would fix them (module docstring). ``dry_run``: the config is printed, not
    run (``--cfg job``), so an experiment's ``seeds`` need no ``-m``."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        _check_run(cfg, model, memory, dry_run)
    except OmegaConfBaseException as exc:  # an interpolation or a resolver (olm.vocab_size) failed
        cause = config_error_cause(exc)
        if cause is not None:
            raise ConfigError(str(cause)) from None
        key = getattr(exc, "full_key", None)
        text = first_line(exc)
        raise ConfigError(f"{key}: {text}" if key and key not in text else text) from None


def _check_run(cfg: DictConfig, model: bool, memory: bool, dry_run: bool = False) -> None:
    _check_missing(cfg)
    _check_undeclared_keys(cfg)
    check_settings(cfg)
    _check_between_keys(cfg, dry_run)
    if "hydra" in cfg:
        check_hydra_targets(cfg)
    _check_optim(cfg)
    if model:
        built = build_on_meta(cfg)
        check_optimizer_fits(cfg, built)
        if memory:
            check_memory(cfg, built)


def _missing_keys(node, prefix: str = ""):
    """Paths of values left ``???`` (without resolving interpolations)."""
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        path = f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_missing(node, key):
            yield path
        elif not OmegaConf.is_interpolation(node, key):
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)) and not child._is_none() and not child._is_missing():
                yield from _missing_keys(child, path)


def _check_missing(cfg: DictConfig) -> None:
    missing = [k for k in _missing_keys(cfg) if not k.startswith("hydra.")]
    if missing:
        raise ConfigError(f"{missing[0]} must be set (it is ??? in the config); pass it on the command line: "
                          f"{missing[0]}=...")


def _check_undeclared_keys(cfg: DictConfig) -> None:
    """A group takes only the keys its schema declares. Experiments may keep their own variables at the top level
    (``shape``); one spelt like a run key is a typo that would otherwise be ignored."""
    for key, known in undeclared_keys(cfg):
        parent, _, name = key.rpartition(".")
        raise ConfigError(f"{key} is not a config key" + did_you_mean(name, sorted(known), f"known keys of {parent!r}"))
    declared = declared_keys(TrainConfig)
    for key in cfg.keys():
        if key in declared or key in NOT_SETTINGS:
            continue
        match = closest(key, declared, cutoff=0.8)
        if match is not None:
            raise ConfigError(f"{key} is not a run key; did you mean {match!r}? (a config file set it at the top "
                              "level, where experiments keep their own variables)")


def _is_single_run(cfg: DictConfig) -> bool:
    """Whether ``cfg`` is known to be a single run (not a multirun job): its own ``hydra.mode`` when composed with
    Hydra's config, else the running Hydra job's; False when neither says (a config composed without Hydra's)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    mode = OmegaConf.select(cfg, "hydra.mode", default=None)
    if mode is None and HydraConfig.initialized():
        mode = HydraConfig.get().mode
    return mode is not None and str(mode) in (str(RunMode.RUN), "RUN")


def _check_between_keys(cfg: DictConfig, dry_run: bool = False) -> None:
    trainer, scheduler = cfg.trainer, cfg.scheduler
    total = scheduler.total_steps or trainer.max_steps
    if scheduler.warmup_steps is not None and scheduler.warmup_steps >= total:
        which = "scheduler.total_steps" if scheduler.total_steps else "trainer.max_steps"
        raise ConfigError(f"scheduler.warmup_steps={scheduler.warmup_steps} must be below {which}={total} "
                          "(the learning rate would never reach optim.lr)")
    if cfg.seeds > 1 and not dry_run and _is_single_run(cfg):
        raise ConfigError(f"seeds={cfg.seeds} runs every variant {cfg.seeds} times and needs a multirun: add -m, "
                          "or seeds=1 for one run (seed=N picks its seed)")
    if cfg.resume is not None and cfg.ckpt_path:
        raise ConfigError(f"resume={cfg.resume} and ckpt_path are both set; use one (resume: the run dir's last "
                          "checkpoint; ckpt_path: a checkpoint file to start from)")
    _check_strategy(trainer.strategy)
    check_float8(cfg.float8, cfg.float8_head)
    if cfg.data.source == "prepared":
        _check_prepared(cfg.data)
    elif cfg.data.source != "stdlib" and not cfg.data.path:
        raise ConfigError(f"data.path must be set for data.source={cfg.data.source!r} (a file or a directory)")
    _check_eval(cfg)
    max_seq_len = cfg.model.get("max_seq_len")  # the model kind's own key, if it has one
    if isinstance(max_seq_len, int) and cfg.data.seq_len > max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={max_seq_len}")


def _strategy_name(strategy: Any) -> str:
    return str(strategy.get("name") if isinstance(strategy, DictConfig) else strategy)


# -- what this machine must have -------------------------------------------------------------------------------------
GPU_ACCELERATORS = ("gpu", "cuda")


def check_machine(cfg: DictConfig) -> None:
    """What the run needs of the machine it runs on and of the files it names: the GPU it asks for (and its FP8
    matmuls), the data path, the checkpoint to start from. Run before a run dir exists, so a refused run leaves
    nothing; not run for jobs that run elsewhere (hydra/launcher=slurm) or are only printed (--cfg job)."""
    accelerator = str(cfg.trainer.accelerator)
    on_gpu = accelerator in GPU_ACCELERATORS or (accelerator == "auto" and torch.cuda.is_available())
    if accelerator in GPU_ACCELERATORS and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator}: this machine has no CUDA GPU that torch can use; "
                          "use trainer=cpu (one process) or trainer=ddp_cpu (several CPU processes)")
    recipe = float8_recipe(cfg.float8)
    if recipe is not None and not on_gpu:  # torch's reference FP8 matmuls: what the tests run; said once
        import logging

        logging.getLogger("olm").warning("float8=%s on the CPU runs torch's reference FP8 matmuls: correct, and "
                                         "slower than float8=false (FP8 pays off on GPUs of compute capability 8.9+)",
                                         recipe)
    elif recipe is not None and torch.cuda.get_device_capability(0) < (8, 9):
        major, minor = torch.cuda.get_device_capability(0)
        raise ConfigError(f"float8={recipe} needs a GPU with FP8 matmuls (compute capability 8.9+); "
                          f"{torch.cuda.get_device_name(0)} has {major}.{minor}; set float8=false")
    if cfg.data.source in ("text", "bin", "hf_dataset") and cfg.data.path and not Path(cfg.data.path).exists():
        raise ConfigError(f"data.path={str(cfg.data.path)!r} does not exist (data.source={cfg.data.source}: "
                          "a file or a directory)")
    from olm.train.wandb_logging import check_online

    check_online(cfg.logger)
    if cfg.ckpt_path:
        from olm.checkpoint import load_checkpoint

        if not Path(cfg.ckpt_path).is_file():
            raise ConfigError(f"ckpt_path={str(cfg.ckpt_path)!r} does not exist")
        load_checkpoint(cfg.ckpt_path, mmap=True)  # a missing, truncated or foreign file: one line, nothing made


def _check_optim(cfg: DictConfig) -> None:
    """The optimizer: picked as a group (its schema is the node's type), its package installed, and the strategy
    and parametrization it can work with."""
    from olm.train.config import optimizer_schema

    name = cfg.optim.name
    schema = optimizer_schema(name)
    node_type = OmegaConf.get_type(cfg.optim)
    if dataclasses.is_dataclass(node_type) and node_type is not schema:
        raise ConfigError(f"optim.name={name!r} does not match the optimizer group's keys "
                          f"({getattr(node_type, 'component_name', node_type.__name__)}): pick it with optim={name}")
    if name == "muon" and _strategy_name(cfg.trainer.strategy).startswith("fsdp"):
        raise ConfigError("optim=muon does not work with trainer.strategy=fsdp: Muon orthogonalises whole matrices "
                          "and FSDP shards them; use trainer=ddp, or optim=adamw/lion/sgd with FSDP")
    if name == "lion" and importlib.util.find_spec("lion_pytorch") is None:
        raise ConfigError("optim=lion needs the lion-pytorch package: pip install 'olm[optim]' (or lion-pytorch)")
    if name == "sgd" and cfg.model.get("parametrization") == "mup":
        raise ConfigError("model.parametrization=mup works with optim=adamw, lion or muon (muP's learning-rate "
                          "rules for SGD differ and are not implemented); optim=sgd needs parametrization=standard")


def check_optimizer_fits(cfg: DictConfig, model: torch.nn.Module) -> None:
    """Muon needs the model's blocks to hold 2-D matrices."""
    from olm.train.optim import muon_matrices, parameter_roles

    if cfg.optim.name == "muon":
        muon_matrices(parameter_roles(model)["hidden"])


def _check_prepared(data: DictConfig) -> None:
    """Prepared sources: the folders, manifests, shard sizes, lengths and tokenizers (olm.data.prepared reads only
    manifests and file sizes, so this is cheap)."""
    from olm.data.prepared import open_sources
    from olm.data.tokenizers import load_hf

    try:
        named = load_hf(data.tokenizer_path) if data.tokenizer == "hf" else None
        open_sources(data.sources, data.path, data.seq_len, named)
    except ValueError as exc:
        raise ConfigError(first_line(exc)) from None


def _check_eval(cfg: DictConfig) -> None:
    """``callbacks.eval``: olm's own task names spelled right (other names are looked up in lm-eval's registry when
    training starts, before the first step), lm-eval installed unless ``without_lm_eval=skip`` (the run then says
    once that it skips the evaluation), and no FSDP (the model is sharded)."""
    tasks = list(cfg.callbacks.eval.tasks)
    if not tasks:
        return
    from olm.eval import lm_eval_installed, require_lm_eval
    from olm.eval.tasks import GROUP, SHIPPED, unknown_olm_task

    name = unknown_olm_task(tasks)
    if name is not None:
        raise ConfigError(f"callbacks.eval.tasks: {name!r} is not one of olm's tasks"
                          + did_you_mean(name, [*SHIPPED, GROUP], "olm's tasks"))
    if cfg.callbacks.eval.without_lm_eval == "skip" and not lm_eval_installed():
        return
    require_lm_eval(f"callbacks.eval.tasks={tasks} with callbacks.eval.without_lm_eval=refuse",
                    " (or callbacks.eval.tasks=[] for no downstream evaluation)")
    strategy = cfg.trainer.strategy
    name = strategy.get("name") if isinstance(strategy, DictConfig) else strategy
    if name == "fsdp":
        raise ConfigError("callbacks.eval.tasks is set with trainer.strategy fsdp: the in-loop evaluation needs "
                          "the whole model on one rank; set callbacks.eval.tasks=[] and run olm eval on the "
                          "exported model")


def _check_strategy(strategy: Any) -> None:
    """``trainer.strategy``: a Lightning strategy name, or a mapping ``{name: ddp|fsdp, ...}`` (olm's strategies)."""
    if isinstance(strategy, DictConfig):
        name = strategy.get("name")
        if name not in ("ddp", "fsdp"):
            raise ConfigError(f"trainer.strategy.name={name!r} is not known; known: ddp, fsdp (or give a Lightning "
                              "strategy name as trainer.strategy)")
        return
    if strategy in STRATEGIES:
        return
    from lightning.pytorch.strategies import StrategyRegistry

    known = sorted(StrategyRegistry.available_strategies())
    if strategy not in known:
        raise ConfigError(f"trainer.strategy={strategy!r} is not known" + did_you_mean(strategy, known))


def build_on_meta(cfg: DictConfig) -> torch.nn.Module:
    """The model the run would train, built on the meta device (shapes only, no memory): every registry check
    and every constructor's own check runs, in milliseconds also for the 27B presets."""
    import olm

    if not isinstance(cfg.model.get("vocab_size"), int):
        raise ConfigError(f"model.vocab_size={cfg.model.get('vocab_size')!r} must be an integer "
                          "(model.vocab_size=${data.vocab_size} takes the tokenizer's)")
    from olm.nn.structure import meta_device

    with meta_device():
        return olm.build_model(cfg.model)


# -- memory ---------------------------------------------------------------------------------------------------------
def activation_bytes(model: torch.nn.Module, batch: int, seq_len: int, *, fused_loss: bool) -> int:
    """A lower bound on one training micro-batch's memory beyond the weights: the logits and their gradient in
    fp32 (unless the fused loss never materialises them); each block's saved activations, about 34 values per
    token and width (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
    table 2), at 2 bytes each; and, for attention that cannot use the fused kernels, the (batch, heads, T, T)
    scores each layer keeps in fp32 (soft-capped logits) or its (heads, T, T) position bias (ALiBi)."""
    tokens = batch * seq_len
    logits = 0 if fused_loss else 2 * tokens * model.vocab_size * 4
    width = model.to_config().get("embed_dim") or 0
    blocks = len(getattr(model, "blocks", ()))
    scores = 0
    for module in model.modules():
        heads = getattr(module, "num_heads", None)
        if not isinstance(heads, int) or not hasattr(module, "softcap"):
            continue
        if module.softcap is not None:
            scores += batch * heads * seq_len * seq_len * 4
        elif hasattr(getattr(module, "position", None), "bias"):
            scores += heads * seq_len * seq_len * 4
    return logits + tokens * width * blocks * 34 * 2 + scores


def parameter_bytes(model: torch.nn.Module) -> int:
    """fp32 weights, gradients and AdamW's two moments: 16 bytes per parameter."""
    return 16 * sum(p.numel() for p in model.parameters())


def available_bytes(on_gpu: bool) -> tuple[int, str] | None:
    """(bytes, what) the run may use on one device: the GPU's total memory, or the memory the OS has available."""
    if on_gpu:
        return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "this machine (available memory)"
    except OSError:
        pass
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_memory(cfg: DictConfig, model: torch.nn.Module) -> None:
    """Refuse a run whose estimated memory (a lower bound) exceeds the device's, before any data is read."""
    accelerator = str(cfg.trainer.accelerator)
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu and not torch.cuda.is_available():
        return  # Lightning reports the missing GPU itself
    available = available_bytes(on_gpu)
    if available is None:
        return
    limit, device = available
    fused = cfg.fused_loss is True or (cfg.fused_loss == "auto" and on_gpu)
    sharded = _strategy_name(cfg.trainer.strategy) == "fsdp"
    processes = 1 if on_gpu else processes_on_this_machine(cfg.trainer.devices)
    weights = parameter_bytes(model) // (_device_count(cfg) if sharded else 1)
    need = processes * (weights + activation_bytes(model, cfg.data.batch_size, cfg.data.seq_len, fused_loss=fused))
    if need > limit:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} with data.batch_size={cfg.data.batch_size} needs at least "
            f"{_gib(need)} per step (estimated: weights, gradients and AdamW state, logits and activations"
            f"{f', x{processes} processes' if processes > 1 else ''}), more than the {_gib(limit)} of {device}; "
            "lower data.seq_len or data.batch_size (trainer.accumulate_grad_batches keeps the tokens per step)")


def _strategy_name(strategy: Any) -> str:
    if isinstance(strategy, DictConfig):
        return str(strategy.get("name"))
    return str(strategy)


def _device_count(cfg: DictConfig) -> int:
    devices = cfg.trainer.devices
    if isinstance(devices, int) and devices > 0:
        return devices
    return max(1, torch.cuda.device_count())


# -- Hydra targets --------------------------------------------------------------------------------------------------
def _unsafe_targets(node, path: str = "hydra"):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("_target_", "class", "()") and isinstance(value, str) and not value.startswith(SAFE_TARGETS):
                yield f"{path}.{key}", value
            yield from _unsafe_targets(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _unsafe_targets(value, f"{path}[{i}]")


def check_hydra_targets(cfg: DictConfig) -> None:
    """Refuse a composed config (with its ``hydra`` node) that would make Hydra instantiate a class or callable
    outside SAFE_TARGETS: one-line ConfigError naming the key."""
    hydra_node = OmegaConf.to_container(cfg.hydra, resolve=False) if "hydra" in cfg else {}
    for key, target in _unsafe_targets(hydra_node):
        raise ConfigError(
            f"{key}={target!r} is not allowed: a config may only make Hydra instantiate {', '.join(SAFE_TARGETS)}* "
            "(import your own components with model.imports=[...])"
        )
