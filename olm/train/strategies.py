"""Distributed strategies for olm-train, and the fix for Hydra + DDP.

Lightning's DDP/FSDP start ranks 1..N-1 by re-running the command line. Under Hydra that re-runs the whole sweep
in every child for ``-m`` (extra run dirs, hangs), and the launcher's environment variables (LOCAL_RANK, ...) leak
into the next job of a sweep, which then waits for children that never come. olm's launcher instead starts each
child as a single Hydra job on the job's own composed config (``<run dir>/.hydra/config.yaml``) in the same run
dir, and ``cleanup_after_job`` restores the environment and the process group after every job.

Processes created outside (torchrun, SLURM, submitit) are left alone: Lightning's cluster environments read
their ranks from the environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from olm.registry import ConfigError

DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# A rank that dies must not leave the others blocked in a collective for the default 30 minutes.
DEFAULT_TIMEOUT = timedelta(seconds=60)


class HydraJobLauncher(_SubprocessScriptLauncher):
    """Starts ranks 1..N-1 as ``python -m olm.train.app`` on this job's saved config, in this job's run dir."""

    def _call_children_scripts(self) -> None:
        from hydra.core.hydra_config import HydraConfig

        self._check_can_spawn_children()
        self.procs = []
        env = self.cluster_environment
        os.environ["MASTER_ADDR"] = env.main_address
        os.environ["MASTER_PORT"] = str(env.main_port)
        os.environ["NODE_RANK"] = str(env.node_rank())
        os.environ["LOCAL_RANK"] = str(env.local_rank())
        os.environ["WORLD_SIZE"] = str(self.num_processes * self.num_nodes)
        if HydraConfig.initialized():
            hydra_cfg = HydraConfig.get()
            run_dir = hydra_cfg.runtime.output_dir
            if hydra_cfg.output_subdir is None:
                raise ConfigError("hydra.output_subdir=null: multi-process training needs the job's saved config")
            config_dir = os.path.join(run_dir, hydra_cfg.output_subdir)
        for local_rank in range(1, self.num_processes):
            child_env = {**os.environ, "LOCAL_RANK": str(local_rank)}
            if HydraConfig.initialized():
                command = [
                    sys.executable, "-m", "olm.train.app", "--config-path", config_dir, "--config-name", "config",
                    f"hydra.run.dir={run_dir}", "hydra.output_subdir=null", f"hydra.job.name=rank{local_rank}",
                ]
            else:
                command = [sys.executable, *sys.argv]
            self.procs.append(subprocess.Popen(command, env=child_env))


class _OwnLauncher:
    def _configure_launcher(self) -> None:
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = HydraJobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)


class OlmDDPStrategy(_OwnLauncher, DDPStrategy):
    """DDPStrategy whose children are single Hydra jobs (see module docstring)."""


class OlmFSDPStrategy(_OwnLauncher, FSDPStrategy):
    """FSDPStrategy whose children are single Hydra jobs (see module docstring)."""


def cleanup_after_job(trainer) -> None:
    """Wait for this job's child ranks, drop the launcher's environment variables and the process group, so that
    the next job of a sweep starts its own ranks."""
    import torch.distributed as dist

    launcher = getattr(trainer.strategy, "launcher", None)
    if isinstance(launcher, HydraJobLauncher):
        for proc in launcher.procs:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
        for key in DDP_ENV:
            os.environ.pop(key, None)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_strategy(trainer_cfg: dict[str, Any]) -> dict[str, Any]:
    """``trainer.strategy``: a Lightning name (auto, ddp_spawn, ...), ``ddp``, or a mapping
    ``{name: ddp|fsdp, ...options}`` (FSDP: ``activation_checkpointing``, ``sharding_strategy``, ...)."""
    cfg = dict(trainer_cfg)
    strategy = cfg.get("strategy", "auto")
    if strategy == "ddp":
        strategy = {"name": "ddp"}
    if strategy == "fsdp":
        strategy = {"name": "fsdp"}
    if not isinstance(strategy, dict):
        return cfg
    options = dict(strategy)
    name = options.pop("name", None)
    options.setdefault("timeout", DEFAULT_TIMEOUT.total_seconds())
    options["timeout"] = timedelta(seconds=float(options["timeout"]))
    try:
        if name == "ddp":
            cfg["strategy"] = OlmDDPStrategy(**options)
        elif name == "fsdp":
            from olm.nn.blocks import TransformerBlock

            checkpointing = options.pop("activation_checkpointing", False)
            cfg["strategy"] = OlmFSDPStrategy(
                auto_wrap_policy={TransformerBlock},  # one FSDP unit per transformer block
                activation_checkpointing_policy={TransformerBlock} if checkpointing else None,
                **options,
            )
        else:
            raise ConfigError(f"trainer.strategy.name={name!r} is not known; known: ddp, fsdp (or a Lightning strategy name)")
    except TypeError as exc:
        raise ConfigError(f"trainer.strategy: {exc}") from exc
    return cfg
