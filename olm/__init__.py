"""olm: compose, train and compare language-model variants."""

from typing import Any, Mapping

from olm.errors import ConfigError

__version__ = "0.1.0"


def build_model(cfg: Mapping[str, Any], path: str = "model"):
    """Build a registered model from a config mapping (dict or DictConfig).

    ``name`` picks the model kind (default ``lm``), ``imports`` lists modules to import first (third-party
    components), and every other key is a constructor argument, validated against the registered signature.
    """
    from olm import registry

    spec = dict(registry._plain(cfg) or {})
    imports = spec.pop("imports", None) or []
    if not isinstance(imports, list):
        raise ConfigError(f"{path}.imports={imports!r} must be a list of module names")
    registry.import_modules(imports, f"{path}.imports")
    spec.setdefault("name", "lm")
    return registry.build("model", spec, path)


__all__ = ["ConfigError", "build_model", "__version__"]
