"""olm's Hydra plugins, found by Hydra in the ``hydra_plugins`` namespace package wherever olm is installed.

- ``OlmSearchPathPlugin``: registers olm's schemas and resolvers, puts olm's config tree (``pkg://olm.conf``) on
  every search path, and a team's own trees in front of it: ``conf/`` in the working directory and the directories
  listed in ``OLM_CONFIG_PATH`` (separated by ``os.pathsep``); it imports the modules the team's model presets list
  under ``imports``, so their components are options. So Hydra's plain compose API works without an olm-private
  call or import, and a team repository composes on top of olm's tree without copying it.
- ``TeamConfigSource`` (scheme ``olmteam://``): a team tree as a file tree in which ``experiments/`` (plural) also
  serves the ``experiment`` group, as in olm's own checkout.

Importing this module is cheap; olm itself is imported when Hydra builds a search path.
"""

from __future__ import annotations

import os
from typing import List, Optional

from hydra._internal.core_plugins.file_config_source import FileConfigSource
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigResult
from hydra.plugins.search_path_plugin import SearchPathPlugin

OLM_TREE = "pkg://olm.conf"


def team_dirs() -> list[str]:
    """A team's config trees: ``./conf`` (when it is not olm's own tree) and those in ``OLM_CONFIG_PATH``."""
    from olm.train.config import conf_dir

    own = os.path.realpath(conf_dir())
    candidates = [os.path.join(os.getcwd(), "conf")]
    candidates += [p for p in os.environ.get("OLM_CONFIG_PATH", "").split(os.pathsep) if p]
    found = []
    for path in candidates:
        real = os.path.realpath(path)
        if os.path.isdir(real) and real != own and real not in found:
            found.append(real)
    return found


class OlmSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from olm.train.compose import import_team_modules

        for path in reversed(team_dirs()):
            search_path.prepend(provider="olm-team", path=f"olmteam://{path}")
        search_path.append(provider="olm", path=OLM_TREE)
        import_team_modules(search_path)  # the team presets' components become options; stores every schema


class TeamConfigSource(FileConfigSource):
    """A file tree whose ``experiments/`` folder also answers for the ``experiment`` group."""

    @staticmethod
    def scheme() -> str:
        return "olmteam"

    def _mapped(self, config_path: str) -> str:
        head, sep, rest = config_path.partition("/")
        if head == "experiment" and not os.path.isdir(os.path.join(self.path, "experiment")):
            return f"experiments{sep}{rest}"
        return config_path

    def load_config(self, config_path: str) -> ConfigResult:
        return super().load_config(self._mapped(config_path))

    def is_group(self, config_path: str) -> bool:
        return super().is_group(self._mapped(config_path))

    def is_config(self, config_path: str) -> bool:
        return super().is_config(self._mapped(config_path))

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        files: List[str] = []
        full_path = os.path.realpath(os.path.join(self.path, self._mapped(config_path)))
        for file in os.listdir(full_path):
            self._list_add_result(files=files, file_path=os.path.join(config_path, file), file_name=file,
                                  results_filter=results_filter)
        return sorted(set(files))
