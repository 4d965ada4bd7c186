"""Training callbacks: throughput and MFU, atomic checkpoint files, a progress bar without per-step host syncs."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

from olm.errors import OlmError
from olm.train.flops import flops_per_token, peak_flops


class ThroughputMonitor(L.Callback):
    """Logs tokens seen, training FLOPs so far (olm.train.flops), tokens/s and MFU every ``log_every_n_steps`` optimizer steps (no per-step host sync).

    tokens per optimizer step = per-device batch x seq_len x accumulate_grad_batches x world size. The run's
    tokens/s excludes the first logging interval (compilation and warm-up) and the pauses for validation and the
    checkpoint written after it, so it measures training steps only.
    """

    def __init__(self, seq_len: int, batch_size: int, log_every_n_steps: int):
        self.seq_len, self.batch_size, self.log_every_n_steps = seq_len, batch_size, log_every_n_steps
        self.tokens_per_step = 0
        self.flops_per_token = 0.0
        self.peak = None
        self._last_time = None
        self._last_step = 0
        self._timed_tokens = 0
        self._timed_seconds = 0.0
        self._intervals = 0
        self._paused_at = None

    def on_train_start(self, trainer, pl_module):
        self.tokens_per_step = self.batch_size * self.seq_len * trainer.accumulate_grad_batches * trainer.world_size
        import olm
        from olm.nn.structure import meta_device

        with meta_device():  # the unsharded model's shapes (under FSDP pl_module.model holds one shard)
            self.flops_per_token = flops_per_token(olm.build_model(pl_module.model_cfg), self.seq_len)
        if pl_module.device.type == "cuda":
            per_device = peak_flops(torch.cuda.get_device_name(pl_module.device))
            self.peak = per_device * trainer.world_size if per_device else None
        self._last_time, self._last_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._last_step or step % self.log_every_n_steps:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()  # once per logging interval, so the interval's time is the GPU's
        now = time.perf_counter()
        tokens = (step - self._last_step) * self.tokens_per_step
        tokens_per_sec = tokens / max(now - self._last_time, 1e-9)
        seen = step * self.tokens_per_step
        metrics = {"tokens_seen": float(seen), "flops_seen": float(seen * self.flops_per_token),
                   "perf/tokens_per_sec": tokens_per_sec}
        if self.peak:
            metrics["perf/mfu"] = tokens_per_sec * self.flops_per_token / self.peak
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        if self._intervals > 0:
            self._timed_tokens += tokens
            self._timed_seconds += now - self._last_time
        self._intervals += 1
        self._last_time, self._last_step = now, step

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "fit":
            self.pause()

    def pause(self) -> None:
        """Stop the clock until the next training batch (validation, an in-loop evaluation)."""
        if self._last_time is not None and self._paused_at is None:
            self._paused_at = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # Validation and the checkpoint saved after it are not training time: resume the clock at the next batch.
        if self._paused_at is not None:
            self._last_time += time.perf_counter() - self._paused_at
            self._paused_at = None

    @property
    def tokens_per_sec(self) -> float | None:
        return self._timed_tokens / self._timed_seconds if self._timed_seconds else None

    @property
    def mfu(self) -> float | None:
        tps = self.tokens_per_sec
        return tps * self.flops_per_token / self.peak if tps and self.peak else None


class _ShowsLastLoss:
    """Adds the module's ``last_train_loss`` (the mean loss of the last logging interval, a number read at the log
    step) to a progress bar's metrics. Metrics logged with ``prog_bar=True`` would instead be converted from device
    tensors with ``.item()`` by Lightning at every batch, a host sync per training step."""

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the logger's run id: the run dir already names the run
        loss = getattr(pl_module, "last_train_loss", None)
        if loss is not None:
            items["loss"] = f"{loss:.4g}"
        return items


class LossProgressBar(_ShowsLastLoss, TQDMProgressBar):
    """Lightning's tqdm progress bar with the last logged training loss, counting steps, not epochs."""

    def on_train_epoch_start(self, trainer, *args):
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description("train")


class RichLossProgressBar(_ShowsLastLoss, RichProgressBar):
    """Lightning's rich progress bar with the last logged training loss. olm trains for a number of steps in one
    pass over the data, so the bar says "train", not Lightning's "Epoch 0/-2"."""

    def _get_train_description(self, current_epoch: int) -> str:
        return "train"


class QuietModelSummary(ModelSummary):
    """Lightning's model summary without its FLOPs column and total, which are 0 unless a module sets an example
    input (olm reports FLOPs per token and MFU in metrics.csv instead)."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **kwargs) -> None:
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns)
        kept = [line for line in table.splitlines() if not line.endswith("Total Flops")]
        logging.getLogger("lightning.pytorch.callbacks.model_summary").info("\n" + "\n".join(kept))


def progress_bars(enable_progress_bar) -> list[TQDMProgressBar | RichProgressBar]:
    """For ``trainer.enable_progress_bar``: the bar Lightning would pick by default (rich when installed, else tqdm)
    showing the loss, or none. ``None`` means on, as in Lightning."""
    if enable_progress_bar is not None and not enable_progress_bar:
        return []
    return [RichLossProgressBar() if _RICH_AVAILABLE else LossProgressBar()]


class TokenizerRecord(L.Callback):
    """Writes the identity of the data's tokenizer (``Tokenizer.identity``) into every checkpoint, so that resuming or
    fine-tuning it on data of another tokenizer is refused (olm.train.run.check_same_tokenizer)."""

    def __init__(self, identity: str):
        self.identity = identity

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["olm_tokenizer"] = {"identity": self.identity}



class CheckpointWriteError(OlmError, RuntimeError):
    """A checkpoint could not be written (full disk, quota, read-only or vanished directory); names the file."""


class AtomicModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose files are written to a temporary name, fsynced and renamed into place.

    Every file it writes (best-k and ``last.ckpt``: Lightning's ``_save_last_checkpoint`` and top-k saving both end in
    ``_save_checkpoint``) goes through ``<name>.ckpt.tmp`` -> fsync -> ``os.replace`` -> fsync of the directory. A run
    killed while writing never leaves a truncated ``last.ckpt``: the previous one survives intact, and the partial
    ``.tmp`` (never picked by :func:`latest_checkpoint`) is removed when the next run starts. A write that fails
    (e.g. a full disk) removes its ``.tmp`` and stops the run with :class:`CheckpointWriteError`.
    """

    def __init__(self, *args, **kwargs):
        # ``last.ckpt`` is always the newest state: never ``last-v1.ckpt`` beside a stale ``last.ckpt``.
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and os.path.isdir(self.dirpath):
            for leftover in Path(self.dirpath).glob(f"*{self.FILE_EXTENSION}.tmp"):  # from a run killed mid-write
                leftover.unlink(missing_ok=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.fast_dev_run:  # Lightning 2.6 writes last.ckpt here even in a fast dev run, which saves nothing else
            return
        super().on_train_end(trainer, pl_module)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        tmp = f"{filepath}.tmp"
        try:
            trainer.save_checkpoint(tmp, self.save_weights_only)
            if trainer.is_global_zero:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, filepath)
                directory = os.open(os.path.dirname(filepath) or ".", os.O_RDONLY)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
        except OSError as exc:
            if trainer.is_global_zero:
                try:
                    os.unlink(tmp)  # a partial file only takes space
                except OSError:
                    pass
            kept = f"; the previous checkpoint is kept: {self.last_model_path}" if self._previous_kept(filepath) else ""
            raise CheckpointWriteError(
                f"cannot write checkpoint {filepath!r}: {exc.strerror or exc}{kept}"
            ) from exc
        trainer.strategy.barrier("olm_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)  # metrics.csv is flushed here: rows up to the checkpoint survive a kill

    def _previous_kept(self, filepath: str) -> bool:
        last = self.last_model_path
        return bool(last) and os.path.isfile(last)


class OptunaPruning(L.Callback):
    """Reports the val loss of every validation to this job's Optuna trial (``sweep.trial`` in ``sweep.study`` at
    ``sweep.storage``, set by olm's Optuna sweeper) and stops training when the study's pruner says so: the run then
    ends ``pruned`` (summary.json, exit 0) at the step it reached."""

    def __init__(self, storage: str, study: str, trial: int):
        self.storage, self.study, self.trial_number = storage, study, trial
        self.trial = None
        self.pruned_at: int | None = None

    def on_fit_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        from olm.train.sweeps import load_trial

        self.trial = load_trial(self.storage, self.study, self.trial_number)

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != "fit" or "val/loss" not in trainer.callback_metrics:
            return
        prune = False
        if trainer.is_global_zero and self.trial is not None:
            self.trial.report(float(trainer.callback_metrics["val/loss"]), step=trainer.global_step)
            prune = self.trial.should_prune()
        prune = trainer.strategy.broadcast(prune, src=0)  # every rank stops at the same step
        if prune:
            self.pruned_at = trainer.global_step
            trainer.should_stop = True


class DownstreamEval(L.Callback):
    """Evaluates the live model on lm-eval tasks (``callbacks.eval``) every ``every_n_steps`` optimizer steps and
    once when training ends, and logs ``eval/<task>/<metric>`` to every logger (metrics.csv, W&B).

    The tasks are resolved and their data loaded once, at the start of training, so a bad name or missing data
    stops the run before its first step. Rank 0 evaluates its replica while the other ranks wait (under DDP the
    replicas are equal); the throughput clock is paused meanwhile, as for validation. ``last`` holds the latest
    values, which the run puts in summary.json; a resumed run continues at the next multiple of ``every_n_steps``.
    """

    def __init__(self, config, throughput: ThroughputMonitor | None = None, cache_dir: str | None = None):
        self.config, self.throughput, self.cache_dir = config, throughput, cache_dir
        self.tasks = None
        self.last: dict[str, float] = {}
        self._evaluated_at = None

    def on_fit_start(self, trainer, pl_module):
        from olm.eval.run import resolve_tasks

        if trainer.is_global_zero:
            started = time.perf_counter()
            self.tasks = resolve_tasks(list(self.config.tasks), list(self.config.include_path), self.cache_dir,
                                       where="callbacks.eval.tasks")
            logging.getLogger("olm.train").info("callbacks.eval: %s ready in %.1f s", ", ".join(self.tasks.names),
                                                time.perf_counter() - started)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        every = self.config.every_n_steps
        step = trainer.global_step
        if every and step % every == 0 and step != self._evaluated_at and not trainer.should_stop:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step != self._evaluated_at and not any(
                getattr(cb, "pruned_at", None) is not None for cb in trainer.callbacks):
            self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer, pl_module):
        from olm.eval.harness import OlmLM
        from olm.eval.run import evaluate, flat_metrics

        if self.throughput is not None:
            self.throughput.pause()
        self._evaluated_at = trainer.global_step
        metrics = {}
        started = time.perf_counter()
        if trainer.is_global_zero:
            tokenizer = trainer.datamodule.tokenizer
            lm = OlmLM(model=pl_module.model, tokenizer=tokenizer, device=str(pl_module.device),
                       batch_size=self.config.batch_size)
            results = evaluate(lm, self.tasks, limit=self.config.limit)
            metrics = flat_metrics(results, prefix="eval/")
            for logger in trainer.loggers:  # Lightning's row of optimizer step k is k - 1, as for validation
                logger.log_metrics(metrics, step=trainer.global_step - 1)
            summary = ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in metrics.items())
            logging.getLogger("olm.train").info("step %d: %s (evaluated in %.1f s)", trainer.global_step, summary,
                                                time.perf_counter() - started)
        self.last = trainer.strategy.broadcast(metrics, src=0)


def pruning_callback(cfg):
    """The Lightning callback that reports val loss to this job's Optuna trial, or None outside an Optuna sweep."""
    if cfg.sweep.trial is None:
        return None
    return OptunaPruning(cfg.sweep.storage, cfg.sweep.study, int(cfg.sweep.trial))
