"""launch.sh and job.sbatch: Jinja templates that only place values Python computed."""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from typing import Any

import jinja2

from ..plan import Plan
from ..shell import one_line, sbatch_value, shell_quote

_DEFAULT_CPUS_PER_GPU = 8


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    def load(name: str) -> str:
        return resources.files("tunefile.templates").joinpath(name).read_text(encoding="utf-8")

    environment = jinja2.Environment(
        loader=jinja2.FunctionLoader(load),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # shell text, not HTML: every value goes through the `q` filter instead
    )
    environment.filters["q"] = shell_quote
    return environment


def render_template(name: str, **values: Any) -> str:
    return _environment().get_template(name).render(**values)


def summary_lines(plan: Plan) -> list[str]:
    """What runs, in a few comment lines a reviewer reads first."""
    spec, target = plan.spec, plan.target
    if spec.adapter:
        kind = "QLoRA" if plan.load_in_4bit else "LoRA"
        training = f"{kind} (r={spec.lora_r}, alpha={spec.lora_alpha}) on {spec.base_model}"
    else:
        training = f"Full fine-tune of {spec.base_model}"
    hardware = ("CPU process(es)" if target.gpu is None
                else f"GPU(s): {target.gpu.name if target.gpu_known else 'unspecified kind'}")
    strategy, fsdp = plan.distribution.strategy, plan.distribution.fsdp
    if fsdp is not None:
        strategy = f"FSDP{fsdp.version}" + (" with CPU offload" if fsdp.offload_params else "")
    elif strategy == "deepspeed":
        strategy = f"DeepSpeed ZeRO-{plan.distribution.deepspeed_stage}"
    lines = [
        training,
        f"on {target.nodes} node(s) × {target.gpus_per_node} {hardware}, strategy {strategy}, precision "
        f"{plan.precision}, attention {plan.attention}.",
        f"Batch: {plan.batch.explanation()}.",
    ]
    return [one_line(line) for line in lines]  # they become shell comments: a line break would escape them


def render_launch_sh(plan: Plan) -> str:
    target = plan.target
    return render_template(
        "launch.sh.j2",
        version=plan.tunefile_version,
        config_name=one_line(plan.config_name),
        summary=summary_lines(plan),
        offline=plan.spec.offline,
        env=list(target.env),
        nodes=target.nodes,
        world_size=target.world_size,
        processes_comment=f"{target.nodes} node(s) × {target.gpus_per_node} process(es) = {target.world_size} "
        "in total; accelerate starts this node's share.",
        deepspeed=plan.distribution.strategy == "deepspeed",
    )


def _job_name(plan: Plan) -> str:
    if plan.target.slurm.job_name:
        return plan.target.slurm.job_name
    stem = plan.config_name.rsplit(".", 1)[0]
    return "tunefile-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "job")


def render_job_sbatch(plan: Plan) -> str:
    target, slurm = plan.target, plan.target.slurm
    on_gpu = target.gpu is not None
    if slurm.cpus_per_task:
        cpus, cpus_comment = slurm.cpus_per_task, "CPUs per node from the target file."
    else:
        cpus = _DEFAULT_CPUS_PER_GPU * target.gpus_per_node
        cpus_comment = (f"{_DEFAULT_CPUS_PER_GPU} CPUs per {'GPU' if on_gpu else 'process'} for data loading "
                        "(set cpus_per_task in the target file to change it).")
    optional = [f"--{flag}={sbatch_value(value)}" for flag, value in
                (("partition", slurm.partition), ("account", slurm.account), ("qos", slurm.qos),
                 ("constraint", slurm.constraint), ("mem", slurm.mem)) if value]
    return render_template(
        "job.sbatch.j2",
        version=plan.tunefile_version,
        config_name=one_line(plan.config_name),
        summary=summary_lines(plan),
        job_name=sbatch_value(_job_name(plan)),
        nodes=target.nodes,
        processes_per_node=target.gpus_per_node,
        gpus_per_node=target.gpus_per_node if on_gpu else None,
        cpus_per_task=cpus,
        cpus_comment=cpus_comment,
        optional_lines=optional,
        time=sbatch_value(slurm.time),
        log_dir=slurm.log_dir,
        log_prefix=sbatch_value(slurm.log_dir.rstrip("/") + "/") if slurm.log_dir else "",
        modules=list(slurm.modules),
        setup=list(slurm.setup),
        container=slurm.container,
        deepspeed=plan.distribution.strategy == "deepspeed",
    )
