"""LMModule: next-token training of any registry-built model with Lightning."""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

import olm
from olm.registry import ConfigError, OlmError

log = logging.getLogger("olm")
SCHEDULES = ("cosine", "constant", "wsd", "linear")
SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
# torch.compile modes olm's training step supports. The CUDA-graph modes (reduce-overhead, max-autotune) are refused:
# the profiled step keeps the GPU 98% busy, so graphs could win at most ~2%, and they break on tied embeddings.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# What one compiled graph covers: the whole model and loss, or each transformer block (plus one for head and loss).
COMPILE_SCOPES = ("model", "blocks")
# torchao's FP8 training recipes (dynamic scaling): one scale per tensor, or per row (finer, slower kernels).
FLOAT8_RECIPES = ("tensorwise", "rowwise")
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


def _listed(items: list[str], limit: int = 4) -> str:
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
        raise ConfigError(f"float8={recipe}: no linear layer qualifies (set float8=false); kept: {_listed(kept)}")
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


class NonFiniteLossError(OlmError, RuntimeError):
    """Training produced a NaN/inf loss; the message names the step and the last good checkpoint."""


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


class LMModule(L.LightningModule):
    """Wraps an olm model built from ``model_cfg``; the loop knows nothing of the model's internals.

    ``optim``: lr, weight_decay, betas, eps, fused, decay_embeddings, decay_norms_and_biases.
    ``scheduler``: name (cosine|linear|constant|wsd), warmup_steps, min_lr_ratio, decay_fraction.
    Metrics are accumulated on the device and logged every ``log_every_n_steps`` optimizer steps, so the training
    step never waits for the host.
    """

    def __init__(self, model_cfg: dict, optim: dict, scheduler: dict, *, max_steps: int, log_every_n_steps: int = 10,
                 compile: bool = False, bytes_per_token: float | None = None, activation_checkpointing: bool = False,
                 skip_nonfinite_batches: int = 0, fused_loss: str | bool = "auto", attention_backend: str = "auto",
                 compile_mode: str = "default", compile_scope: str = "model", compile_options: dict | None = None,
                 float8: str | bool = False, float8_head: bool = False):
        super().__init__()
        self.model_cfg = dict(model_cfg)
        self.model = olm.build_model(self.model_cfg)
        self.optim_cfg, self.scheduler_cfg = dict(optim), dict(scheduler)
        if self.scheduler_cfg.get("name", "cosine") not in SCHEDULES:
            raise ConfigError(f"scheduler.name={self.scheduler_cfg.get('name')!r} is not known; known: {', '.join(SCHEDULES)}")
        self.max_steps, self.log_every_n_steps = max_steps, log_every_n_steps
        self.compile_model, self.bytes_per_token = compile, bytes_per_token
        self.activation_checkpointing = activation_checkpointing
        if fused_loss not in ("auto", True, False):
            raise ConfigError(f"fused_loss={fused_loss!r} is not known; known: auto, true, false")
        self.fused_loss = fused_loss
        if attention_backend not in SDPA_BACKENDS:
            raise ConfigError(f"attention_backend={attention_backend!r} is not known; known: {', '.join(SDPA_BACKENDS)}")
        self.attention_backend = attention_backend
        if compile_scope not in COMPILE_SCOPES:
            raise ConfigError(f"compile_scope={compile_scope!r} is not known; known: {', '.join(COMPILE_SCOPES)}")
        self.compile_scope = compile_scope
        self.float8 = float8_recipe(float8)
        if not isinstance(float8_head, bool):
            raise ConfigError(f"float8_head={float8_head!r} must be true or false")
        if float8_head and self.float8 is None:
            raise ConfigError("float8_head=true needs float8 on (float8=tensorwise or rowwise)")
        if self.float8 is not None and importlib.util.find_spec("torchao") is None:  # before any data or process starts
            raise ConfigError(TORCHAO_MISSING.format(self.float8))
        self.float8_head = float8_head
        # Checked (importing inductor takes seconds) when compiling, or when set without compile=true.
        options_set = any(compile_options.values()) if isinstance(compile_options, dict) else bool(compile_options)
        if compile or compile_mode != "default" or options_set:
            self.compile_options = inductor_options(compile_mode, compile_options)
        else:
            self.compile_options = {}
        self._fused_ce = None  # set in configure_model when the fused linear-cross-entropy kernel is used
        self._hidden_states = self.model.hidden_states  # replaced by its compiled version with compile=True
        self.wandb_run_id: str | None = None
        if not isinstance(skip_nonfinite_batches, int) or skip_nonfinite_batches < 0:
            raise ConfigError(f"callbacks.nan_guard.skip_batches={skip_nonfinite_batches!r} must be an integer >= 0")
        self.skip_nonfinite_batches, self.skipped_batches = skip_nonfinite_batches, 0
        self._first_nonfinite_step = None  # device tensor: the first step (1-based) whose loss was NaN/inf, else 0
        self._train_loss_sum = None  # device tensors: summed between log steps
        self._train_loss_count = 0
        self._grad_norm = None
        self.last_train_loss: float | None = None  # mean training loss of the last logged interval (progress bar)
        self._val_sum = None
        self._val_count = None
        self.save_hyperparameters({"model": self.model_cfg, "optim": self.optim_cfg, "scheduler": self.scheduler_cfg})

    # -- model ---------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        self.model.activation_checkpointing = self.activation_checkpointing
        select_sdpa_backend(self.attention_backend)
        self._fused_ce = self._make_fused_ce()
        if self.float8 is not None and not getattr(self, "_float8_done", False):
            self._check_float8_device()
            if self.float8_head and self._fused_ce is not None:
                raise ConfigError(f"float8_head=true does not apply with fused_loss={str(self.fused_loss).lower()} (liger-kernel's fused "
                                  "loss multiplies by the head weight itself); set fused_loss=false or float8_head=false")
            # Before compiling, so that the casts compile with the matmuls; eager, each cast is a kernel of its own.
            converted, kept = convert_to_float8(self.model, self.float8, head=self.float8_head)
            self._float8_done = True
            if self.global_rank == 0:
                log.info("float8=%s: %d linear layers in FP8; not converted: %s", self.float8, converted, _listed(kept))
                if not self.compile_model:
                    log.warning("float8=%s without compile=true: the FP8 casts run as separate kernels; its speed was "
                                "measured with compile=true only (benchmarks/RESULTS.md)", self.float8)
        if self.compile_model and not getattr(self, "_compiled", False):
            # Dynamo's DDP optimizer splits the compiled graph at gradient-bucket boundaries to overlap all-reduce
            # with backward; measured here it cost far more in lost fusion than it gained (benchmarks/RESULTS.md).
            torch._dynamo.config.optimize_ddp = False
            compile = functools.partial(torch.compile, options=self.compile_options or None)
            if self.compile_scope == "model":
                # One graph from token ids to the loss; parameter names (and checkpoints) are unchanged. Without the
                # fused kernel the head and loss are in the graph, so log-softmax fuses with the logits.
                self._hidden_states = compile(self.model.hidden_states)
                self._compiled_loss = compile(self._unfused_loss)
            else:
                # Regional compilation: each transformer block is compiled in place (names unchanged), identical blocks
                # share one compiled graph, so compile time does not grow with depth; head and loss are one more graph.
                for block in self.model.blocks:
                    block.compile(options=self.compile_options or None)
                self._compiled_head_loss = compile(self._head_loss)
            self._compiled = True

    def _check_float8_device(self) -> None:
        """FP8 matmuls need compute capability 8.9 or newer (Ada, Hopper, Blackwell). On the CPU they are emulated:
        correct (tests), not faster."""
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if cap is not None and cap < (8, 9):
            name = torch.cuda.get_device_name(device)
            raise ConfigError(f"float8={self.float8} needs a GPU with FP8 matmuls (compute capability 8.9+); "
                              f"{name} has {cap[0]}.{cap[1]}; set float8=false")

    def _make_fused_ce(self):
        """Liger's fused linear-cross-entropy (never materialises the (tokens x vocab) logits), when asked for or
        when ``auto`` on a GPU with liger-kernel installed; None means the plain path."""
        if self.fused_loss is False or self.model.head.softcap is not None:
            return None
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            if self.fused_loss is True:
                raise ConfigError("fused_loss=true needs liger-kernel (pip install 'olm[perf]'); or use fused_loss=auto")
            return None
        if self.fused_loss == "auto" and not torch.cuda.is_available():
            return None
        return LigerFusedLinearCrossEntropyLoss()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _head_loss(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = self.model.head(hidden)  # (B, T, V); fp32 inside cross_entropy under autocast
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)

    def _unfused_loss(self, idx: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        head_loss = getattr(self, "_compiled_head_loss", self._head_loss)
        return head_loss(self._hidden_states(idx), targets, reduction)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy, plus any auxiliary loss the model reports (e.g. MoE load balancing)."""
        if self._fused_ce is not None and reduction == "mean" and self.training:
            head = self.model.head
            hidden = head.norm(self._hidden_states(idx)).flatten(0, 1)  # (B*T, C)
            loss = self._fused_ce(head.linear.weight, hidden, targets.flatten(), head.linear.bias)
        else:
            loss = getattr(self, "_compiled_loss", self._unfused_loss)(idx, targets, reduction)
        aux_loss = getattr(self.model, "aux_loss", None)
        aux = aux_loss() if callable(aux_loss) and self.training else None
        return loss if aux is None else loss + aux

    # -- training ------------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        idx, targets = batch
        loss = self.loss(idx, targets)
        step = self.global_step + 1  # the optimizer step this batch belongs to (1-based, as in metrics.csv)
        if self.skip_nonfinite_batches:
            # Skipping needs the host to see every loss, a sync paid only when skipping is enabled. Ranks decide
            # together (one tiny all-reduce), so that all of them skip the same step and none waits in backward.
            bad = (~torch.isfinite(loss.detach())).float()
            if self.trainer.world_size > 1:
                bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
            if bad.item() > 0:
                value = loss.item()
                value = str(value) if not math.isfinite(value) else f"on another rank; here {value:.4f}"
                self.skipped_batches += 1
                if self.skipped_batches > self.skip_nonfinite_batches:
                    raise NonFiniteLossError(
                        f"non-finite loss ({value}) at step {step} after skipping "
                        f"{self.skip_nonfinite_batches} batch(es) (callbacks.nan_guard.skip_batches); stopping. "
                        + self._last_checkpoint_note()
                    )
                log.warning("non-finite loss (%s) at step %d: batch skipped (%d of %d allowed by callbacks.nan_guard.skip_batches)",
                            value, step, self.skipped_batches, self.skip_nonfinite_batches)
                return None  # Lightning skips backward and the optimizer update
        detached = loss.detach()
        # Remember the first non-finite step on the device (no host sync); check_finite reports it.
        if self._first_nonfinite_step is None:
            self._first_nonfinite_step = torch.zeros((), dtype=torch.long, device=detached.device)
        self._first_nonfinite_step = torch.where(
            (self._first_nonfinite_step == 0) & ~torch.isfinite(detached), step, self._first_nonfinite_step
        )
        self._train_loss_sum = detached if self._train_loss_sum is None else self._train_loss_sum + detached
        self._train_loss_count += 1
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        from lightning.pytorch.strategies import FSDPStrategy

        if gradient_clip_algorithm == "value":
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if isinstance(self.trainer.strategy, FSDPStrategy):
            # Lightning's FSDP precision plugin refuses norm clipping; the FSDP module computes the global norm itself.
            max_norm = gradient_clip_val if gradient_clip_val else float("inf")
            self._grad_norm = self.trainer.strategy.model.clip_grad_norm_(max_norm)
            return
        # One foreach kernel both measures and clips; the norm stays on the device until the next log step.
        max_norm = gradient_clip_val if gradient_clip_val else float("inf")
        self._grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm, foreach=True)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        step = self.trainer.global_step  # optimizer steps done
        accumulating = (batch_idx + 1) % self.trainer.accumulate_grad_batches != 0
        if accumulating or step % self.log_every_n_steps != 0 or self._train_loss_sum is None:
            return
        # Mean over ranks: the logged loss is the global batch's, equal to a one-process run's.
        mean_loss = self.trainer.strategy.reduce(self._train_loss_sum / self._train_loss_count, reduce_op="mean")
        self.check_finite(mean_loss)
        metrics = {"train/loss": mean_loss, "lr": self.lr_schedulers().get_last_lr()[0]}
        if self._grad_norm is not None:
            metrics["train/grad_norm"] = self._grad_norm
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False)
        # For the progress bar, a number read once here (check_finite has just synced). A tensor logged with
        # prog_bar=True would be converted by Lightning with .item() at every later batch: a host sync per step.
        self.last_train_loss = float(mean_loss)
        self._train_loss_sum, self._train_loss_count = None, 0

    def check_finite(self, reduced_loss: torch.Tensor | None = None) -> None:
        """Raise NonFiniteLossError if a loss since the last check was NaN/inf, naming the first such step.

        One host sync; called at log steps, before validation and after fit, so no checkpoint or export is ever
        written from diverged weights. Every rank calls it at the same points and decides on the loss reduced
        over ranks (``reduced_loss`` if the caller has it), so all ranks stop together.
        """
        if self._train_loss_sum is None:
            return
        if reduced_loss is None:
            reduced_loss = self.trainer.strategy.reduce(self._train_loss_sum, reduce_op="sum")
        if torch.isfinite(reduced_loss).item():
            return
        none = 2**40
        first = self._first_nonfinite_step
        first = torch.where(first > 0, first, none).double() if first is not None else torch.tensor(float(none))
        if self.trainer.world_size > 1:
            first = self.trainer.strategy.reduce(first.to(self.device), reduce_op="min")  # the earliest over ranks
        first = int(first.item())
        where = f"at step {first}" if 0 < first < none else f"at or before step {self.global_step}"
        raise NonFiniteLossError(
            f"non-finite training loss ({float(reduced_loss)}) {where}; stopping. " + self._last_checkpoint_note()
        )

    def _last_checkpoint_note(self) -> str:
        callback = getattr(self.trainer, "checkpoint_callback", None)
        path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        if path:
            return f"The last good checkpoint is kept: {path} (resume from it with a lower lr, or set callbacks.nan_guard.skip_batches)"
        return "No checkpoint had been written yet"

    # -- validation ----------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self):
        if self.trainer.state.fn == "fit":
            self.check_finite()
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_count = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch, batch_idx):
        idx, targets = batch
        loss_sum = self.loss(idx, targets, reduction="sum")
        self._val_sum += loss_sum.double()
        self._val_count += targets.numel()

    def on_validation_epoch_end(self):
        # Token-weighted mean over every rank's windows, reduced once.
        total = self.trainer.strategy.reduce(torch.stack([self._val_sum, self._val_count]), reduce_op="sum")
        val_loss = (total[0] / total[1].clamp_min(1)).float()
        metrics = {"val/loss": val_loss, "val/ppl": torch.exp(val_loss)}
        if self.bytes_per_token:
            metrics["val/bpb"] = val_loss / math.log(2) / self.bytes_per_token
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True, prog_bar=False)  # already reduced: same on every rank
        # ModelCheckpoint monitors a name without "/" so that it can appear in checkpoint file names.
        self.log("val_loss", val_loss, on_step=False, on_epoch=True, prog_bar=True, logger=False, sync_dist=True)

    # -- optimizer -----------------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Weight decay on matrices only; embeddings, norms and biases are configurable (off by default)."""
        return parameter_groups(
            self.model, float(self.optim_cfg.get("weight_decay", 0.1)),
            decay_embeddings=self.optim_cfg.get("decay_embeddings", False),
            decay_norms_and_biases=self.optim_cfg.get("decay_norms_and_biases", False),
        )

    def configure_optimizers(self):
        cfg = self.optim_cfg
        fused = cfg.get("fused")
        if fused is None:  # fused AdamW is fastest on GPU; CPU uses the foreach implementation
            fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(
            self.parameter_groups(), lr=float(cfg.get("lr", 1e-3)), betas=tuple(cfg.get("betas", (0.9, 0.95))),
            eps=float(cfg.get("eps", 1e-8)), fused=bool(fused) or None,
        )
        s = self.scheduler_cfg
        schedule = dict(
            schedule=s.get("name", "cosine"), warmup_steps=int(s.get("warmup_steps", 0)),
            total_steps=int(s.get("total_steps") or self.max_steps),
            min_lr_ratio=float(s.get("min_lr_ratio", 0.1)), decay_fraction=float(s.get("decay_fraction", 0.2)),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, **schedule))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store what a resume needs beyond Lightning's state: RNG states, the W&B run id, the model config."""
        np_state = np.random.get_state()
        checkpoint["olm"] = {
            "model_config": self.model.to_config(),
            "wandb_run_id": self.wandb_run_id,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": list(random.getstate()[1]),
                "python_version": random.getstate()[0],
                "python_gauss": random.getstate()[2],
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            },
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._restart_epoch_over_remaining_batches(checkpoint)
        state = checkpoint.get("olm", {})
        self.wandb_run_id = state.get("wandb_run_id")
        rng = state.get("rng")
        if not rng:
            return
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
        name, keys, *rest = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))

    @staticmethod
    def _restart_epoch_over_remaining_batches(checkpoint: dict) -> None:
        """Resuming from a checkpoint written mid-epoch (any kill or crash): olm's datamodule resumes the data itself,
        its train loader yielding exactly the batches not yet trained on (from ``global_step x accumulate``). Lightning
        would instead continue the restored epoch, count the batches done before the checkpoint against that shorter
        loader, end the "epoch" early and replay batches. So the resumed run starts its pass over the remaining batches
        at batch 0 of the epoch (global step, optimizer, scheduler and RNG states are restored as usual). This runs
        before Lightning restores its loops from the same dict."""
        fit_loop = checkpoint.get("loops", {}).get("fit_loop") or {}
        progress = fit_loop.get("epoch_loop.batch_progress")
        if not isinstance(progress, dict) or progress.get("is_last_batch", True):
            return
        current = progress.get("current")
        if isinstance(current, dict):
            progress["current"] = {key: 0 for key in current}

