"""olm: compose, train and compare language-model variants."""

from typing import Any, Mapping

from olm import registry as _registry
from olm.errors import ConfigError

__version__ = "0.1.0"


def load_builtins() -> None:
    """Register olm's own components: the blocks of olm.nn and the optimizers of the run schema. The registry calls
    it before its first lookup; importing ``olm`` alone stays light (no torch)."""
    import olm.nn  # noqa: F401
    import olm.train.config  # noqa: F401


_registry.add_builtins(load_builtins)


def build_model(cfg: Mapping[str, Any], path: str = "model"):
    """Build a registered model from a config mapping (dict or DictConfig).

    ``name`` picks the model kind (default ``lm``), ``imports`` lists modules to import first (third-party
    components), and every other key is a constructor argument, validated against the registered signature.
    """
    spec = dict(_registry._plain(cfg) or {})
    imports = spec.pop("imports", None) or []
    if not isinstance(imports, list):
        raise ConfigError(f"{path}.imports={imports!r} must be a list of module names")
    _registry.import_modules(imports, f"{path}.imports")
    spec.setdefault("name", "lm")
    return _registry.build("model", spec, path)


__all__ = ["ConfigError", "build_model", "load_builtins", "__version__"]
