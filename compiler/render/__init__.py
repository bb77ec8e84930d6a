"""render_bundle(plan) → {relative file name: text}. Pure: same plan, same bytes.

This is the one place that sees the whole Plan; each renderer gets only the pieces it needs.
"""

from __future__ import annotations

from ..containers import config_paths
from ..plan import Plan
from ..stack import Stack, minimum_stack
from ..vendor import RuntimeArchive
from .accelerate import render_accelerate_yaml, render_deepspeed_json
from .config_yaml import build_run_plan, render_config_yaml
from .manifest import MANIFEST, render_manifest
from .readme import render_readme
from .scripts import render_job_sbatch, render_launch_sh, summary_lines

__all__ = ["render_bundle"]


def render_bundle(plan: Plan, *, runtime: RuntimeArchive | None = None, stack: Stack | None = None) -> dict[str, str]:
    """RUNTIME: the archive the bundle carries (its bytes are the caller's to write; here only its name, hash and
    version are used); None: launch.sh uses the installed tunefile (--no-vendor). STACK: the versions the
    bundle is resolved for; None: tunefile's declared minimums."""
    spec, target, distribution, batch = plan.spec, plan.target, plan.distribution, plan.batch
    if stack is None:
        stack = minimum_stack(plan.required_packages, vendored=runtime is not None,
                              tunefile_version=plan.tunefile_version)
    deepspeed = distribution.strategy == "deepspeed"
    summary = summary_lines(spec=spec, target=target, distribution=distribution, batch=batch,
                            precision=plan.precision, attention=plan.attention, load_in_4bit=plan.load_in_4bit)
    files = {
        "config.yaml": render_config_yaml(build_run_plan(plan), config_name=plan.config_name),
        "accelerate.yaml": render_accelerate_yaml(target=target, distribution=distribution,
                                                  precision=plan.precision, batch=batch,
                                                  loss_scaling=not spec.float16),
        "launch.sh": render_launch_sh(version=plan.tunefile_version, config_name=plan.config_name, summary=summary,
                                      target=target, offline=spec.offline, tf32=plan.tf32, deepspeed=deepspeed,
                                      runtime_archive=runtime.name if runtime else None),
        "job.sbatch": render_job_sbatch(version=plan.tunefile_version, config_name=plan.config_name,
                                        summary=summary, target=target, deepspeed=deepspeed,
                                        config_paths=config_paths(spec), model=plan.model,
                                        strategy=distribution.strategy, output_dir=spec.output_dir),
    }
    if deepspeed:
        if distribution.deepspeed_config is None:
            raise ValueError("the plan chose DeepSpeed but holds no deepspeed_config")
        files["deepspeed.json"] = render_deepspeed_json(deepspeed_config=distribution.deepspeed_config)
    files["README.md"] = render_readme(
        spec=spec, config_name=plan.config_name, version=plan.tunefile_version, target=target,
        load_in_4bit=plan.load_in_4bit, batch=batch, memory=plan.memory, decisions=plan.decisions,
        warnings=plan.warnings,
        file_names=[*files, "README.md", MANIFEST, *([runtime.name] if runtime else [])], runtime=runtime,
        stack=stack)
    files[MANIFEST] = render_manifest(
        version=plan.tunefile_version, config_name=plan.config_name, config_sha256=plan.config_sha256,
        target_name=target.name, target_sha256=plan.target_sha256, files=files,
        # The bundle's own runtime stands in for an installed tunefile.
        required_packages=[name for name in plan.required_packages if not (runtime and name == "tunefile")],
        binary_hashes={runtime.name: runtime.sha256} if runtime else None,
        runtime=runtime_manifest(runtime, plan.tunefile_version), stack=stack.as_manifest())
    return dict(sorted(files.items()))


def runtime_manifest(runtime: RuntimeArchive | None, version: str) -> dict:
    if runtime is None:
        return {"vendored": False, "tunefile_version": version}
    return {"vendored": True, "archive": runtime.name, "sha256": runtime.sha256, "tunefile_version": runtime.version}
