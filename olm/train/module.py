"""LMModule: next-token training of any registry-built model with Lightning."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

import olm
from olm.errors import ConfigError, OlmError
from olm.train.config import AdamWConfig, OptimizerConfig, SchedulerConfig, SpeedConfig
from olm.train.optim import build_optimizer, build_scheduler, describe_groups
from olm.train.speed import (check_speed, convert_to_float8, float8_recipe, fused_cross_entropy, listed,
                             select_sdpa_backend)

log = logging.getLogger("olm")


class NonFiniteLossError(OlmError, RuntimeError):
    """Training produced a NaN/inf loss; the message names the step and the last good checkpoint."""


class LMModule(L.LightningModule):
    """Wraps an olm model built from ``model_cfg``; the loop knows nothing of the model's internals.

    ``optim``, ``scheduler`` and ``speed`` are the run's typed configs (olm.train.config). Metrics are accumulated on
    the device and logged every ``log_every_n_steps`` optimizer steps, so the training step never waits for the host.
    ``skip_nonfinite_batches``: non-finite losses tolerated (each batch skipped) before the run stops.
    """

    def __init__(self, model_cfg: dict, optim: OptimizerConfig | None = None, scheduler: SchedulerConfig | None = None,
                 speed: SpeedConfig | None = None, *, max_steps: int, log_every_n_steps: int,
                 bytes_per_token: float | None = None, skip_nonfinite_batches: int = 0):
        super().__init__()
        self.model_cfg = dict(model_cfg)
        self.model = olm.build_model(self.model_cfg)
        self.optim_cfg = optim or AdamWConfig()
        self.scheduler_cfg = scheduler or SchedulerConfig()
        self.speed = speed or SpeedConfig()
        self.compile_options = check_speed(self.speed)  # before any data or process starts
        self.float8 = float8_recipe(self.speed.float8)
        self.max_steps, self.log_every_n_steps = max_steps, log_every_n_steps
        self.bytes_per_token = bytes_per_token
        self._fused_ce = None  # set in configure_model when the fused linear-cross-entropy kernel is used
        self._hidden_states = self.model.hidden_states  # replaced by its compiled version with compile=True
        self.wandb_run_id: str | None = None
        self.skip_nonfinite_batches, self.skipped_batches = skip_nonfinite_batches, 0
        self._first_nonfinite_step = None  # device tensor: the first step (1-based) whose loss was NaN/inf, else 0
        self._train_loss_sum = None  # device tensors: summed between log steps
        self._train_loss_count = 0
        self._grad_norm = None
        self.last_train_loss: float | None = None  # mean training loss of the last logged interval (progress bar)
        self._val_sum = None
        self._val_count = None
        # (name, bytes per token) of each val loader when the data has several sources: val/<name>/loss, .../bpb
        self.val_sources: list[tuple[str, float | None]] = []
        self.save_hyperparameters({"model": self.model_cfg, "optim": dataclasses.asdict(self.optim_cfg),
                                   "scheduler": dataclasses.asdict(self.scheduler_cfg)})

    # -- model ---------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        speed = self.speed
        self.model.activation_checkpointing = speed.activation_checkpointing
        select_sdpa_backend(speed.attention_backend)
        self._fused_ce = fused_cross_entropy(speed.fused_loss, self.model.head.softcap)
        if self.float8 is not None and not getattr(self, "_float8_done", False):
            self._check_float8_device()
            if speed.float8_head and self._fused_ce is not None:
                raise ConfigError(f"float8_head=true does not apply with fused_loss={str(speed.fused_loss).lower()} "
                                  "(liger-kernel's fused loss multiplies by the head weight itself); set "
                                  "fused_loss=false or float8_head=false")
            # Before compiling, so that the casts compile with the matmuls; eager, each cast is a kernel of its own.
            converted, kept = convert_to_float8(self.model, self.float8, head=speed.float8_head)
            self._float8_done = True
            if self.global_rank == 0:
                log.info("float8=%s: %d linear layers in FP8; not converted: %s", self.float8, converted, listed(kept))
                if not speed.compile:
                    log.warning("float8=%s without compile=true: the FP8 casts run as separate kernels; its speed was "
                                "measured with compile=true only (benchmarks/RESULTS.md)", self.float8)
        if speed.compile and not getattr(self, "_compiled", False):
            # Dynamo's DDP optimizer splits the compiled graph at gradient-bucket boundaries to overlap all-reduce
            # with backward; measured here it cost far more in lost fusion than it gained (benchmarks/RESULTS.md).
            torch._dynamo.config.optimize_ddp = False
            compile = functools.partial(torch.compile, options=self.compile_options or None)
            if speed.compile_scope == "model":
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
            hidden = head.features(self._hidden_states(idx)).flatten(0, 1)  # (B*T, C)
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
        step = self.global_step + 1  # the optimizer step this batch belongs to (1-based; metrics.csv counts from 0)
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
        metrics.update(self._routing_metrics())
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False)
        # For the progress bar, a number read once here (check_finite has just synced). A tensor logged with
        # prog_bar=True would be converted by Lightning with .item() at every later batch: a host sync per step.
        self.last_train_loss = float(mean_loss)
        self._train_loss_sum, self._train_loss_count = None, 0

    def _routing_metrics(self) -> dict[str, torch.Tensor]:
        """MoE layers of the last forward: their load-balancing loss (``train/aux_loss``) and the busiest expert's
        load over the mean load, the worst layer's (``train/expert_load_max``: 1 is perfect balance); none for a dense
        model. The balance bias (DeepSeek-V3) works through the loads, so this shows it at work as well."""
        aux = self.model.aux_loss() if callable(getattr(self.model, "aux_loss", None)) else None
        loads = [m.last_load.float() for m in self.model.modules() if getattr(m, "last_load", None) is not None]
        metrics = {} if aux is None else {"train/aux_loss": aux.detach()}
        if loads:
            metrics["train/expert_load_max"] = torch.stack([load.max() / load.mean().clamp_min(1e-9)
                                                            for load in loads]).max()
        return metrics

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
        loaders = max(1, len(self.val_sources))  # one sum per val loader (per data source)
        self._val_sum = torch.zeros(loaders, device=self.device, dtype=torch.float64)
        self._val_count = torch.zeros(loaders, device=self.device, dtype=torch.float64)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        idx, targets = batch
        loss_sum = self.loss(idx, targets, reduction="sum")
        self._val_sum[dataloader_idx] += loss_sum.double()
        self._val_count[dataloader_idx] += targets.numel()

    def on_validation_epoch_end(self):
        # Token-weighted means over every rank's windows, reduced once: overall, and per source.
        total = self.trainer.strategy.reduce(torch.stack([self._val_sum, self._val_count]), reduce_op="sum")
        val_loss = (total[0].sum() / total[1].sum().clamp_min(1)).float()
        metrics = {"val/loss": val_loss, "val/ppl": torch.exp(val_loss)}
        if self.bytes_per_token:
            metrics["val/bpb"] = val_loss / math.log(2) / self.bytes_per_token
        for i, (name, bytes_per_token) in enumerate(self.val_sources):
            source_loss = (total[0, i] / total[1, i].clamp_min(1)).float()
            metrics[f"val/{name}/loss"] = source_loss
            if bytes_per_token:
                metrics[f"val/{name}/bpb"] = source_loss / math.log(2) / bytes_per_token
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True, prog_bar=False)  # already reduced: same on every rank
        # ModelCheckpoint monitors a name without "/" so that it can appear in checkpoint file names.
        self.log("val_loss", val_loss, on_step=False, on_epoch=True, prog_bar=True, logger=False, sync_dist=True)

    # -- optimizer -----------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.optim_cfg, self.device.type)
        if self.global_rank == 0:
            log.info("optimizer %s, parameter groups:\n  %s", self.optim_cfg.name,
                     "\n  ".join(describe_groups(optimizer)))
        scheduler = build_scheduler(optimizer, self.scheduler_cfg, self.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        if getattr(self, "_restored", False):
            self._apply_optim_settings()

    def _apply_optim_settings(self) -> None:
        """After a resume, the optimizer's settings are the config's, not the checkpoint's: Lightning restores the
        saved param groups (lr, weight decay, betas, ...), which would silently ignore ``optim.lr=...`` on the
        command line. Each restored group takes the settings of the group a fresh build makes for the same tensors;
        moments and step counts stay restored, and the schedule goes on from the restored step."""
        optimizer = self.trainer.optimizers[0]
        scheduler = self.lr_schedulers()
        fresh = build_optimizer(self.model, self.optim_cfg, self.device.type).param_groups
        restored = optimizer.param_groups
        if [len(g["params"]) for g in fresh] != [len(g["params"]) for g in restored]:
            raise ConfigError(f"optim.name={self.optim_cfg.name!r}: the checkpoint's optimizer has other parameter "
                              "groups; resume with the optimizer it was trained with")
        for group, new in zip(restored, fresh):
            group.update({k: v for k, v in new.items() if k != "params"}, initial_lr=new["lr"])
        scheduler.base_lrs = [group["initial_lr"] for group in restored]
        for group, base, factor in zip(restored, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in restored]

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
        self._restored = True
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

