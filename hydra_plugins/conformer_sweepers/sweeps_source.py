"""The `sweep` config group from the repository's top-level `sweeps/` folder: `python run.py sweep=lr_grid` reads
`sweeps/lr_grid.yaml`. A config source (scheme `sweeps://`) that serves that one folder as the group, and the
search path entry that adds it to every composition (run.py, msrun workers, Hydra's compose API in tests)."""
from __future__ import annotations

import os
from pathlib import Path

from hydra._internal.core_plugins.file_config_source import FileConfigSource  # noqa: I001  (Hydra's file source)
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult
from hydra.plugins.search_path_plugin import SearchPathPlugin

GROUP = "sweep"
SWEEPS_DIR = Path(__file__).resolve().parents[2] / "sweeps"


class SweepsConfigSource(FileConfigSource):
    """`sweep/<name>` is `<folder>/<name>.yaml`; nothing else is found here."""

    @staticmethod
    def scheme() -> str:
        return "sweeps"

    @staticmethod
    def _inside(config_path: str) -> str | None:
        head, _, rest = config_path.strip("/").partition("/")
        return rest if head == GROUP else None

    def load_config(self, config_path: str) -> ConfigResult:
        inner = self._inside(config_path)
        if not inner:
            raise ConfigLoadError(f"Config not found : {config_path}")
        return super().load_config(inner)

    def available(self) -> bool:
        return os.path.isdir(self.path)

    def is_group(self, config_path: str) -> bool:
        inner = self._inside(config_path)
        return config_path.strip("/") == "" or (inner is not None and super().is_group(inner))

    def is_config(self, config_path: str) -> bool:
        inner = self._inside(config_path)
        return bool(inner) and super().is_config(inner)

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        if config_path.strip("/") == "":
            return [GROUP] if results_filter in (None, ObjectType.GROUP) else []
        inner = self._inside(config_path)
        if inner is None:
            return []
        files: list[str] = []
        for name in os.listdir(os.path.join(self.path, inner)):
            self._list_add_result(files=files, file_path=f"{config_path.rstrip('/')}/{name}", file_name=name,
                                  results_filter=results_filter)
        return sorted(set(files))


class SweepsSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="conformer-sweeps", path=f"sweeps://{SWEEPS_DIR}")
