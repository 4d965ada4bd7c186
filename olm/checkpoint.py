"""Loading what a run leaves: checkpoints (read safely: tensors and plain containers only, ``weights_only=True``,
never arbitrary pickle), exported model dirs and run dirs, each with its tokenizer.

The one place a model is loaded from disk: the ``olm`` commands, the lm-eval model type, generation and conversion
all come here. It sits below them, on olm.nn and olm.data only; nothing here imports Lightning."""

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


def run_tokenizer_dir(run_dir: Path) -> Path:
    """Where a run keeps its tokenizer: with the exported model, else beside the checkpoints (saved at start)."""
    exported = run_dir / "model" / "tokenizer"
    return exported if exported.is_dir() else run_dir / "tokenizer"


def model_from_checkpoint(path: Path):
    """The olm model a Lightning checkpoint holds, rebuilt from the model config saved in it."""
    from olm.nn import Block
    state = load_checkpoint(path)
    meta = state.get("olm") or {}
    if "model_config" not in meta:
        raise ConfigError(f"checkpoint {str(path)!r} has no olm model config; was it written by olm-train?")
    model = Block.from_config(meta["model_config"])
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:  # weights of another shape than the model config the checkpoint names
        first = str(exc).strip().splitlines()
        reason = first[1].strip() if len(first) > 1 else first[0] if first else type(exc).__name__
        raise ConfigError(f"checkpoint {str(path)!r}: its weights do not fit its model config ({reason})") from exc
    return model


def load_model_and_tokenizer(ckpt: str, require_tokenizer: bool = False, flag: str = "--ckpt"):
    """A model and its tokenizer from an exported model dir, a run dir, or a Lightning .ckpt file.

    A run dir gives its exported ``model/``, else its last checkpoint. The tokenizer is the one saved with the
    model or run, else None; with ``require_tokenizer``, the byte tokenizer for a model whose vocabulary is the
    256 bytes, and a ConfigError saying where the tokenizer should be for any other. ``flag`` is the argument
    that named ``ckpt``, for the error lines.
    """
    from olm.nn import Block

    path = Path(ckpt)
    if not path.exists():
        raise ConfigError(f"{flag} {str(path)!r} does not exist; give a .ckpt file, a run dir or a model dir")
    if path.is_dir() and (path / "model" / "config.json").is_file():
        model_dir = path / "model"
        model, tokenizer_dir = Block.load(model_dir), model_dir / "tokenizer"
    elif path.is_dir() and (path / "config.json").is_file():
        model, tokenizer_dir = Block.load(path), path / "tokenizer"
    elif path.is_dir():
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise ConfigError(
                f"{flag} {str(path)!r} holds no model: looked for model/config.json, config.json "
                "and checkpoints/*.ckpt"
            )
        model, tokenizer_dir = model_from_checkpoint(checkpoint), run_tokenizer_dir(path)
    else:  # a checkpoint file, normally <run>/checkpoints/<name>.ckpt
        model, tokenizer_dir = model_from_checkpoint(path), run_tokenizer_dir(path.parent.parent)

    from olm.data import ByteTokenizer, load_tokenizer

    if tokenizer_dir.is_dir():
        return model, load_tokenizer(tokenizer_dir)
    if not require_tokenizer:
        return model, None
    if model.vocab_size == ByteTokenizer.vocab_size:
        return model, ByteTokenizer()
    raise ConfigError(
        f"no tokenizer found for {flag} {str(path)!r}: expected one in {str(tokenizer_dir)!r} (the model's "
        f"vocab_size={model.vocab_size} is not the byte tokenizer's {ByteTokenizer.vocab_size}; or give "
        "--tokenizer)"
    )
