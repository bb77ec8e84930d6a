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
    except UnicodeDecodeError as exc:  # an edited or damaged copy: the compiler writes UTF-8
        raise ConfigFileError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                              "compile the bundle again") from None
    except (OSError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split())  # YAML's message spans lines; the error is one
        raise ConfigFileError(f"{path}: cannot read the run plan: {reason}") from None
    try:
        return parse_run_plan(values)
    except RunPlanError as exc:
        raise ConfigFileError(f"{path}: not a run plan this runtime reads: {exc}; compile your YAML with "
                              "`tunefile compile` (the same tunefile version as the runtime)") from None
