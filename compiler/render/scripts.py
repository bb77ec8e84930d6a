"""launch.sh and job.sbatch: Jinja templates that only place values Python computed.

Every value from the plan reaches a template already checked: numbers, text for comment lines
(``one_line``), ``#SBATCH`` values (``sbatch_value``) or words quoted by the ``q`` filter.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from typing import Any

import jinja2

from ..plan import BatchPlan, DistributionPlan
from ..shell import one_line, sbatch_value, shell_name, shell_quote
from ..spec import Spec
from ..targets import SlurmSettings, Target

# Data loading, tokenisation and the NCCL/Gloo threads of one process want a few cores each.
DEFAULT_CPUS_PER_PROCESS = 8


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    def load(name: str) -> str:
        return resources.files("tunefile.templates").joinpath(name).read_text(encoding="utf-8")

    environment = jinja2.Environment(
        loader=jinja2.FunctionLoader(load),
        undefined=jinja2.StrictUndefined,  # a misspelt value is an error, never an empty string
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # shell text, not HTML: every value goes through the `q` filter instead
    )
    environment.filters["q"] = shell_quote
    return environment


def render_template(name: str, **values: Any) -> str:
    return _environment().get_template(name).render(**values)


def describe_strategy(distribution: DistributionPlan) -> str:
    if distribution.fsdp is not None:
        return f"FSDP{distribution.fsdp.version}" + (" with CPU offload" if distribution.fsdp.offload_params else "")
    if distribution.strategy == "deepspeed":
        return f"DeepSpeed ZeRO-{distribution.deepspeed_stage}"
    return distribution.strategy


def summary_lines(*, spec: Spec, target: Target, distribution: DistributionPlan, batch: BatchPlan,
                  precision: str, attention: str, load_in_4bit: bool) -> list[str]:
    """What runs and why the numbers, in a few comment lines a reviewer reads first."""
    if spec.adapter:
        kind = "QLoRA" if load_in_4bit else "LoRA"
        training = f"{kind} (r={spec.lora_r}, alpha={spec.lora_alpha}) on {spec.base_model}"
    else:
        training = f"Full fine-tune of {spec.base_model}"
    if target.gpu is None:
        hardware = "CPU process(es)"
    else:
        hardware = f"GPU(s): {target.gpu.name if target.gpu_known else 'unspecified kind'}"
    lines = [
        training,
        f"on {target.nodes} node(s) × {target.gpus_per_node} {hardware}, strategy {describe_strategy(distribution)}, "
        f"precision {precision}, attention {attention}.",
        f"Batch: {batch.explanation()}.",
    ]
    return [one_line(line) for line in lines]  # they become shell comments: a line break would escape them


def render_launch_sh(*, version: str, config_name: str, summary: list[str], target: Target, offline: bool,
                     tf32: bool, deepspeed: bool) -> str:
    tf32_note = (f"TF32 matmuls: {'on' if tf32 else 'off'} (tf32 in config.yaml); the runtime sets "
                 "torch.backends itself, nothing to export.")
    return render_template(
        "launch.sh.j2",
        version=version,
        config_name=one_line(config_name),
        summary=summary,
        offline=offline,
        # shellcheck flags $ or ` inside single quotes as a likely mistake; here it is intended.
        env=[(shell_name(name), value, "$" in value or "`" in value) for name, value in target.env],
        tf32_note=tf32_note if not target.on_cpu else None,
        nodes=target.nodes,
        world_size=target.world_size,
        processes_comment=f"{target.nodes} node(s) × {target.gpus_per_node} process(es) = {target.world_size} "
        "in total; accelerate starts this node's share.",
        deepspeed=deepspeed,
    )


def job_name(*, slurm: SlurmSettings, config_name: str) -> str:
    """The target's job name, else ``tunefile-`` and a slug of the config's file name."""
    if slurm.job_name:
        return slurm.job_name
    stem = config_name.rsplit(".", 1)[0]
    return "tunefile-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "job")


def cpus_per_task(target: Target) -> tuple[int, str]:
    """CPUs for the one task per node, and the comment that says where the number came from."""
    if target.slurm.cpus_per_task:
        return target.slurm.cpus_per_task, "CPUs per node from the target file."
    unit = "GPU" if target.gpu is not None else "process"
    return (DEFAULT_CPUS_PER_PROCESS * target.gpus_per_node,
            f"{DEFAULT_CPUS_PER_PROCESS} CPUs per {unit} for data loading (set cpus_per_task in the target "
            "file to change it).")


def render_job_sbatch(*, version: str, config_name: str, summary: list[str], target: Target,
                      deepspeed: bool) -> str:
    slurm = target.slurm
    cpus, cpus_comment = cpus_per_task(target)
    optional = [f"--{flag}={sbatch_value(value)}" for flag, value in
                (("partition", slurm.partition), ("account", slurm.account), ("qos", slurm.qos),
                 ("constraint", slurm.constraint), ("mem", slurm.mem)) if value]
    return render_template(
        "job.sbatch.j2",
        version=version,
        config_name=one_line(config_name),
        summary=summary,
        job_name=sbatch_value(job_name(slurm=slurm, config_name=config_name)),
        nodes=target.nodes,
        processes_per_node=target.gpus_per_node,
        gpus_per_node=target.gpus_per_node if target.gpu is not None else None,
        cpus_per_task=cpus,
        cpus_comment=cpus_comment,
        optional_lines=optional,
        time=sbatch_value(slurm.time),
        log_dir=one_line(slurm.log_dir) if slurm.log_dir else None,
        log_prefix=sbatch_value(slurm.log_dir.rstrip("/") + "/") if slurm.log_dir else "",
        modules=list(slurm.modules),
        setup=[one_line(line) for line in slurm.setup],
        container=slurm.container,
        deepspeed=deepspeed,
    )
