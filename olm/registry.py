"""The component registry: the one source of truth for which blocks exist and which parameters they take.

Blocks register themselves by kind and name::

    @register("norm", "rmsnorm")
    class RMSNorm(Block): ...

and configs pick them by name, either as a string (``norm: rmsnorm``) or as a mapping with a ``name`` key and
parameters (``attention: {name: gqa, num_kv_heads: 2}``). Parameters are checked against the registered class's
signature before anything is built, so a typo fails at once with a one-line error naming the config path, the bad
value, the closest valid name and the valid ones.

Third-party packages add components without forking olm through the entry point group ``olm.components`` (each entry
point names a module to import) or by listing modules under ``imports:`` in a model config.

This module imports nothing of olm but the error types (olm.errors).
"""

from __future__ import annotations

import contextvars
import dataclasses
import importlib
import inspect
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from olm.errors import ConfigError, OlmError, did_you_mean

__all__ = ["ConfigError", "OlmError", "register", "get", "build", "build_model", "entries", "names", "kinds", "describe"]
ENTRY_POINT_GROUP = "olm.components"


@dataclass(frozen=True)
class Param:
    name: str
    default: Any  # inspect.Parameter.empty when required
    annotation: Any
    keyword_only: bool

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


@dataclass
class Entry:
    kind: str
    name: str
    cls: Callable
    doc: str
    params: dict[str, Param] = field(default_factory=dict)


_REGISTRY: dict[str, dict[str, Entry]] = {}
_plugins_loaded = False
# Loaders of the built-in components, run before the first lookup: olm/__init__ adds olm's own, so this module
# never imports the blocks it lists.
_builtin_loaders: list[Callable[[], None]] = []
# The config path of the component being built, so nested builds and errors name the full path (model.attention).
_current_path: contextvars.ContextVar[str] = contextvars.ContextVar("olm_config_path", default="")


def where(key: str) -> str:
    """``key`` prefixed with the config path of the component under construction (for error messages)."""
    prefix = _current_path.get()
    return f"{prefix}.{key}" if prefix else key


def _first_doc_line(obj: Any) -> str:
    """The first sentence of ``obj``'s docstring as one line, however many lines it wraps over.

    The sentence ends at a period followed by a space or a line end, or at a blank line; a period inside
    parentheses ("(Press et al. 2022)") does not end it.
    """
    paragraph = (inspect.getdoc(obj) or "").strip().split("\n\n")[0]
    text = " ".join(paragraph.split())
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "." and depth <= 0 and text[i + 1 : i + 2] in ("", " "):
            return text[: i + 1]
    return text


def _signature_params(cls: Callable) -> dict[str, Param]:
    """The constructor's parameters; a dataclass field with a default factory shows the value the factory makes,
    and a dataclass's ``name`` field (the registered name itself) is left out."""
    sig = inspect.signature(cls)
    factories = {f.name: f.default_factory for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    params = {}
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or (factories and p.name == "name"):
            continue
        default = p.default
        factory = factories.get(p.name, dataclasses.MISSING)
        if factory is not dataclasses.MISSING:
            default = factory()
            default = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
        params[p.name] = Param(p.name, default, p.annotation, p.kind == p.KEYWORD_ONLY)
    return params


def register(kind: str, name: str) -> Callable:
    """Class decorator: make ``cls`` buildable from configs as ``kind`` / ``name``.

    Registering a second, different class under a taken name raises: two plugins silently shadowing each other
    would make results depend on import order.
    """

    def decorator(cls):
        entries = _REGISTRY.setdefault(kind, {})
        old = entries.get(name)
        if old is not None and (old.cls.__module__, old.cls.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ConfigError(
                f"{kind} {name!r} is already registered by {old.cls.__module__}.{old.cls.__qualname__}; "
                f"{cls.__module__}.{cls.__qualname__} must use another name"
            )
        entries[name] = Entry(kind, name, cls, _first_doc_line(cls), _signature_params(cls))
        # Several names may share a class (gqa / mqa); the first registration is the class's canonical name.
        if "component_name" not in cls.__dict__:
            cls.component_kind, cls.component_name = kind, name
        return cls

    return decorator


def add_builtins(loader: Callable[[], None]) -> None:
    """Run ``loader`` (which imports modules that register components) before the registry's first lookup."""
    _builtin_loaders.append(loader)


def load_plugins() -> None:
    """Load the built-in components and every module named by the ``olm.components`` entry point group (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for loader in _builtin_loaders:
        loader()
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must say which one it is
            raise ConfigError(f"entry point {ENTRY_POINT_GROUP}:{ep.name} = {ep.value!r} failed to import: {exc}") from exc


def import_modules(modules: Iterable[str], path: str = "imports") -> None:
    """Import the modules a config lists under ``imports:`` so their components register. Modules in the working
    directory are found too (a team's blocks beside its configs), after installed packages."""
    import os
    import sys

    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for i, module in enumerate(modules):
        if not isinstance(module, str) or not module:
            raise ConfigError(f"{path}[{i}]={module!r} must be a module name (a non-empty string)")
        try:
            importlib.import_module(module)
        except Exception as exc:  # a team module's own bug too: one line naming the config key, not a traceback
            reason = str(exc) if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
            raise ConfigError(f"{path}[{i}]={module!r} cannot be imported: {reason}") from exc


def kinds() -> list[str]:
    load_plugins()
    return sorted(_REGISTRY)


def names(kind: str) -> list[str]:
    load_plugins()
    return sorted(_REGISTRY.get(kind, {}))


def _suggest(value: str, valid: Iterable[str]) -> str:
    return did_you_mean(value, valid)


def get(kind: str, name: str, path: str | None = None) -> Entry:
    """The registry entry for ``kind``/``name``, or a ConfigError naming ``path`` and the valid names."""
    load_plugins()
    where = path or kind
    if kind not in _REGISTRY:
        raise ConfigError(f"component kind {kind!r} is not known" + _suggest(kind, sorted(_REGISTRY)))
    if not isinstance(name, str) or name not in _REGISTRY[kind]:
        raise ConfigError(f"{where}={name!r} is not a registered {kind}" + _suggest(name, sorted(_REGISTRY[kind])))
    return _REGISTRY[kind][name]


def entries(kind: str | None = None) -> list[Entry]:
    load_plugins()
    selected = [kind] if kind else sorted(_REGISTRY)
    if kind and kind not in _REGISTRY:
        raise ConfigError(f"component kind {kind!r} is not known" + _suggest(kind, sorted(_REGISTRY)))
    return [_REGISTRY[k][n] for k in selected for n in sorted(_REGISTRY[k])]


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists, so configs and saved JSON hold only primitives."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # olm.nn works without the config stack
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def split_spec(spec: Any, path: str, default_name: str | None = None) -> tuple[str, dict[str, Any]]:
    """A component choice (``"rmsnorm"`` or ``{name: rmsnorm, eps: 1e-6}``) -> (name, params)."""
    spec = _plain(spec)
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        # null means "not set": the component's own default (or the enclosing block's) applies
        params = {k: v for k, v in spec.items() if v is not None}
        name = params.pop("name", default_name)
        if name is None:
            raise ConfigError(f"{path} needs a 'name' key (got keys: {', '.join(map(str, spec)) or 'none'})")
        return name, params
    raise ConfigError(f"{path}={spec!r} must be a component name or a mapping with a 'name' key")


_CHECKABLE = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check_type(value: Any, annotation: Any, path: str) -> Any:
    """Reject values of the wrong basic type (a string for an int, say); ints are accepted where floats are."""
    ann = annotation
    if isinstance(ann, str):  # postponed annotations: "int", "float | None", ...
        ann = {"int": int, "float": float, "bool": bool, "str": str}.get(ann.replace(" | None", ""))
    elif isinstance(ann, types.UnionType):
        args = [a for a in ann.__args__ if a is not type(None)]
        ann = args[0] if len(args) == 1 else None
    if ann not in _CHECKABLE or value is None:
        return value
    ok = (
        (ann is bool and isinstance(value, bool))
        or (ann is int and isinstance(value, int) and not isinstance(value, bool))
        or (ann is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (ann is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(f"{path}={value!r} must be {_CHECKABLE[ann]}")
    return float(value) if ann is float else value


def check_params(entry: Entry, params: Mapping[str, Any], path: str, provided: Iterable[str] = ()) -> dict[str, Any]:
    """Validate config ``params`` against the signature of ``entry``; ``provided`` are set by the parent block."""
    provided = set(provided)
    checked = {}
    settable = [n for n in entry.params if n not in provided]
    for key, value in params.items():
        if key in provided:
            raise ConfigError(
                f"{path}.{key} is set by the enclosing block and cannot be given here; settable: {', '.join(settable)}"
            )
        if key not in entry.params:
            raise ConfigError(
                f"{path}.{key} is not a parameter of {entry.kind} {entry.name!r}" + _suggest(key, settable)
            )
        checked[key] = _check_type(_plain(value), entry.params[key].annotation, f"{path}.{key}")
    missing = [p.name for p in entry.params.values() if p.required and p.name not in checked and p.name not in provided]
    if missing:
        raise ConfigError(f"{path} ({entry.kind} {entry.name!r}) is missing required parameter(s): {', '.join(missing)}")
    return checked


def build(kind: str, spec: Any, path: str | None = None, default_name: str | None = None, **provided: Any) -> Any:
    """Build the ``kind`` component chosen by ``spec``; ``provided`` are arguments the enclosing block fills in.

    ``path`` is relative to the component under construction (``attention`` inside ``model`` becomes
    ``model.attention``). Provided arguments the component does not accept are dropped (a norm takes no
    ``num_heads``), so a parent can offer the same context to every choice of a kind.
    """
    path = where(path or kind)
    name, params = split_spec(spec, path, default_name)
    entry = get(kind, name, f"{path}.name" if isinstance(_plain(spec), Mapping) else path)
    accepted = {k: v for k, v in provided.items() if k in entry.params}
    checked = check_params(entry, params, path, provided=accepted)
    token = _current_path.set(path)
    try:
        return entry.cls(**accepted, **checked)
    except ConfigError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError, OverflowError, RuntimeError) as exc:
        # A value the component did not validate itself: still one line naming the config path, never a traceback
        # from deep inside the component or torch (the original stays chained as __cause__ for debugging).
        reason = (str(exc).strip().splitlines() or [""])[0]
        given = ", ".join(f"{k}={v!r}" for k, v in checked.items())
        raise ConfigError(
            f"{path} ({kind} {entry.name!r}) cannot be built from {given or 'its defaults'}: {type(exc).__name__}: {reason}"
        ) from exc
    finally:
        _current_path.reset(token)


def describe(entry: Entry, skip: Iterable[str] = (), width: int | None = None) -> str:
    """``name(param: type = default, ...)  doc`` for ``olm components``, without the parameters in ``skip``.

    With ``width``, the text is wrapped to that many columns, breaking only between parameters and between words
    of the doc, with continuation lines indented by four spaces.
    """
    skip = set(skip)
    parts = []
    for p in entry.params.values():
        if p.name in skip:
            continue
        ann = p.annotation
        if ann is inspect.Parameter.empty:
            ann = ""
        elif not isinstance(ann, str):
            ann = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
        text = f"{p.name}: {ann}" if ann else p.name
        if not p.required:
            text += f" = {p.default!r}"
        parts.append(text)
    one_line = f"{entry.name}({', '.join(parts)})  {entry.doc}".rstrip()
    if width is None or len(one_line) <= width:
        return one_line
    # Wrapped: the signature breaks only between parameters ("out_bias: bool | None = None" stays whole), and the
    # doc starts on a line of its own so it does not read as one more parameter.
    signature = [f"{text}," for text in parts[:-1]] + [f"{parts[-1]})" if parts else ")"]
    signature[0] = f"{entry.name}({signature[0]}"
    # A parameter wider than a line (a mapping default) breaks after its own commas.
    signature = [sub for piece in signature for sub in (
        [f"{s}," for s in piece.split(", ")[:-1]] + [piece.split(", ")[-1]] if len(piece) + 4 > width else [piece])]
    lines: list[str] = []
    for group in (signature, entry.doc.split()):
        group_start = len(lines)  # each group starts on a new line
        for piece in group:
            if len(lines) > group_start and len(lines[-1]) + 1 + len(piece) <= width:
                lines[-1] += " " + piece
            else:
                lines.append(("    " if lines else "") + piece)
    return "\n".join(lines)


def build_model(cfg: Mapping[str, Any], path: str = "model"):
    """Build a registered model from a config mapping (dict or DictConfig).

    ``name`` picks the model kind (default ``lm``), ``imports`` lists modules to import first (third-party
    components), and every other key is a constructor argument, validated against the registered signature.
    """
    spec = dict(_plain(cfg) or {})
    imports = spec.pop("imports", None) or []
    if not isinstance(imports, list):
        raise ConfigError(f"{path}.imports={imports!r} must be a list of module names")
    import_modules(imports, f"{path}.imports")
    spec.setdefault("name", "lm")
    return build("model", spec, path)
