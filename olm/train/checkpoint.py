"""Reading checkpoints safely: tensors and plain containers only (``weights_only=True``), never arbitrary pickle."""

from __future__ import annotations

from pathlib import Path

import torch

from olm.errors import ConfigError


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """``last.ckpt`` in the run's checkpoint dir, else the newest ``*.ckpt`` there, else None."""
    directory = Path(run_dir) / "checkpoints"
    last = directory / "last.ckpt"
    if last.is_file():
        return last
    candidates = sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def load_checkpoint(path: str | Path, map_location: str = "cpu", mmap: bool = False) -> dict:
    """Load a Lightning checkpoint with ``weights_only=True``; a missing, truncated or corrupted file is a one-line
    error naming it (never a silent fresh start). ``mmap``: tensors stay on disk until read (to read the metadata of
    a large checkpoint cheaply)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # pickle/zip errors come in many types; all mean the same to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"checkpoint {str(path)!r} cannot be loaded (truncated, corrupted, or not a plain-tensor checkpoint): "
            f"{reason}; nothing was trained (move it away to resume from an older checkpoint with ckpt_path=...)"
        ) from exc
