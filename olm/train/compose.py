"""Composing a run config exactly as ``olm-train`` (Hydra) does, with Hydra's multi-line composition reports turned
into one-line ConfigErrors that name the override, the key and the known options.

The search path is Hydra's for the app: olm's tree as package data (``pkg://olm.conf``) or the primary config dir
given with ``--config-path``, a ``--config-dir`` in front, and what olm's SearchPathPlugin adds (a team's ``conf/``
in the working directory, ``OLM_CONFIG_PATH``). The modules that a team tree's model presets list under ``imports``
are imported when the search path is built (:func:`import_team_modules`), so that their components, of any kind and
any number, are Hydra options before anything composes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from typing import Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from olm.errors import ConfigError, did_you_mean, first_line
from olm.train.config import conf_dir, register_configs

CONFIG_MODULE = "olm.conf"
COMPONENT_GROUPS = ("attention", "norm", "ffn", "position")
# A grid sweep is checked job by job before it starts; beyond this many jobs only the first ones are composed.
MAX_CHECKED_JOBS = 256


@contextlib.contextmanager
def hydra_app(config_path: str | None = None, config_dir: str | None = None) -> Iterator:
    """Hydra's app object for olm's search path, as ``olm-train`` builds it. Any Hydra already initialised (a test
    inside ``initialize()``, a running job) is restored afterwards."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.config_search_path import SearchPathQuery

    register_configs()
    path = config_path or f"pkg://{CONFIG_MODULE}"
    if not path.startswith("pkg://"):
        path = os.path.abspath(path)
        if not os.path.isdir(path):
            raise ConfigError(f"--config-path {config_path!r}: no such directory")
    search_path = create_automatic_config_search_path(None, None, path)
    if config_dir is not None:
        extra = os.path.abspath(config_dir)
        if not os.path.isdir(extra):
            raise ConfigError(f"--config-dir {config_dir!r}: no such directory")
        search_path.prepend("command-line", f"file://{extra}", anchor=SearchPathQuery(provider="schema"))
        import_team_modules(search_path)  # the plugin ran before --config-dir was added
    global_hydra = GlobalHydra.instance()
    previous = global_hydra.hydra if global_hydra.is_initialized() else None
    global_hydra.clear()
    try:
        yield Hydra.create_main_hydra2(task_name="train", config_search_path=search_path)
    finally:
        global_hydra.clear()
        if previous is not None:
            global_hydra.initialize(previous)


def compose(overrides: list[str] = (), *, config_path: str | None = None, config_dir: str | None = None,
            config_name: str = "train", multirun: bool = False, return_hydra_config: bool = False) -> DictConfig:
    """The run config for ``overrides`` (command-line syntax), composed as ``olm-train`` composes it.

    Raises ConfigError with one line for every composition mistake. The result is not yet checked: pass it to
    ``olm.train.checks.check_run`` (as ``olm-train`` and ``train()`` do) for ranges, choices and the model."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from hydra.types import RunMode

    overrides = list(overrides)
    import_command_line_modules(overrides)
    mode = RunMode.MULTIRUN if multirun else RunMode.RUN
    with hydra_app(config_path, config_dir) as app:
        try:
            cfg = _compose_importing(app, config_name, overrides, mode)
        except OverrideParseException as exc:
            raise ConfigError(_parse_error(overrides, exc)) from None
        except MissingConfigException as exc:
            raise ConfigError(_missing_option(exc)) from None
        except ConfigCompositionException as exc:
            raise ConfigError(_composition_error(overrides, exc, config_path, config_dir, config_name)) from None
    if "hydra" in cfg and OmegaConf.select(cfg, "hydra.mode") is None:
        with open_dict(cfg):
            cfg.hydra.mode = mode  # as Hydra's run and multirun set it, so checks know which one this is
    if return_hydra_config:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(cfg)  # as Hydra does for a job: ${hydra:runtime.choices...} resolves
    if not return_hydra_config and "hydra" in cfg:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def team_presets(search_path) -> dict[str, list | Exception]:
    """The model presets of the search path's trees other than olm's, each with the modules it lists under
    ``imports`` (read by Hydra's config sources, without composing), or the exception that loading it raised."""
    from hydra._internal.sources_registry import SourcesRegistry
    from hydra.core.object_type import ObjectType

    presets: dict[str, list | Exception] = {}
    for element in search_path.get_path():
        path = str(element.path)
        if "://" not in path:  # a plain directory (a DDP child rank's --config-path): Hydra reads it as a file tree
            path = f"file://{path}"
        scheme, _, where = path.rpartition("://")
        if path.startswith(("pkg://", "structured://")) or os.path.realpath(where) == str(conf_dir()):
            continue  # olm's and Hydra's trees import nothing; a team's package registers through its entry point
        source = SourcesRegistry.instance().resolve(scheme)(element.provider, path)
        if not source.available() or not source.is_group("model"):
            continue
        for name in source.list("model", ObjectType.CONFIG):
            if name in presets or name.startswith("schema"):
                continue  # an earlier tree's preset of the same name wins, as in Hydra
            try:
                imports = source.load_config(f"model/{name}").config.get("imports")
                presets[name] = list(imports) if isinstance(imports, ListConfig) else []
            except Exception as exc:  # a broken preset is reported when it is used, not by every other command
                presets[name] = exc
    return presets


def import_team_modules(search_path) -> None:
    """Import the modules that the team trees' model presets list under ``imports`` and store their components'
    schemas, so that a team preset composes whatever team components (attention, norm, ffn, position, optimizer)
    it names, through every entry point, Hydra's plain compose API included. A preset whose imports fail is
    skipped here: choosing it reports the failure (:func:`_compose_importing`), and other presets still work."""
    from olm import registry

    for imports in team_presets(search_path).values():
        if isinstance(imports, list):
            try:
                registry.import_modules(imports)
            except ConfigError:
                continue
    register_configs()


def _compose_importing(app, config_name: str, overrides: list[str], mode) -> DictConfig:
    """Compose; when model component options are missing (a preset of a tree not scanned for imports, or one whose
    imports failed), put stand-ins in their place to read ``model.imports``, import those modules (a failure is the
    line reported) and compose again."""
    from hydra.core.config_store import ConfigStore
    from hydra.errors import MissingConfigException

    def run():
        return app.compose_config(config_name, overrides, run_mode=mode, with_log_configuration=False)

    try:
        return run()
    except MissingConfigException as first:
        store = ConfigStore.instance()
        stand_ins: list[tuple[str, str]] = []
        try:
            exc = first
            while True:  # one stand-in per missing component: a preset may name several of the team's
                group, _, name = str(getattr(exc, "missing_cfg_file", "") or "").rpartition("/")
                kind = group.removeprefix("model/")
                if not group.startswith("model/") or kind not in COMPONENT_GROUPS or not name:
                    raise first from None
                if (kind, name) in stand_ins:  # not a default of the preset: a stand-in cannot help
                    raise first from None
                store.store(group=group, name=name, node={"name": name})
                stand_ins.append((kind, name))
                try:
                    imports = OmegaConf.select(run(), "model.imports", default=None) or []
                    break
                except MissingConfigException as again:
                    exc = again
        finally:  # a failure here is another mistake of the command line: reported as it is
            for kind, name in stand_ins:
                store.repo["model"][kind].pop(f"{name}.yaml", None)
        if not imports:
            raise first from None
        from olm import registry

        registry.import_modules(list(imports), "model.imports")
        register_configs()
        return run()


def import_command_line_modules(overrides: list[str]) -> None:
    """``model.imports=[a,b]`` on the command line: imported before composing (working directory on sys.path)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:
        return  # compose reports the parse error
    for override in parsed:
        if override.key_or_group == "model.imports" and not override.is_delete():
            value = override.value()
            modules = value if isinstance(value, list) else [value]
            if all(isinstance(m, str) for m in modules):
                from olm import registry

                registry.import_modules(modules, "model.imports")
                register_configs()


def seed_sweep(seeds: int, seed: int, overrides: list[str], sweep_params: dict | None) -> list[str]:
    """The override that gives every variant of a grid ``seeds`` seeds (seed, ..., seed+seeds-1), or none for one
    seed. A sweep over ``seed`` as well, or over ``seeds`` itself, is refused: they would pick the seeds twice."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{key}={value}" for key, value in (sweep_params or {}).items()]
    for override in OverridesParser.create().parse_overrides(params + list(overrides)):
        key = override.get_key_element().lstrip("+~")
        value = override.input_line.partition("=")[2] if override.input_line else ""
        if key == "seeds" and override.is_sweep_override():
            raise ConfigError(f"seeds={value} is a sweep; seeds takes one number: "
                              "the seeds per variant (a positive integer)")
        if key == "seed" and override.is_sweep_override() and seeds > 1:
            raise ConfigError(f"seeds={seeds} and the sweep seed={value} both pick "
                              f"the seeds; keep one (seeds={seeds} runs seed={seed},...,{seed + seeds - 1})")
    return [f"seed=range({seed},{seed + seeds})"] if seeds > 1 else []


def with_seeds(seeds: int, seed: int, overrides: list[str], sweep_params: dict | None) -> list[str]:
    """``overrides`` with the seed axis of ``seeds=N`` last (olm's sweeper and the pre-check both use this): the
    base seed is already read, so an explicit ``seed=N`` is dropped; it would keep its place and vary slowest."""
    extra = seed_sweep(seeds, seed, list(overrides), sweep_params)
    if not extra:
        return list(overrides)
    return [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != "seed"] + extra


def sweep_jobs(overrides: list[str], sweep_params: dict | None, seeds: int = 1,
               seed: int = 0) -> tuple[list[list[str]], int]:
    """The jobs of a grid multirun, as olm's sweeper makes them: the experiment's ``hydra.sweeper.params``, then the
    command line's overrides, then the seeds (``seeds=N``), the sweep ones expanded. Returns (the first
    MAX_CHECKED_JOBS jobs' overrides, the number of jobs)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    params = [f"{key}={value}" for key, value in (sweep_params or {}).items()]
    parsed = parser.parse_overrides(params + with_seeds(seeds, seed, list(overrides), sweep_params))
    by_key: dict[str, list[str]] = {}  # a later override of a key replaces an earlier one, as in Hydra's sweeper
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            by_key[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            by_key[key] = [override.input_line]
    lists = list(by_key.values())
    total = 1
    for values in lists:
        total *= len(values)
    jobs = [list(job) for job in itertools.islice(itertools.product(*lists), MAX_CHECKED_JOBS)]
    return jobs, total


# -- Hydra's composition errors as one line -------------------------------------------------------------------------
def _parse_error(overrides: list[str], exc: Exception) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except Exception as one:
            return f"cannot parse the override {override!r}: {first_line(one)}"
    return f"cannot parse the overrides: {first_line(exc)}"


def _missing_option(exc) -> str:
    missing = str(getattr(exc, "missing_cfg_file", "") or "")
    group, _, value = missing.rpartition("/")
    options = sorted(o for o in (getattr(exc, "options", None) or []) if not o.startswith("schema"))
    if not group or not options:
        text = first_line(exc)
        if "Cannot find primary config" in text:
            return text + " (olm-train's primary config is 'train': check --config-path / --config-name)"
        return text
    return f"{group}={value} is not a known option of {group!r}" + did_you_mean(value, options)


def _related(override: str, full_key: str) -> bool:
    """Whether ``override`` sets ``full_key``, a key below it, or a mapping above it (``data.sources={...}`` for
    ``data.sources.x``); a group choice above it (``optim=adamw``) stays, since it decides which keys exist."""
    key, _, value = override.lstrip("+~").partition("=")
    if key == full_key or key.startswith(full_key + "."):
        return True
    return full_key.startswith(key + ".") and value.lstrip().startswith("{")


def _composition_error(overrides: list[str], exc: Exception, config_path, config_dir, config_name) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = exc.__cause__
    text = first_line(exc)
    if cause is None:
        if text.startswith("Ambiguous value"):
            return text + " (a sweep needs -m; a list is key=[a,b]; a string with commas is quoted: key='a,b')"
        return text
    full_key = getattr(cause, "full_key", None) or ""
    reason = first_line(cause)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and full_key:
        parent, _, key = full_key.rpartition(".")
        # without the overrides of that key or of a node above or below it (data.sources={...} for data.sources.x)
        others = [o for o in overrides if not _related(o, full_key)]
        node = None
        try:
            base = compose(others, config_path=config_path, config_dir=config_dir, config_name=config_name)
            node = OmegaConf.select(base, parent) if parent else base
            keys = sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
        except Exception:
            keys = []
        where = f"of {parent!r}" if parent else "at the top level"
        known = did_you_mean(key, keys, f"known keys {where}") if keys else ""
        declared = parent and isinstance(node, DictConfig) and OmegaConf.get_type(node) not in (dict, None)
        advice = "" if declared else f" (to add a new key: +{full_key}=...)"
        return f"{full_key} is not a config key{known}{advice}"
    value = getattr(cause, "value", None)
    shown = f"={value!r}" if value is not None else ""
    if full_key:
        return f"{full_key}{shown}: {reason}"
    where = text.removesuffix(":").replace(" raised while composing config", "")
    return f"{where}: {reason}"
