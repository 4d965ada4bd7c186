"""One writer per run dir: a live run holds ``<run dir>/run.lock``, a lease of filelock's (``SoftFileLease``).

The lock file names its holder (host, PID, the process's start time) and the holder's heartbeat thread touches it
every third of ``lock_timeout`` seconds. A contender takes it over when the holder is gone: at once when the holder
ran on this host and its PID is gone (or belongs to a later process), else when the file has not been touched for
``lock_timeout`` seconds, measured on the contender's own clock (a node that died, a job killed on another host);
anything else is refused in one line naming the holder.

Why a lease file and not an OS lock (``fcntl``/``flock``): run dirs live on shared filesystems. NFS mounted with
``nolock`` and Lustre with ``localflock`` keep OS locks per node, so a job requeued on another node would get the lock
beside a live holder; where NFS does share them, a dead node's lock stays until the server's lease recovery, and an
OS lock cannot say who holds it. The lease needs only what every shared filesystem gives (exclusive create, rename,
mtime), and filelock's takeover is atomic (an exchange, or a rename aside) when two contenders race for one stale
lock. This module imports no torch or Lightning: ``olm compare`` uses it to see that a run is live.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import time
from pathlib import Path

from olm.errors import ConfigError

LOCK_NAME = "run.lock"


class RunDirLive(ConfigError):
    """A live run holds the run dir: the refused command writes nothing there (not even a failed summary)."""

POLL_S = 0.5


def _lease(path: Path, lease_s: float, timeout: float):
    from filelock import SoftFileLease

    return SoftFileLease(path, lease_duration=float(lease_s), timeout=timeout, poll_interval=POLL_S)


def first_process() -> bool:
    """Whether this is the job's first process: the one that holds the lock (torchrun sets RANK and LOCAL_RANK,
    olm's own child ranks LOCAL_RANK, srun's tasks SLURM_PROCID)."""
    return all(int(os.environ.get(key) or 0) == 0 for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def holder(run_dir: Path):
    """The lock's owner record (pid, hostname, lease_duration, ...) when ``run_dir`` holds a lock file, else None."""
    path = Path(run_dir) / LOCK_NAME
    if not path.is_file():
        return None
    return _lease(path, 1.0, 0).owner


def _heartbeat_age(run_dir: Path) -> float | None:
    try:
        return max(0.0, time.time() - (Path(run_dir) / LOCK_NAME).stat().st_mtime)
    except OSError:
        return None


def describe(owner) -> str:
    return f"pid {owner.pid} on {owner.hostname}"


def _on_this_host(owner) -> bool:
    # filelock's own host identity (the host name, plus the PID namespace inside a container)
    from filelock._identity import host_name

    return owner.hostname == host_name()


def _gone(owner) -> bool:
    """A holder of this host whose process is gone (or whose PID now belongs to a later process)."""
    from filelock._identity import owner_is_stale

    return _on_this_host(owner) and owner_is_stale(owner.pid, owner.hostname, owner.start)


def is_live(run_dir: Path) -> bool:
    """Whether a run holds ``run_dir`` now: its lock's holder runs on this host, or (another host's) its heartbeat
    is younger than its lease. A reader's view: no wait, no takeover."""
    owner = holder(run_dir)
    if owner is None:
        return False
    if _on_this_host(owner):
        return not _gone(owner)
    age = _heartbeat_age(run_dir)
    return age is not None and age < (owner.lease_duration or 0)


def live_note(path: str | Path) -> str | None:
    """For commands that read a run (``olm eval``, ``olm generate``): a note when the run dir of ``path`` (a run
    dir, or a checkpoint in ``<run>/checkpoints/``) is live, so what they read may change under them."""
    path = Path(path)
    for run_dir in (path, path.parent.parent):
        if (run_dir / LOCK_NAME).is_file() and is_live(run_dir):
            return (f"note: {run_dir} is live (a run is writing it: {describe(holder(run_dir))}); this reads its "
                    "latest checkpoint or export, which the run may replace")
    return None


def refuse_if_live(run_dir: Path | None) -> None:
    """A command that would write into ``run_dir`` is refused while a run holds it (RunDirLive naming the holder)."""
    if run_dir is not None and (Path(run_dir) / LOCK_NAME).is_file() and is_live(run_dir):
        raise RunDirLive(RunDirLocks.refusal(Path(run_dir).resolve(), holder(run_dir)))


class RunDirLocks:
    """The run-dir locks this process holds, released on every exit path: by ``release``, else at exit."""

    def __init__(self):
        self.held: dict[Path, tuple[object, list[Path]]] = {}  # run dir -> (lease, the dirs acquiring created)
        atexit.register(self.release_all)

    def acquire(self, run_dir: Path, lease_s: float) -> bool:
        """Hold ``run_dir``'s lock; True if this call took it, False if this process already held it. Raises
        RunDirLive naming the holder when a live run holds it."""
        run_dir = Path(run_dir).resolve()
        if run_dir in self.held:
            return False
        created = _missing_dirs(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"the run dir {str(run_dir)!r} cannot be created ({exc.strerror or exc}); give "
                              "hydra.run.dir (or paths.output_dir) a writable path") from None
        path = run_dir / LOCK_NAME
        owner = holder(run_dir)
        timeout = 0.0
        if owner is not None and owner.lease_duration:
            lease_s = owner.lease_duration  # every contender must agree on the holder's lease
            timeout = self._wait_for(run_dir, owner)
        lease = _lease(path, lease_s, timeout)
        from filelock import LeaseSettingsMismatch, Timeout

        try:
            lease.acquire()
        except (Timeout, LeaseSettingsMismatch):
            now = holder(run_dir)
            _remove_if_empty(created)
            raise RunDirLive(self.refusal(run_dir, now or owner)) from None
        if owner is not None:
            print(f"note: {run_dir}: took over the lock of {describe(owner)}, which no longer runs "
                  f"({'its process is gone' if timeout == 0 else f'no heartbeat for {lease_s:g} s'})",
                  file=sys.stderr, flush=True)
        self.held[run_dir] = (lease, created)
        return True

    @staticmethod
    def _wait_for(run_dir: Path, owner) -> float:
        """How long to watch a lock before taking it over: not at all for a live holder on this host (refused) or a
        dead one (taken at once), its lease for another host's holder whose heartbeat has stopped."""
        if _on_this_host(owner):
            return 0.0
        age = _heartbeat_age(run_dir)
        if age is None or age < owner.lease_duration:
            return 0.0  # a fresh heartbeat: refused
        print(f"note: {run_dir}: the lock of {describe(owner)} has had no heartbeat for {age:.0f} s; watching it for "
              f"{owner.lease_duration:g} s before taking it over", file=sys.stderr, flush=True)
        return owner.lease_duration + 2 * POLL_S

    @staticmethod
    def refusal(run_dir: Path, owner) -> str:
        who = describe(owner) if owner is not None else "another process"
        age = _heartbeat_age(run_dir)
        beat = f", heartbeat {age:.0f} s ago" if age is not None else ""
        return (f"{run_dir} is live: a run holds it ({who}{beat}); one run writes a run dir at a time. Wait for it "
                f"to end (or stop it), or use another hydra.run.dir; a lock whose holder died is taken over by itself")

    def release(self, run_dir: Path) -> None:
        entry = self.held.pop(Path(run_dir).resolve(), None)
        if entry is None:
            return
        lease, created = entry
        try:
            lease.release()
        except Exception:  # a lock file removed by hand, a full disk: the run's own outcome matters more
            pass
        _remove_if_empty(created)

    def release_all(self) -> None:
        for run_dir in list(self.held):
            self.release(run_dir)


def _missing_dirs(run_dir: Path) -> list[Path]:
    """``run_dir`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _remove_if_empty(created: list[Path]) -> None:
    """A refused run leaves nothing: the dirs its lock created go again if nothing else was written there."""
    for path in created:
        try:
            path.rmdir()
        except OSError:
            return


LOCKS = RunDirLocks()


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, lease_s: float):
    """Hold ``run_dir``'s lock for the block (the job's first process only; the other ranks write through it)."""
    took = first_process() and LOCKS.acquire(run_dir, lease_s)
    try:
        yield
    finally:
        if took:
            LOCKS.release(run_dir)
