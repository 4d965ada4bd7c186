"""olm: compose, train and compare language-model variants."""

from olm import registry as _registry
from olm.errors import ConfigError
from olm.registry import build_model

__version__ = "0.1.0"


def load_builtins() -> None:
    """Register olm's own components: the blocks of olm.nn and the optimizers of the run schema. The registry calls
    it before its first lookup; importing ``olm`` alone stays light (no torch)."""
    import importlib.util

    import olm.nn  # noqa: F401

    if importlib.util.find_spec("omegaconf") is not None:  # olm.nn alone works without the config stack
        import olm.train.config  # noqa: F401


_registry.add_builtins(load_builtins)

__all__ = ["ConfigError", "build_model", "load_builtins", "__version__"]
