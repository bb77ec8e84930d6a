"""render(plan) → {relative file name: text}. Pure: same plan, same bytes."""

from __future__ import annotations

import json

from ..plan import Plan
from .accelerate import render_accelerate_yaml
from .config_yaml import render_config_yaml
from .manifest import MANIFEST, render_manifest
from .readme import render_readme
from .scripts import render_job_sbatch, render_launch_sh

__all__ = ["render_bundle"]


def render_bundle(plan: Plan) -> dict[str, str]:
    files = {
        "config.yaml": render_config_yaml(plan),
        "accelerate.yaml": render_accelerate_yaml(target=plan.target, distribution=plan.distribution,
                                                  precision=plan.precision, batch=plan.batch),
        "launch.sh": render_launch_sh(plan),
        "job.sbatch": render_job_sbatch(plan),
    }
    if plan.distribution.strategy == "deepspeed":
        files["deepspeed.json"] = json.dumps(plan.distribution.deepspeed_config, indent=2, sort_keys=True) + "\n"
    files["README.md"] = render_readme(plan, sorted([*files, "README.md", MANIFEST]))
    files[MANIFEST] = render_manifest(plan, files)
    return dict(sorted(files.items()))
