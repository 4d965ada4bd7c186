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

import inspect
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from datetime import timedelta
from typing import Any, Callable

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from olm.errors import ConfigError, OlmError

log = logging.getLogger("olm")
DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# A rank that dies must not leave the others blocked in a collective for the default 30 minutes.
DEFAULT_TIMEOUT = timedelta(seconds=60)
# After a child rank dies, the main process normally fails at its next collective (gloo: at once) and exits through
# the usual error path; if it has not done so after this many seconds, the watchdog stops the job itself.
WATCHDOG_GRACE_S = 10.0
# DDP gradient all-reduce in a 16-bit type (torch's comm hooks): half the bytes on the wire; each bucket is cast
# down, summed in 16 bits over ranks, divided and cast back, so gradients differ from fp32 averaging by rounding.
GRADIENT_COMPRESSION = {"none": None, "bf16": "bf16_compress_hook", "fp16": "fp16_compress_hook"}


class RankFailure(OlmError, RuntimeError):
    """A rank of a multi-process job died, or lost contact with the others; the whole job stops."""


def _how(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class RankWatchdog(threading.Thread):
    """Rank 0's watch over the ranks it started (replaces Lightning's observer, which SIGKILLs the main process
    without a word): when a child rank dies, the job ends within ``WATCHDOG_GRACE_S`` seconds with a one-line
    error naming it, even if the main process is stuck in a collective that never notices."""

    def __init__(self, procs: list[subprocess.Popen], period: float = 1.0, grace: float = WATCHDOG_GRACE_S):
        super().__init__(daemon=True, name="olm-rank-watchdog")
        self.procs, self.period, self.grace = procs, period, grace
        self.stopped = threading.Event()
        self.on_failure: Callable[[str], None] | None = None  # e.g. writes the run's failed summary.json

    def dead(self) -> tuple[int, int, int] | None:
        """(local rank, pid, return code) of the first child rank that ended with an error, else None."""
        for rank, proc in enumerate(self.procs, start=1):
            code = proc.poll()
            if code not in (None, 0):
                return rank, proc.pid, code
        return None

    def run(self) -> None:
        while not self.stopped.wait(self.period):
            dead = self.dead()
            if dead is None:
                if all(proc.returncode == 0 for proc in self.procs):
                    return
                continue
            if self.stopped.wait(self.grace):
                return  # the main process is handling it
            rank, pid, code = dead
            message = f"rank {rank} (pid {pid}) {_how(code)}; stopping the whole job (rank 0 did not notice within {self.grace:.0f} s)"
            from olm.train.outcome import report_error

            report_error(message)
            try:
                if self.on_failure is not None:
                    self.on_failure(message)
            finally:
                for proc in self.procs:
                    if proc.poll() is None:
                        proc.kill()
                os._exit(1)


class HydraJobLauncher(_SubprocessScriptLauncher):
    """Starts ranks 1..N-1 as ``python -m olm.train`` on this job's saved config, in this job's run dir."""

    watchdog: RankWatchdog | None = None

    def launch(self, function, *args, trainer=None, **kwargs):
        from lightning.fabric.utilities.distributed import _set_num_threads_if_needed

        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            self.watchdog = RankWatchdog(self.procs)
            self.watchdog.on_failure = getattr(self, "on_failure", None)
            self.watchdog.start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def dead_child(self, wait: float = 0.0) -> tuple[int, int, int] | None:
        """A child rank that ended with an error, waiting up to ``wait`` seconds for one to be reaped."""
        import time

        deadline = time.monotonic() + wait
        while True:
            for rank, proc in enumerate(self.procs, start=1):
                code = proc.poll()
                if code not in (None, 0):
                    return rank, proc.pid, code
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

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
            # The threads this rank chose (olm.train.speed.cpu_threads), from start-up on: torch sizes its thread
            # pool when it starts, and a later change leaves CPU ranks oversubscribing the cores.
            child_env = {"OMP_NUM_THREADS": str(torch.get_num_threads()), **os.environ, "LOCAL_RANK": str(local_rank)}
            if HydraConfig.initialized():
                command = [
                    sys.executable, "-m", "olm.train", "--config-path", config_dir, "--config-name", "config",
                    f"hydra.run.dir={run_dir}", "hydra.output_subdir=null", f"hydra.job.name=rank{local_rank}",
                ]
            else:
                command = [sys.executable, *sys.argv]
            self.procs.append(subprocess.Popen(command, env=child_env))


class SigtermSync:
    """SIGTERM in a multi-process run: every rank stops at the same training batch, with no host sync per step.

    Lightning (2.6) broadcasts rank 0's "received SIGTERM" flag and reads it on the host at the start of every
    training batch (a device sync per step: the GPUs then wait while the host queues the next step), and its signal
    handler issues a broadcast of its own, which a rank without the signal pairs with whatever collective it runs
    next. Installed by olm's strategies, instead:

    - the handler only records the signal on this rank (and forwards it to the child ranks olm started);
    - every ``every`` optimizer steps (olm passes the logging interval, whose steps sync anyway), at the first batch
      of the step, all ranks all-reduce their flags (max); if any rank got the signal, all of them raise Lightning's
      SIGTERMException at that same batch.

    Every rank decides from the same step counter, so the collectives stay paired; a signal stops the run at most
    ``every`` steps later (validation in progress first finishes).
    """

    def __init__(self, trainer, every: int):
        self.trainer, self.every = trainer, max(1, int(every))
        self.signalled = False
        self._last_checked: int | None = None

    def install(self) -> bool:
        """Replace Lightning's per-batch check and its SIGTERM notifier (registered after the strategy's setup).
        False when this Lightning has neither (other versions): nothing is changed then."""
        loop, connector = self.trainer.fit_loop.epoch_loop, self.trainer._signal_connector
        if not hasattr(loop, "_broadcast_sigterm_tensor") or not hasattr(connector, "_sigterm_notifier_fn"):
            return False
        loop._broadcast_sigterm_tensor = self.check
        connector._sigterm_notifier_fn = self.notify
        return True

    def notify(self, signum, frame=None) -> None:
        log.info("rank %d received signal %d; all ranks stop at the next check", self.trainer.global_rank, signum)
        if not self.signalled:
            launcher = self.trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)  # the child ranks this process started, if any
        self.signalled = True

    def check(self) -> None:
        import torch.distributed as dist
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped  # optimizer steps done: the same on every rank
        if step % self.every or step == self._last_checked:
            return
        self._last_checked = step
        flag = torch.tensor([1.0 if self.signalled else 0.0], device=self.trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            self.trainer._signal_connector.received_sigterm = True
            raise SIGTERMException()


def has_state_buffers(module: torch.nn.Module) -> bool:
    """Whether any buffer of ``module`` is persistent (saved in the state dict, e.g. BatchNorm's running statistics).
    olm's own buffers (RoPE tables, ALiBi slopes) are non-persistent constants computed from the config; a registered
    component that changes a buffer during training must make it persistent to have it synchronised by DDP."""
    return any(
        buffer is not None and name not in m._non_persistent_buffers_set
        for m in module.modules() for name, buffer in m._buffers.items()
    )


class _OlmStrategy:
    """What olm's DDP and FSDP strategies add to Lightning's: their own launcher for the child ranks, and SIGTERM
    handling without a host sync per step (SigtermSync)."""

    def _configure_launcher(self) -> None:
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = HydraJobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def setup(self, trainer) -> None:
        from lightning.pytorch.trainer.states import TrainerFn

        super().setup(trainer)
        if trainer.world_size > 1 and trainer.state.fn == TrainerFn.FITTING:
            SigtermSync(trainer, trainer.log_every_n_steps).install()


class OlmDDPStrategy(_OlmStrategy, DDPStrategy):
    """DDPStrategy whose children are single Hydra jobs (see module docstring).

    Buffers are synchronised from rank 0 before each forward only when the model has persistent ones: olm's buffers
    are constants, equal on every rank, and the broadcast would be a collective per step for nothing. DDP still
    synchronises them once at construction. ``trainer.strategy.broadcast_buffers`` (or ``forward_sync_buffers``, its
    newer name) set explicitly wins.
    """

    def _setup_model(self, model):
        from torch.nn.parallel import DistributedDataParallel

        if {"broadcast_buffers", "forward_sync_buffers"} & set(self._ddp_kwargs) or has_state_buffers(model):
            return super()._setup_model(model)
        newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        user_kwargs = self._ddp_kwargs
        self._ddp_kwargs = {**user_kwargs, ("forward_sync_buffers" if newer else "broadcast_buffers"): False}
        try:
            return super()._setup_model(model)
        finally:
            self._ddp_kwargs = user_kwargs  # the choice is per model, not a setting


class OlmFSDPStrategy(_OlmStrategy, FSDPStrategy):
    """FSDPStrategy whose children are single Hydra jobs (see module docstring)."""


def cleanup_after_job(trainer, failed: bool = False) -> None:
    """Wait for this job's child ranks, drop the launcher's environment variables and the process group, so that
    the next job of a sweep starts its own ranks. After a failure the children get a few seconds to end by
    themselves (they usually fail too, at their next collective), then are killed: a failed job never hangs."""
    import torch.distributed as dist

    if trainer is None:
        return
    launcher = getattr(trainer.strategy, "launcher", None)
    if isinstance(launcher, HydraJobLauncher):
        if launcher.watchdog is not None:
            launcher.watchdog.stopped.set()
        for proc in launcher.procs:
            try:
                proc.wait(timeout=5 if failed else 120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for key in DDP_ENV:
            os.environ.pop(key, None)
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a broken group (dead peer) may fail to tear down; the process is leaving anyway
            if not failed:
                raise


_DIST_ERROR = re.compile(r"gloo|nccl|connection (reset|closed|refused)|broken pipe|timed out|timeout|socket", re.I)


def rank_failure(trainer, exc: BaseException) -> RankFailure | None:
    """A one-line RankFailure when ``exc`` ended a multi-process job because another rank died or stopped
    answering, else None (olm errors and single-process runs keep their own message)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if trainer is None or isinstance(exc, (OlmError, SIGTERMException)) or trainer.world_size <= 1:
        return None  # SIGTERM: all ranks stopped together on purpose, the children exit the same way
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(" This is typically")[0]  # gloo's "[file.cc:537] ..."
    launcher = getattr(trainer.strategy, "launcher", None)
    if isinstance(launcher, HydraJobLauncher) and launcher.procs:
        dead = launcher.dead_child(wait=3.0)
        if dead is not None:
            rank, pid, code = dead
            return RankFailure(f"rank {rank} (pid {pid}) {_how(code)}; the whole job stops (rank 0 then saw: {first})")
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())) or (isinstance(exc, RuntimeError) and _DIST_ERROR.search(first)):
        return RankFailure(
            f"rank {trainer.global_rank} lost contact with the other ranks (one died or hung; see its log): {first}"
        )
    return None


def resolve_strategy(strategy: str | dict[str, Any], accelerator: str = "auto"):
    """``trainer.strategy`` as Lightning takes it: a Lightning name (auto, ddp_spawn, ...) passes through; ``ddp``,
    ``fsdp`` or a mapping ``{name: ddp|fsdp, ...options}`` (DDP: ``gradient_compression``, ``bucket_cap_mb``, ...;
    FSDP: ``activation_checkpointing``, ``sharding_strategy``, ...) becomes olm's strategy object."""
    if strategy == "ddp":
        strategy = {"name": "ddp"}
    if strategy == "fsdp":
        strategy = {"name": "fsdp"}
    if not isinstance(strategy, dict):
        return strategy
    options = dict(strategy)
    name = options.pop("name", None)
    options.setdefault("timeout", DEFAULT_TIMEOUT.total_seconds())
    options["timeout"] = timedelta(seconds=float(options["timeout"]))
    try:
        if name == "ddp":
            compression = options.pop("gradient_compression", None) or "none"
            if compression not in GRADIENT_COMPRESSION:
                raise ConfigError(f"trainer.strategy.gradient_compression={compression!r} is not known; known: "
                                  + ", ".join(GRADIENT_COMPRESSION))
            on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
            if compression != "none" and not on_gpu:
                # Lightning registers DDP comm hooks on CUDA devices only: elsewhere the setting would do nothing.
                raise ConfigError(f"trainer.strategy.gradient_compression={compression} needs GPUs (trainer.accelerator=gpu); "
                                  "on CPU use none")
            if GRADIENT_COMPRESSION[compression] is not None:
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                options["ddp_comm_hook"] = getattr(default_hooks, GRADIENT_COMPRESSION[compression])
            # After the all-reduce the gradients are views of DDP's buckets instead of being copied back out (one
            # copy and one gradient-sized buffer less: -1.35 ms per step and -0.4 GiB for gpt2_small on 2 GPUs).
            options.setdefault("gradient_as_bucket_view", True)
            return OlmDDPStrategy(**options)
        elif name == "fsdp":
            from olm.nn.blocks import TransformerBlock

            checkpointing = options.pop("activation_checkpointing", False)
            return OlmFSDPStrategy(
                auto_wrap_policy={TransformerBlock},  # one FSDP unit per transformer block
                activation_checkpointing_policy={TransformerBlock} if checkpointing else None,
                **options,
            )
        raise ConfigError(f"trainer.strategy.name={name!r} is not known; known: ddp, fsdp (or a Lightning strategy "
                          "name)")
    except TypeError as exc:
        raise ConfigError(f"trainer.strategy: {exc}") from exc
