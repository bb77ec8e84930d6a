"""Read a bundle's config.yaml into the run plan (tunefile.schemas.run_plan), strictly.

The runtime never imports the compiler: the plan's types are the whole contract between them.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..schemas.run_plan import RunPlan, RunPlanError, parse_run_plan
from .errors import ConfigFileError

__all__ = ["ConfigFileError", "RunPlan", "load_run_plan"]


def load_run_plan(path: str | Path) -> RunPlan:
    """The plan in ``path``; ConfigFileError (one line naming the file and the key) when it is not one."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigFileError(f"{path}: cannot read the run plan: {exc}") from None
    try:
        return parse_run_plan(values)
    except RunPlanError as exc:
        raise ConfigFileError(f"{path}: not a run plan this runtime reads: {exc}; compile your YAML with "
                              "`tunefile compile` (the same tunefile version as the runtime)") from None
