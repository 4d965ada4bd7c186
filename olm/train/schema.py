"""The model half of a config: Hydra/OmegaConf schemas derived from the component registry (one source of truth).

For every registered component of the kinds users pick from the command line, a typed dataclass is made from the
class signature and stored in Hydra's ConfigStore:

- ``model/<kind>/<name>`` (kinds: attention, norm, ffn, position) so ``model/attention=gqa`` selects a component and
  ``model.attention.num_kv_heads=abc`` or ``model.attention.num_kv_head=2`` fail in Hydra with the key named;
- ``model/schema_<name>`` for every registered model, which the presets in ``conf/model/`` extend, so unknown keys and
  type errors in ``model.*`` are caught while composing, before anything is built.

Parameters the enclosing block fills in (embed_dim, num_heads, ...) are left out of component schemas, and every
component parameter defaults to null, which means "the component's own default" (the registry drops nulls). So a
model-level setting such as ``model.bias=true`` still reaches the attention and FFN unless the component sets it.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Dict, List, Optional

from olm import registry

COMPONENT_GROUPS = ("attention", "norm", "ffn", "position")
# Arguments a parent block provides; they never appear in a component's config node.
PROVIDED_BY_KIND = {
    "attention": {"embed_dim", "num_heads", "max_seq_len", "dropout", "causal", "position"},
    "norm": {"dim"},
    "ffn": {"embed_dim", "ff_multiplier", "dropout"},
    "position": {"head_dim", "num_heads", "max_seq_len", "embed_dim"},
}


def _field_type(annotation: Any) -> Any:
    """Map a signature annotation to a type OmegaConf understands (PEP 604 unions -> Optional, containers -> Any)."""
    if isinstance(annotation, str) or annotation is inspect.Parameter.empty:
        return Any
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and args[0] in (int, float, bool, str):
            return Optional[args[0]]
        if len(args) == 1 and args[0] in (dict, list):
            return Optional[Dict[str, Any]] if args[0] is dict else Optional[List[Any]]
        return Any
    if annotation in (int, float, bool, str):
        return annotation
    return Any


def schema_for(entry: registry.Entry, skip=frozenset(), extra: dict | None = None, unset_defaults: bool = False) -> type:
    """A dataclass with one typed field per constructor parameter of ``entry`` (minus ``skip``).

    ``unset_defaults``: every field defaults to None ("not set") instead of the signature's default.
    """
    fields = [("name", str, dataclasses.field(default=entry.name))]
    for p in entry.params.values():
        if p.name in skip:
            continue
        tp = _field_type(p.annotation)
        if unset_defaults:
            tp = Optional[tp] if tp in (int, float, bool, str) else tp
            fields.append((p.name, tp, dataclasses.field(default=None)))
        elif p.required:
            fields.append((p.name, tp, dataclasses.field(default="???")))
        else:
            default = p.default
            factory = (lambda v=default: type(v)(v)) if isinstance(default, (list, dict)) else None
            fields.append((p.name, tp, dataclasses.field(default_factory=factory) if factory else dataclasses.field(default=default)))
    for key, (tp, value) in (extra or {}).items():
        fields.append((key, tp, dataclasses.field(default_factory=lambda v=value: type(v)(v))))
    return dataclasses.make_dataclass(f"{entry.kind}_{entry.name}_schema", fields)


def register_model_configs() -> None:
    """Store component and model schemas in Hydra's ConfigStore (idempotent; olm.train.config.register_configs
    stores them with the run schema)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for kind in COMPONENT_GROUPS:
        for entry in registry.entries(kind):
            cs.store(group=f"model/{kind}", name=entry.name, node=schema_for(entry, PROVIDED_BY_KIND[kind], unset_defaults=True))
    for entry in registry.entries("model"):
        cs.store(group="model", name=f"schema_{entry.name}", node=schema_for(entry, extra={"imports": (List[str], [])}))
