"""``train(cfg)``: one training job from a composed config. It wires the datamodule, the LightningModule, the
callbacks, the loggers and the strategy, and applies the resume rules; the command line around it is
``olm.train.cli`` and what it leaves behind is ``olm.train.outcome``.

Every run directory ends up holding: ``.hydra/`` (Hydra's record of the job), ``config.yaml`` (the resolved config,
vocabulary filled in), ``metrics.csv``, ``summary.json``, ``checkpoints/`` (last.ckpt + best by val loss), ``model/``
(Block.save export + tokenizer) and ``wandb/``.

Resume rules (``resume=auto``, ``resume=allow`` or ``ckpt_path``): ``resume=auto`` continues the run in the run dir
and is refused where there is none (a mistyped path never trains a new run); ``resume=allow`` starts the run there
when it holds no checkpoint yet (job scripts started and restarted alike). The checkpoint must hold the same model
as the config builds (else one ConfigError naming the differing keys, before anything is written); under
``resume=auto`` a run dir whose record exists but holds no checkpoint is refused instead of silently started over;
``config.yaml`` and ``summary.json`` of a resumed run are
replaced only when the resumed run finishes. A fresh run never starts over a run dir that holds checkpoints or a
finished run; a restarted SLURM job or torchrun worker group on a run dir holding its own checkpoint continues from it
(olm.train.slurm).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from olm.errors import ConfigError, first_line
from olm.eval import lm_eval_installed
from olm.train.checks import check_machine, check_run
from olm.train.config import (CallbacksConfig, DataConfig, LoggerConfig, SampleConfig, SchedulerConfig,
                              TrainerConfig, optimizer_schema, speed_config, typed)
from olm.train.outcome import final_lines, read_summary, summarize, write_failed_summary, write_json
from olm.train.resume import has_record, resume_checkpoint

log = logging.getLogger("olm")


def quiet_lightning() -> None:
    """One copy of each Lightning message (through Hydra's handlers, so train.log has them too), without ads."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    noise = ("litlogger", "TPU available", "Skipping setting a default `ModelSummary`")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not any(text in record.getMessage() for text in noise))
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # olm's datamodule resumes its data from the global step itself (see LMModule.on_load_checkpoint)
    warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")
    # a resume writes into the checkpoint dir it continues from, on purpose
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    # a batch skipped by callbacks.nan_guard.skip_batches: olm's own warning names the step
    warnings.filterwarnings("ignore", message=r".*`training_step` returned `None`.*")


def precision(value: str) -> str:
    if value != "auto":
        return value
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"paths.output_dir={str(run_dir)!r} is not writable: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def data_errors():
    """The data layer reports bad input (missing or empty data.path, token ids >= vocab size, ...) as one-line
    ValueErrors naming the key: olm-train reports them as config errors."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(first_line(exc)) from exc


def build_datamodule(data: DataConfig):
    from olm.data import TextDataModule

    return TextDataModule(**dataclasses.asdict(data))


def check_vocab(cfg: DictConfig, datamodule) -> None:
    """The model must be able to embed every token id the tokenizer makes."""
    model_vocab = cfg.model.get("vocab_size")
    if model_vocab < datamodule.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_vocab} is smaller than the tokenizer's vocabulary ({datamodule.vocab_size}, "
            f"data.tokenizer={cfg.data.tokenizer!r}); use model.vocab_size=${{data.vocab_size}}"
        )


def make_loggers(logger_cfg: LoggerConfig, name: str, run_dir: Path, resume_run_id: str | None,
                 resume_step: int | None):
    from olm.train.csv_logging import RunCSVLogger

    loggers = [RunCSVLogger(str(run_dir), resume_step)]  # -> run_dir/metrics.csv
    wandb_logger = None
    if logger_cfg.name == "wandb":
        from olm.train.wandb_logging import make_wandb_logger

        wandb_logger = make_wandb_logger(logger_cfg, name, run_dir, resume_run_id)
        if wandb_logger is not None:
            loggers.append(wandb_logger)
    return loggers, wandb_logger


def read_checkpoint_meta(path: str | None) -> dict:
    """The olm entries of a checkpoint (model config, W&B run id, ...) plus its global step; validates the file."""
    if not path:
        return {}
    from olm.checkpoint import load_checkpoint

    state = load_checkpoint(path, mmap=True)
    tokenizer = (state.get("olm_tokenizer") or {}).get("identity")  # olm.train.callbacks.TokenizerRecord
    return {**state.get("olm", {}), "global_step": state.get("global_step"), "tokenizer_identity": tokenizer}


def check_same_tokenizer(meta: dict, tokenizer, ckpt_path: str) -> None:
    """A checkpoint continues only on data of its own tokenizer: the identity it records, else (checkpoints written
    before it recorded one) the tokenizer saved in its run dir."""
    if tokenizer is None:
        return
    saved = meta.get("tokenizer_identity")
    if saved is None:
        from olm.data import load_tokenizer

        run_tokenizer = Path(ckpt_path).resolve().parent.parent / "tokenizer"
        if not (run_tokenizer / "tokenizer_meta.json").is_file():
            return
        saved = load_tokenizer(run_tokenizer).identity
    if saved != tokenizer.identity:
        raise ConfigError(f"{ckpt_path} was trained with another tokenizer ({saved}) than the data's "
                          f"({tokenizer.name} {tokenizer.identity}); continue it on data prepared with its tokenizer "
                          "(olm data prepare --tokenizer-path <its run dir>/tokenizer)")


def check_same_model(meta: dict, model, ckpt_path: str) -> None:
    saved = meta.get("model_config")
    if saved is None:
        return
    from olm.train.resume import changed_keys, leaf

    current = model.to_config()
    changed = changed_keys(saved, current, "model")
    if changed:
        shown = "; ".join(f"{key}={leaf(current, key)!r} (checkpoint: {leaf(saved, key)!r})" for key in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ConfigError(f"{ckpt_path} holds another model than this config builds: {shown}{more}")


PROFILERS = {"simple": "SimpleProfiler", "advanced": "AdvancedProfiler", "pytorch": "PyTorchProfiler"}


def trainer_arguments(trainer: TrainerConfig, run_dir: Path) -> dict[str, Any]:
    """Lightning Trainer arguments from ``trainer``: validation every ``val_check_interval`` optimizer steps over the
    whole run (resumes included; a fraction is one of max_steps), never per epoch; a profiler's report in the run
    dir (``fit-profile.txt``)."""
    import lightning.pytorch.profilers as profilers

    from olm.train.strategies import resolve_strategy

    arguments = dataclasses.asdict(trainer)
    if trainer.profiler is not None:
        profiler = getattr(profilers, PROFILERS[trainer.profiler])
        arguments["profiler"] = profiler(dirpath=str(run_dir), filename="profile")
    arguments.pop("max_steps")
    arguments["val_check_interval"] = validation_steps(trainer) * trainer.accumulate_grad_batches  # it counts batches
    arguments["check_val_every_n_epoch"] = None
    arguments["precision"] = precision(trainer.precision)
    arguments["enable_progress_bar"] = trainer.enable_progress_bar is not False  # olm's own bar (progress_bars)
    arguments["strategy"] = resolve_strategy(trainer.strategy, trainer.accelerator)
    arguments["plugins"] = cluster_plugins()
    return arguments


def cluster_plugins() -> list:
    """Lightning's SLURM environment without its own requeue: on SIGUSR1 it would write ``hpc_ckpt_*.ckpt`` files
    that olm's resume does not read and requeue the job beside submitit; a requeued job continues from olm's
    checkpoints instead (olm.train.slurm)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def first_process() -> bool:
    """Whether this is the job's first process (rank 0): olm's own child ranks have LOCAL_RANK, srun's tasks
    SLURM_PROCID."""
    return all(int(os.environ.get(key) or 0) == 0 for key in ("LOCAL_RANK", "SLURM_PROCID"))


def validation_steps(trainer: TrainerConfig) -> int:
    """``trainer.val_check_interval`` in optimizer steps (a fraction is one of max_steps)."""
    interval = trainer.val_check_interval
    return interval if isinstance(interval, int) else max(1, round(interval * trainer.max_steps))


def train(cfg: DictConfig) -> float | None:
    """Run one training job; returns ``cfg.optimized_metric`` for sweepers. The checks run first, then the job holds
    its run dir's lock (olm.train.lock) until it ends, however it ends."""
    from olm.train.lock import run_dir_lock

    check_run(cfg)
    check_machine(cfg)
    check_writable(Path(cfg.paths.output_dir))
    with run_dir_lock(Path(cfg.paths.output_dir), cfg.lock_timeout):
        return _train(cfg)


def _train(cfg: DictConfig) -> float | None:
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from olm.train.callbacks import (AtomicModelCheckpoint, QuietModelSummary, ThroughputMonitor, TokenizerRecord,
                                     progress_bars, pruning_callback)
    from olm.train.module import LMModule
    from olm.train.speed import cpu_threads, processes_on_this_machine
    from olm.train.strategies import HydraJobLauncher, RankFailure, cleanup_after_job, rank_failure

    started = time.time()
    quiet_lightning()
    trainer_cfg, data_cfg = typed(cfg.trainer, TrainerConfig, "trainer."), typed(cfg.data, DataConfig, "data.")
    callbacks_cfg = typed(cfg.callbacks, CallbacksConfig, "callbacks.")
    sample = typed(cfg.sample, SampleConfig, "sample.")
    speed = speed_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    ckpt_path = resume_checkpoint(cfg, run_dir)
    meta = read_checkpoint_meta(ckpt_path)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul on GPUs that have it
    if str(trainer_cfg.accelerator) == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads(speed.cpu_threads, processes_on_this_machine(trainer_cfg.devices)))

    with data_errors():
        datamodule = build_datamodule(data_cfg)
        datamodule.prepare_data()
        check_vocab(cfg, datamodule)
        datamodule.setup("fit")  # token ids < vocab size, enough tokens per split: checked at load, not as a CUDA assert
    module = LMModule(
        OmegaConf.to_container(cfg.model, resolve=True), typed(cfg.optim, optimizer_schema(cfg.optim.name), "optim."),
        typed(cfg.scheduler, SchedulerConfig, "scheduler."), speed, max_steps=trainer_cfg.max_steps,
        log_every_n_steps=trainer_cfg.log_every_n_steps, bytes_per_token=datamodule.val_bytes_per_token,
        skip_nonfinite_batches=callbacks_cfg.nan_guard.skip_batches,
    )
    if datamodule.val_source_names():  # several sources: val/<source>/loss and bpb besides the overall
        module.val_sources = list(zip(datamodule.val_source_names(), datamodule.source_bytes_per_token()))
    if ckpt_path:
        check_same_model(meta, module.model, ckpt_path)
        check_same_tokenizer(meta, datamodule.tokenizer, ckpt_path)
    num_params = module.model.num_parameters()
    continuing = has_record(run_dir)  # this run dir's own run goes on: its record is replaced once it finishes
    if not continuing and first_process():
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        if datamodule.tokenizer is not None:  # beside the checkpoints: `olm generate` works before any export
            datamodule.tokenizer.save(run_dir / "tokenizer")

    loggers, wandb_logger = make_loggers(typed(cfg.logger, LoggerConfig, "logger."), str(cfg.name), run_dir,
                                         meta.get("wandb_run_id"), meta.get("global_step"))
    if wandb_logger is not None:
        module.wandb_run_id = wandb_logger.version
    for logger in loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "num_parameters": num_params})

    throughput = ThroughputMonitor(data_cfg.seq_len, data_cfg.batch_size, trainer_cfg.log_every_n_steps)
    checkpoint = AtomicModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        filename="step{step:06d}-val{val_loss:.4f}",
        auto_insert_metric_name=False,
        monitor="val_loss",
        mode="min",
        save_top_k=callbacks_cfg.checkpoint.save_top_k,
        save_last=callbacks_cfg.checkpoint.save_last,
    )
    callbacks = [throughput, checkpoint, *progress_bars(trainer_cfg.enable_progress_bar)]
    if datamodule.tokenizer is not None:
        callbacks.append(TokenizerRecord(datamodule.tokenizer.identity))
    downstream = None
    if callbacks_cfg.eval.tasks and not lm_eval_installed():  # without_lm_eval=skip: refuse was checked before
        if first_process():
            log.warning("callbacks.eval.tasks=%s skipped: lm-eval is not installed (pip install 'olm[eval]' adds "
                        "it; callbacks.eval.tasks=[] turns the evaluation off)", list(callbacks_cfg.eval.tasks))
    elif callbacks_cfg.eval.tasks:
        from olm.train.callbacks import DownstreamEval

        downstream = DownstreamEval(callbacks_cfg.eval, throughput, cache_dir=data_cfg.cache_dir)
        callbacks.append(downstream)
    pruning = pruning_callback(cfg)
    if pruning is not None:
        callbacks.append(pruning)
    if trainer_cfg.enable_model_summary:
        callbacks.append(QuietModelSummary())
    trainer, failed = None, True
    try:
        try:
            trainer = L.Trainer(
                **trainer_arguments(trainer_cfg, run_dir),
                max_steps=trainer_cfg.max_steps,
                logger=loggers,
                callbacks=callbacks,
                default_root_dir=str(run_dir),
                use_distributed_sampler=False,  # the datamodule shards windows itself (disjoint, resumable)
                num_sanity_val_steps=0,
            )
        except (TypeError, ValueError, MisconfigurationException) as exc:
            raise ConfigError(f"trainer: {first_line(exc)}") from exc
        launcher = getattr(trainer.strategy, "launcher", None)
        if isinstance(launcher, HydraJobLauncher):  # a dead child rank that rank 0 never notices: still recorded
            launcher.on_failure = lambda message: write_failed_summary(run_dir, RankFailure(message))

        start = f"; continuing from step {meta.get('global_step')} ({ckpt_path})" if ckpt_path else ""
        log.info("model: %s parameters; run dir: %s%s", f"{num_params:,}", run_dir, start)
        # weights_only: a checkpoint is tensors and plain containers; never unpickle arbitrary objects from a file.
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        module.check_finite()  # steps after the last log step: never export or report diverged weights
        pruned = pruning is not None and pruning.pruned_at is not None
        if not pruned and (trainer.global_step % validation_steps(trainer_cfg)
                           or "val/loss" not in trainer.callback_metrics):
            trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if getattr(module, "last_train_loss", None) is not None:  # a validate() after fit drops the train metrics
            metrics["train/loss"] = module.last_train_loss
        if downstream is not None:
            metrics.update(downstream.last)
        summary = None
        if trainer.is_global_zero and pruned:  # stopped by the sweep's pruner: a record, no export or sample
            summary = {**summarize(run_dir, metrics, datamodule=datamodule, trainer=trainer, throughput=throughput,
                                   checkpoint=checkpoint, num_params=num_params, started=started),
                       "status": "pruned", "pruned_at_step": pruning.pruned_at}
            write_json(run_dir / "summary.json", summary)
            log.info("pruned by the sweep at step %d (val loss %.4f)", pruning.pruned_at, metrics.get("val/loss"))
        elif trainer.is_global_zero:
            summary = finish(cfg, run_dir, module, datamodule, sample, metrics, continuing=continuing,
                             trainer=trainer, throughput=throughput, checkpoint=checkpoint, num_params=num_params,
                             started=started)
        if wandb_logger is not None and summary is not None:
            wandb_logger.update_summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        failed = False
    except BaseException as exc:
        explained = rank_failure(trainer, exc)  # a dead or silent peer rank: say which, in one line
        if explained is not None:
            raise explained from exc
        raise
    finally:
        if wandb_logger is not None:
            from olm.train.wandb_logging import finish_wandb

            finish_wandb()  # one W&B run per job, also in sweeps and after failures
        cleanup_after_job(trainer, failed=failed)
    return metrics.get(cfg.optimized_metric)


def finish(cfg: DictConfig, run_dir: Path, module, datamodule, sample: SampleConfig, metrics: dict, *,
           continuing: bool, **outcome) -> dict[str, Any]:
    """Rank 0 after a finished fit: summary.json (and config.yaml for a resumed run), the export, the final lines
    and a sample."""
    from olm.generate import generate

    summary = summarize(run_dir, metrics, datamodule=datamodule, **outcome)
    if cfg.export:
        export_dir = module.model.save(run_dir / "model")
        if datamodule.tokenizer is not None:
            datamodule.tokenizer.save(export_dir / "tokenizer")
        summary["model_dir"] = str(export_dir)
    if continuing:  # the record of a resumed run is replaced only now that it has finished
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        _mark_resume_finished(run_dir)
    write_json(run_dir / "summary.json", summary)
    print("\n".join(final_lines(run_dir, summary)), flush=True)
    tokenizer = datamodule.tokenizer
    if tokenizer is not None and sample.max_new_tokens > 0:
        prompt = torch.tensor(tokenizer.encode(sample.prompt), device=module.device)
        out = generate(module.model, prompt, sample.max_new_tokens, temperature=sample.temperature,
                       top_k=sample.top_k, top_p=sample.top_p, seed=cfg.seed)
        print(f"-- sample (prompt {sample.prompt!r}):\n{tokenizer.decode(out[0].tolist())}\n--", flush=True)
    return summary


def _mark_resume_finished(run_dir: Path) -> None:
    """Mark this job's Hydra record (a resume's ``.hydra/resume-<step>/``) as finished: the next resume starts from
    its overrides (olm.train.resume.latest_record)."""
    from hydra.core.hydra_config import HydraConfig

    from olm.train.resume import FINISHED_MARK

    if HydraConfig.initialized() and HydraConfig.get().output_subdir:
        record = run_dir / HydraConfig.get().output_subdir
        if record.is_dir():
            (record / FINISHED_MARK).write_text("")
