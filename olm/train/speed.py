"""Speed options of a run (``SpeedConfig``): torch.compile settings, FP8 matmuls (torchao), the SDPA kernel family,
the fused linear-cross-entropy loss (liger-kernel) and CPU threads. Each is a flag with a benchmark behind it
(benchmarks/RESULTS.md); the LightningModule applies them, this module checks and prepares them."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from typing import Any

import torch
from omegaconf import ListConfig

from olm.errors import ConfigError
from olm.train.config import COMPILE_MODES, FLOAT8_RECIPES, SpeedConfig

log = logging.getLogger("olm")
TORCHAO_MISSING = "float8={} needs torchao (pip install 'olm[perf]')"


def _dotted(options: dict, prefix: str = "") -> dict[str, Any]:
    """{"triton": {"cudagraphs": True}} (as Hydra builds it from triton.cudagraphs=true) -> {"triton.cudagraphs": True}."""
    flat = {}
    for key, value in options.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def float8_recipe(value: Any) -> str | None:
    """The ``float8`` config value as a torchao recipe name (true means tensorwise), or None when off."""
    if value is None or value is False:
        return None
    if value is True:
        return "tensorwise"
    if value not in FLOAT8_RECIPES:
        raise ConfigError(f"float8={value!r} is not known; known: false, true (= tensorwise), {', '.join(FLOAT8_RECIPES)}")
    return value


def listed(items: list[str], limit: int = 4) -> str:
    """'a; b; c; d; and 7 more': a long list kept to one readable line."""
    shown = "; ".join(items[:limit]) or "none"
    return f"{shown}; and {len(items) - limit} more" if len(items) > limit else shown


def convert_to_float8(model: torch.nn.Module, recipe: str, head: bool = False) -> tuple[int, list[str]]:
    """Swap ``model``'s linear layers for torchao's ``Float8Linear`` in place: their matmuls run in FP8 with scales
    computed each step (``recipe``: tensorwise or rowwise), master weights and optimizer state stay as they were.
    The weights are the same parameters, so ties and state-dict names (checkpoints, exports) do not change.

    Kept as they are: layers whose dimensions are not multiples of 16 (FP8 matmul kernels need them), MoE routers
    (routing decisions are sensitive to rounding), and the output head unless ``head``; MoE experts are not
    nn.Linear layers and stay as they are too. Returns how many layers were converted and the kept ones with the
    reason. Raises ConfigError when torchao is missing, no layer qualifies, or ``head`` is asked for and the head
    cannot be converted."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ConfigError(TORCHAO_MISSING.format(recipe)) from e
    head_linear = getattr(getattr(model, "head", None), "linear", None)
    if head and not isinstance(head_linear, torch.nn.Linear):
        raise ConfigError("float8_head=true: this model has no output-head linear layer to convert; set float8_head=false")
    if head and (head_linear.in_features % 16 or head_linear.out_features % 16):
        raise ConfigError(f"float8_head=true: the output head is {head_linear.in_features}x{head_linear.out_features}, "
                          "FP8 needs multiples of 16; set float8_head=false")
    kept: list[str] = []
    converted: list[str] = []

    def qualifies(module: torch.nn.Module, fqn: str) -> bool:
        if module is head_linear and not head:
            reason = "output head, float8_head=false"
        elif fqn.rsplit(".", 1)[-1] == "router":
            reason = "MoE router"
        elif module.in_features % 16 or module.out_features % 16:
            reason = f"{module.in_features}x{module.out_features} not multiples of 16"
        else:
            converted.append(fqn)
            return True
        kept.append(f"{fqn} ({reason})")
        return False

    # Attributes olm sets on layers (is_residual_out: scaled init) are carried over to the new modules.
    marked = {name for name, m in model.named_modules() if getattr(m, "is_residual_out", False)}
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=qualifies)
    for name, m in model.named_modules():
        if name in marked:
            m.is_residual_out = True
    if not converted:
        raise ConfigError(f"float8={recipe}: no linear layer qualifies (set float8=false); kept: {listed(kept)}")
    return len(converted), kept


def inductor_options(mode: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The inductor options of a compile ``mode`` updated with ``options`` (``compile_options`` in the config), checked
    here so that a typo is a one-line error naming the key instead of torch's list of every option."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile_mode={mode!r} is not supported; supported: {', '.join(COMPILE_MODES)}")
    if mode == "default" and not options:
        return {}
    if not isinstance(options, dict | None):
        raise ConfigError(f"compile_options must be a mapping of inductor options, got {options!r}")
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options

    merged = dict(list_mode_options(mode))
    known = inductor_config.get_config_copy()
    for key, value in _dotted(options or {}).items():
        if key not in known:
            raise ConfigError(f"compile_options.{key} is not a torch inductor option; e.g. coordinate_descent_tuning, "
                              "max_autotune, epilogue_fusion (torch._inductor.config)")
        if key == "triton.cudagraphs" and value:
            raise ConfigError("compile_options.triton.cudagraphs=true is not supported by olm's training step (see compile_mode)")
        merged[key] = value
    return merged


def select_sdpa_backend(name: str) -> None:
    """Restrict F.scaled_dot_product_attention to one fused kernel family (process-wide), or leave torch's choice
    (``auto``). The math kernel stays allowed as the fallback for inputs a fused kernel rejects (e.g. masks)."""
    if name == "auto" or not torch.cuda.is_available():
        return
    torch.backends.cuda.enable_flash_sdp(name == "flash")
    torch.backends.cuda.enable_cudnn_sdp(name == "cudnn")
    torch.backends.cuda.enable_mem_efficient_sdp(name == "efficient")
    torch.backends.cuda.enable_math_sdp(True)


def check_float8(float8: Any, float8_head: bool) -> None:
    """The FP8 options that need no device: a known recipe, the head only with FP8 on, torchao installed."""
    recipe = float8_recipe(float8)
    if float8_head and recipe is None:
        raise ConfigError("float8_head=true needs float8 on (float8=tensorwise or rowwise)")
    if recipe is not None and importlib.util.find_spec("torchao") is None:
        raise ConfigError(TORCHAO_MISSING.format(recipe))


def check_speed(speed: SpeedConfig) -> dict[str, Any]:
    """Checks of the speed options that need no device, run before any data or process starts; returns the
    inductor options to compile with (checked only when compiling or when set, as importing inductor takes
    seconds)."""
    check_float8(speed.float8, speed.float8_head)
    options = speed.compile_options
    options_set = any(options.values()) if isinstance(options, dict) else bool(options)
    if speed.compile or speed.compile_mode != "default" or options_set:
        return inductor_options(speed.compile_mode, options)
    return {}


def fused_cross_entropy(fused_loss: bool | str, head_softcap: float | None):
    """Liger's fused linear-cross-entropy (never materialises the (tokens x vocab) logits), when asked for or
    when ``auto`` on a GPU with liger-kernel installed; None means the plain path."""
    if fused_loss is False or head_softcap is not None:
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        if fused_loss is True:
            raise ConfigError("fused_loss=true needs liger-kernel (pip install 'olm[perf]'); or use fused_loss=auto")
        return None
    if fused_loss == "auto" and not torch.cuda.is_available():
        return None
    return LigerFusedLinearCrossEntropyLoss()


def processes_on_this_machine(devices: Any) -> int:
    """Training processes one CPU job starts on this machine (``trainer.devices``; CPU DDP: one per device)."""
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    if str(devices) == "-1":
        return os.cpu_count() or 1
    return 1


def busy_cores(seconds: float = 0.25) -> float:
    """Cores kept busy by other work, from two reads of /proc/stat ``seconds`` apart while this process sleeps (0
    where /proc/stat cannot be read). The load average would count this process's own previous job of a sweep."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    elapsed = total1 - total0
    cores = os.cpu_count() or 1
    return cores * (elapsed - (idle1 - idle0)) / elapsed if elapsed > 0 else 0.0


def cpu_threads(requested: int | None, processes_on_this_machine: int) -> int:
    """Threads per training process on the CPU: ``requested`` (``cpu_threads``), else ``OMP_NUM_THREADS`` when
    set, else SLURM's cores per task in a SLURM job, else the idle cores this process may use divided among the
    job's processes on this machine and the jobs that olm's parallel launcher runs beside it (at least 1), so that
    no job oversubscribes the cores. Idle: cores that other work keeps busy are left out, since an intra-op thread
    that shares a core with another process stalls every other thread of its operation."""
    if requested is not None:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():  # each srun task is one training process
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    concurrent = int(os.environ.get("OLM_CONCURRENT_JOBS", "1") or 1)
    processes = max(1, processes_on_this_machine * concurrent)
    if processes > 1:  # ranks or jobs side by side: each takes its share (they would count each other as busy)
        return max(1, cores // processes)
    busy = busy_cores()
    threads = max(1, min(cores, (os.cpu_count() or cores) - round(busy)))
    if threads < cores:
        log.info("CPU threads: %d of %d cores (%.1f busy with other work; cpu_threads=N "
                 "sets it)", threads, cores, busy)
    return threads
