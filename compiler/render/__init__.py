"""render_bundle(plan) → {relative file name: text}. Pure: same plan, same bytes.

This is the one place that sees the whole Plan; each renderer gets only the pieces it needs.
"""

from __future__ import annotations

from ..plan import Plan
from .accelerate import render_accelerate_yaml, render_deepspeed_json
from .config_yaml import build_run_plan, render_config_yaml
from .manifest import MANIFEST, render_manifest
from .readme import render_readme
from .scripts import render_job_sbatch, render_launch_sh, summary_lines

__all__ = ["render_bundle"]


def render_bundle(plan: Plan) -> dict[str, str]:
    spec, target, distribution, batch = plan.spec, plan.target, plan.distribution, plan.batch
    deepspeed = distribution.strategy == "deepspeed"
    summary = summary_lines(spec=spec, target=target, distribution=distribution, batch=batch,
                            precision=plan.precision, attention=plan.attention, load_in_4bit=plan.load_in_4bit)
    files = {
        "config.yaml": render_config_yaml(build_run_plan(plan), config_name=plan.config_name),
        "accelerate.yaml": render_accelerate_yaml(target=target, distribution=distribution,
                                                  precision=plan.precision, batch=batch,
                                                  loss_scaling=not spec.float16),
        "launch.sh": render_launch_sh(version=plan.tunefile_version, config_name=plan.config_name, summary=summary,
                                      target=target, offline=spec.offline, tf32=plan.tf32, deepspeed=deepspeed),
        "job.sbatch": render_job_sbatch(version=plan.tunefile_version, config_name=plan.config_name,
                                        summary=summary, target=target, deepspeed=deepspeed),
    }
    if deepspeed:
        if distribution.deepspeed_config is None:
            raise ValueError("the plan chose DeepSpeed but holds no deepspeed_config")
        files["deepspeed.json"] = render_deepspeed_json(deepspeed_config=distribution.deepspeed_config)
    files["README.md"] = render_readme(
        spec=spec, config_name=plan.config_name, version=plan.tunefile_version, target=target,
        load_in_4bit=plan.load_in_4bit, batch=batch, memory=plan.memory, decisions=plan.decisions,
        warnings=plan.warnings, required_packages=plan.required_packages,
        file_names=[*files, "README.md", MANIFEST])
    files[MANIFEST] = render_manifest(
        version=plan.tunefile_version, config_name=plan.config_name, config_sha256=plan.config_sha256,
        target_name=target.name, target_sha256=plan.target_sha256, files=files,
        required_packages=plan.required_packages)
    return dict(sorted(files.items()))
