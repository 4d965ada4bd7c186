"""`olm-train`: the Hydra application that composes conf/train.yaml and trains with Lightning.

Every run directory (Hydra's, under outputs/) ends up holding:
  .hydra/config.yaml (resolved inputs), config.yaml (resolved, with the vocabulary filled in), metrics.csv,
  summary.json, checkpoints/ (last.ckpt + best by val loss), model/ (Block.save export + tokenizer), wandb/.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from olm.registry import ConfigError

log = logging.getLogger("olm")
ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"


def _quiet_lightning() -> None:
    """One copy of each Lightning message (through Hydra's handlers, so app.log has them too), without ads."""
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def _precision(value: str) -> str:
    if value != "auto":
        return value
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"paths.output_dir={str(run_dir)!r} is not writable: {exc.strerror or exc}") from exc


def _build_datamodule(cfg: DictConfig):
    from olm.data import TextDataModule

    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg.pop("_target_", None)
    if not isinstance(data_cfg.get("batch_size"), int) or data_cfg["batch_size"] < 1:
        raise ConfigError(f"data.batch_size={data_cfg.get('batch_size')!r} must be a positive integer")
    if not isinstance(data_cfg.get("seq_len"), int) or data_cfg["seq_len"] < 1:
        raise ConfigError(f"data.seq_len={data_cfg.get('seq_len')!r} must be a positive integer")
    try:
        return TextDataModule(**data_cfg)
    except TypeError as exc:
        raise ConfigError(f"data: {exc}") from exc


def _fill_vocab_and_check(cfg: DictConfig, datamodule) -> None:
    """data.vocab_size comes from the tokenizer; the model must be able to embed every token id."""
    with open_dict(cfg):
        if cfg.data.get("vocab_size") is None:
            cfg.data.vocab_size = datamodule.vocab_size
    model_vocab = cfg.model.get("vocab_size")
    if not isinstance(model_vocab, int):
        raise ConfigError(f"model.vocab_size={model_vocab!r} must be an integer")
    if model_vocab < datamodule.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_vocab} is smaller than the tokenizer's vocabulary ({datamodule.vocab_size}, "
            f"data.tokenizer={cfg.data.get('tokenizer')!r}); use model.vocab_size=${{data.vocab_size}}"
        )
    max_seq_len = cfg.model.get("max_seq_len")
    if isinstance(max_seq_len, int) and cfg.data.seq_len > max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={max_seq_len}")


def _loggers(cfg: DictConfig, run_dir: Path, resume_run_id: str | None, resume_step: int | None):
    from olm.train.csv_logging import RunCSVLogger

    loggers = [RunCSVLogger(str(run_dir), resume_step)]  # -> run_dir/metrics.csv
    wandb_logger = None
    kind = cfg.logger.get("name", "none")
    if kind not in ("wandb", "csv", "none"):
        raise ConfigError(f"logger.name={kind!r} is not known; known: wandb, csv, none")
    if kind == "wandb":
        from olm.train.wandb_logging import make_wandb_logger

        wandb_logger = make_wandb_logger(cfg, run_dir, resume_run_id)
        if wandb_logger is not None:
            loggers.append(wandb_logger)
    return loggers, wandb_logger


def _resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    from olm.train.callbacks import latest_checkpoint

    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise ConfigError(f"ckpt_path={str(path)!r} does not exist")
        return str(path)
    resume = cfg.get("resume")
    if resume in (None, False, "none"):
        return None
    if resume != "auto":
        raise ConfigError(f"resume={resume!r} is not known; use resume=auto or ckpt_path=PATH")
    latest = latest_checkpoint(run_dir)
    if latest is None:
        log.info("resume=auto: no checkpoint in %s, starting from scratch", run_dir / "checkpoints")
    return str(latest) if latest else None


def _read_checkpoint_meta(path: str | None) -> dict:
    """The olm entries of a checkpoint (W&B run id, ...) plus its global step; validates the file early."""
    if not path:
        return {}
    from olm.train.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    return {**state.get("olm", {}), "global_step": state.get("global_step")}


def train(cfg: DictConfig) -> float | None:
    """Run one training job; returns ``cfg.optimized_metric`` for sweepers."""
    import lightning as L

    from olm.generate import generate
    from olm.train.callbacks import AtomicModelCheckpoint, ThroughputMonitor
    from olm.train.module import LMModule

    started = time.time()
    _quiet_lightning()
    torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul on GPUs that have it
    run_dir = Path(cfg.paths.output_dir)
    _check_writable(run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = _build_datamodule(cfg)
    datamodule.prepare_data()
    _fill_vocab_and_check(cfg, datamodule)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    max_steps = int(trainer_cfg.pop("max_steps"))
    if max_steps < 1:
        raise ConfigError(f"trainer.max_steps={max_steps} must be positive")
    log_every = int(trainer_cfg.get("log_every_n_steps", 10))
    module = LMModule(
        OmegaConf.to_container(cfg.model, resolve=True),
        OmegaConf.to_container(cfg.optim, resolve=True),
        OmegaConf.to_container(cfg.scheduler, resolve=True),
        max_steps=max_steps,
        log_every_n_steps=log_every,
        compile=bool(cfg.compile),
        bytes_per_token=datamodule.val_bytes_per_token,
        activation_checkpointing=bool(cfg.activation_checkpointing),
        skip_nonfinite_batches=int(cfg.callbacks.nan_guard.skip_batches),
        fused_loss=cfg.get("fused_loss", "auto"),
        attention_backend=cfg.get("attention_backend", "auto"),
    )
    num_params = module.model.num_parameters()
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    ckpt_path = _resume_path(cfg, run_dir)
    meta = _read_checkpoint_meta(ckpt_path)
    loggers, wandb_logger = _loggers(cfg, run_dir, meta.get("wandb_run_id"), meta.get("global_step"))
    if wandb_logger is not None:
        module.wandb_run_id = wandb_logger.version
    for logger in loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "num_parameters": num_params})

    throughput = ThroughputMonitor(cfg.data.seq_len, cfg.data.batch_size, log_every)
    checkpoint = AtomicModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        filename="step{step:06d}-val{val_loss:.4f}",
        auto_insert_metric_name=False,
        monitor="val_loss",
        mode="min",
        save_top_k=int(cfg.callbacks.checkpoint.save_top_k),
        save_last=bool(cfg.callbacks.checkpoint.save_last),
    )
    trainer_cfg["precision"] = _precision(trainer_cfg.get("precision", "auto"))
    from olm.train.strategies import cleanup_after_job, resolve_strategy

    trainer_cfg = resolve_strategy(trainer_cfg)
    try:
        trainer = L.Trainer(
            **trainer_cfg,
            max_steps=max_steps,
            logger=loggers,
            callbacks=[throughput, checkpoint],
            default_root_dir=str(run_dir),
            use_distributed_sampler=False,  # the datamodule shards windows itself (disjoint, resumable)
            num_sanity_val_steps=0,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"trainer: {str(exc).splitlines()[0]}") from exc

    log.info("model: %s parameters; run dir: %s", f"{num_params:,}", run_dir)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        if trainer.global_step % int(trainer_cfg.get("val_check_interval") or 1) or "val/loss" not in trainer.callback_metrics:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        summary = None
        if trainer.is_global_zero:
            summary = _finish_run(cfg, run_dir, module, datamodule, trainer, throughput, checkpoint, metrics, num_params, started)
        if wandb_logger is not None and summary is not None:
            wandb_logger.experiment.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    finally:
        if wandb_logger is not None:
            import wandb

            wandb.finish()  # one W&B run per job, also in sweeps and after failures
        cleanup_after_job(trainer)
    return metrics.get(cfg.get("optimized_metric") or "val/loss")


def _finish_run(cfg, run_dir, module, datamodule, trainer, throughput, checkpoint, metrics, num_params, started):
    from olm.generate import generate

    val_loss = metrics.get("val/loss")
    summary: dict[str, Any] = {
        "status": "finished",
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss) if val_loss is not None and val_loss < 50 else None,
        "val_bpb": metrics.get("val/bpb"),
        "gzip_bpb": datamodule.gzip_bits_per_byte(),
        "num_parameters": num_params,
        "steps": trainer.global_step,
        "tokens_seen": trainer.global_step * throughput.tokens_per_step,
        "tokens_per_sec": throughput.tokens_per_sec,
        "mfu": throughput.mfu,
        "wall_time_s": round(time.time() - started, 2),
        "checkpoint": checkpoint.best_model_path or checkpoint.last_model_path or None,
        "last_checkpoint": checkpoint.last_model_path or None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda" else "cpu",
        "world_size": trainer.world_size,
    }
    if cfg.get("export", True):
        export_dir = module.model.save(run_dir / "model")
        if datamodule.tokenizer is not None:
            datamodule.tokenizer.save(export_dir / "tokenizer")
        summary["model_dir"] = str(export_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    lines = [f"val loss {val_loss:.4f} nats/token" if val_loss is not None else "val loss n/a"]
    if summary["val_bpb"] is not None:
        lines.append(f"val bits/byte {summary['val_bpb']:.3f} (gzip -9 on the same text: {summary['gzip_bpb']:.3f})")
    if summary["tokens_per_sec"]:
        lines.append(f"{summary['tokens_per_sec']:,.0f} tokens/s" + (f", MFU {summary['mfu']:.1%}" if summary["mfu"] else ""))
    print("\n".join(["", f"== {run_dir}", *lines]), flush=True)
    tokenizer = datamodule.tokenizer
    if tokenizer is not None and cfg.sample.max_new_tokens > 0:
        prompt = torch.tensor(tokenizer.encode(cfg.sample.prompt), device=module.device)
        out = generate(
            module.model, prompt, cfg.sample.max_new_tokens, temperature=cfg.sample.temperature,
            top_k=cfg.sample.top_k, top_p=cfg.sample.top_p, seed=cfg.seed,
        )
        print(f"-- sample (prompt {cfg.sample.prompt!r}):\n{tokenizer.decode(out[0].tolist())}\n--", flush=True)
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    except ConfigError as exc:
        _write_failed_summary(cfg, exc)
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except BaseException as exc:  # a crash or Ctrl-C: the run dir says so (`olm compare` lists it as failed)
        _write_failed_summary(cfg, exc)
        raise


def _write_failed_summary(cfg: DictConfig, exc: BaseException) -> None:
    try:
        run_dir = Path(cfg.paths.output_dir)
    except Exception:
        return
    if not run_dir.is_dir() or (run_dir / "summary.json").exists():
        return
    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
    error = (str(exc).splitlines() or [type(exc).__name__])[0]
    (run_dir / "summary.json").write_text(json.dumps({"status": status, "error": error}, indent=2) + "\n")


def main() -> None:
    from olm.train.schema import register_configs

    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
