"""`Block`: the base of every olm module. It remembers the arguments it was built with, so any block can be saved
as (JSON config + safetensors weights) and rebuilt anywhere without the config tree and without pickle."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from olm import registry

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    raise TypeError(f"block argument {value!r} of type {type(value).__name__} cannot be saved as JSON")


# torch.nn.init's functions and the in-place random fills they use: no-ops on meta tensors (there are no values).
_INIT_FUNCTIONS = {"uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_", "fill_", "zero_"}


class _SkipInitOnMeta(torch.overrides.TorchFunctionMode):
    """Random initialisation of a meta tensor returns it as it is: torch's meta kernels for the random fills import
    torch._dynamo on first use, which costs seconds, for values that do not exist."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in _INIT_FUNCTIONS:
            tensor = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by keyword
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device():
    """Build modules on the meta device: shapes only, no memory and no initialisation. Every constructor's checks
    still run, so a config is validated in milliseconds, also for the largest presets."""
    with torch.device("meta"), _SkipInitOnMeta():
        yield


def check_dropout(dropout: float) -> None:
    """Dropout probabilities are checked once here for every block that takes one."""
    if not 0.0 <= dropout < 1.0:
        raise registry.ConfigError(f"{registry.where('dropout')}={dropout} must be in [0, 1)")


class Block(nn.Module):
    """Base class of olm modules: records its constructor arguments as ``self.config``.

    Subclasses need do nothing: the arguments of the outermost constructor call (defaults filled in) are captured
    before ``__init__`` runs. ``to_config()`` adds the registered kind and name so that ``Block.from_config`` can
    rebuild the same module through the registry.
    """

    config: dict[str, Any]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        init = cls.__init__
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            # Only the most derived class records: a subclass calling super().__init__ must not overwrite it.
            if "config" not in self.__dict__:
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                arguments = dict(bound.arguments)
                arguments.pop("self")
                object.__setattr__(self, "config", arguments)
            init(self, *args, **kw)

        cls.__init__ = recording_init

    def to_config(self) -> dict[str, Any]:
        """A JSON-able dict that rebuilds this block: ``{"kind", "name", **arguments}``."""
        kind = getattr(type(self), "component_kind", None)
        name = getattr(type(self), "component_name", None)
        if kind is None:
            raise TypeError(f"{type(self).__name__} is not registered; register it to save or rebuild it from config")
        return {"kind": kind, "name": name, **_jsonable(self.config)}

    @staticmethod
    def from_config(config: dict[str, Any]) -> "Block":
        config = dict(config)
        kind = config.pop("kind")
        registry.import_modules(config.pop("imports", []) or [])
        return registry.build(kind, config, path=kind)

    def num_parameters(self, exclude_position_embeddings: bool = False) -> int:
        """Parameter count, tied weights counted once; optionally without learned position tables (as for MFU)."""
        params = {id(p): p for p in self.parameters()}
        if exclude_position_embeddings:
            for module in self.modules():
                if getattr(module, "is_position_table", False):
                    for p in module.parameters():
                        params.pop(id(p), None)
        return sum(p.numel() for p in params.values())

    def save(self, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (no pickle); returns the directory."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"format_version": FORMAT_VERSION, "block": self.to_config(), **(extra or {})}
        # Modules that registered third-party blocks of this model, imported again by load().
        modules = {type(m).__module__ for m in self.modules() if isinstance(m, Block)}
        payload["block"]["imports"] = sorted(m for m in modules if m != "olm" and not m.startswith("olm."))
        tmp = directory / (CONFIG_FILE + ".tmp")
        tmp_weights = directory / (WEIGHTS_FILE + ".tmp")
        try:  # both files complete before either replaces an earlier export
            tmp.write_text(json.dumps(payload, indent=2) + "\n")
            save_model(self, str(tmp_weights))
            os.replace(tmp_weights, directory / WEIGHTS_FILE)
            os.replace(tmp, directory / CONFIG_FILE)
        except BaseException:
            for leftover in (tmp, tmp_weights):  # e.g. a full disk: leave no partial files behind
                leftover.unlink(missing_ok=True)
            raise
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "Block":
        """Rebuild a block saved with :meth:`save` and load its weights (safetensors only)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist; expected a directory written by Block.save")
        try:
            payload = json.loads(config_path.read_text())
            block_config = payload["block"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise registry.ConfigError(f"{config_path} is not a valid olm block config: {reason}") from exc
        if not isinstance(block_config, dict) or "kind" not in block_config:
            raise registry.ConfigError(f"{config_path} is not a valid olm block config: 'block' needs a 'kind'")
        block = Block.from_config(block_config)
        if not isinstance(block, cls):
            raise TypeError(f"{directory} holds a {type(block).__name__}, not a {cls.__name__}")
        try:
            missing, unexpected = load_model(block, str(weights_path), strict=True, device=str(map_location))
        except (SafetensorError, RuntimeError, OSError) as exc:
            # ConfigError (a ValueError): `olm generate` and other entry points report it in one line
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise registry.ConfigError(f"{weights_path} cannot be loaded (truncated or corrupted?): {reason}") from exc
        return block
