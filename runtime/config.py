"""The bundle's config.yaml, as the runtime reads it. The runtime never imports the compiler:
this file is the whole contract between them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class RunConfig:
    """The resolved config (``values``: the YAML mapping) and the bundle it came from."""

    values: dict[str, Any]
    bundle_dir: Path

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    @property
    def resolved(self) -> dict[str, Any]:
        """What the compiler decided: strategy, world size, precision, attention, …"""
        return self.values["resolved"]

    @property
    def output_dir(self) -> Path:
        return Path(self.values["output_dir"])


class ConfigFileError(Exception):
    """The file is not a bundle config.yaml this runtime can read."""


def load_run_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigFileError(f"{path}: cannot read the bundle config: {exc}") from None
    if not isinstance(values, dict) or "resolved" not in values:
        raise ConfigFileError(f"{path}: not a compiled bundle config (no `resolved:` section); "
                              "compile your YAML with `tunefile compile` first")
    return RunConfig(values=values, bundle_dir=path.resolve().parent)
