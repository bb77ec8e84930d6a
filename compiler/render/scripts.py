"""launch.sh and job.sbatch: Jinja templates that only place values Python computed.

Every value from the plan reaches a template already checked: numbers, text for comment lines
(``one_line``), ``#SBATCH`` values (``sbatch_value``) or words quoted by the ``q`` filter.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from importlib import resources
from typing import Any

import jinja2

from ..containers import RUNTIMES, parse_mount, planned_mounts
from ..errors import KeyPath
from ..plan import BatchPlan, DistributionPlan, ModelInfo
from ..sbatch_options import extra_sbatch_problem
from ..shell import UnsafeValueError, one_line, sbatch_value, shell_name, shell_quote
from ..spec import Spec
from ..targets import SlurmSettings, Target

# Data loading, tokenisation and the NCCL/Gloo threads of one process want a few cores each.
DEFAULT_CPUS_PER_PROCESS = 8

# The default lead of SLURM's SIGUSR2 before the time limit (signal_lead_s): the step in flight, then a
# checkpoint written at an assumed speed, with a margin. See signal_lead.
STEP_IN_FLIGHT_S = 60  # a long optimizer step; SLURM itself may signal up to 60 s early, never late
CHECKPOINT_BYTES_PER_TRAINED_PARAMETER = 12  # fp32 weights + Adam's two fp32 moments
FROZEN_BYTES_PER_PARAMETER = 2  # bf16 base weights, which only FSDP's sharded checkpoint also holds
WRITE_BYTES_PER_S = 2**30  # per writing rank, to a shared file system: modest on purpose
UNKNOWN_MODEL_LEAD_S = 300


def shell_path(path: str) -> str:
    """A path as one shell word, with a leading ~/ kept as the home directory of whoever runs the script (the
    runtime expands it the same way)."""
    if path.startswith("~/"):
        return '"$HOME"/' + shell_quote(path[2:])
    return shell_quote(path)


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
    environment.filters["q_path"] = shell_path
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
                     tf32: bool, deepspeed: bool, runtime_archive: str | None = None) -> str:
    """RUNTIME_ARCHIVE: the file name of the runtime the bundle carries; None: the installed tunefile runs."""
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
        runtime_archive=runtime_archive,
        # Only a CPU target: on GPUs accelerate uses OMP_NUM_THREADS or 1 and says nothing.
        cpu_threads=target.gpus_per_node if target.on_cpu else None,
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


def sbatch_option_lines(slurm: SlurmSettings) -> list[str]:
    """The target's optional #SBATCH options, in a fixed order (extra_sbatch lines come last, as written)."""
    exclusive = "--exclusive" + (f"={sbatch_value(slurm.exclusive)}" if isinstance(slurm.exclusive, str) else "")
    lines = [f"--{flag}={value}" for flag, value in
             (("partition", slurm.partition), ("account", slurm.account), ("qos", slurm.qos),
              ("constraint", slurm.constraint), ("mem", slurm.mem), ("reservation", slurm.reservation),
              ("exclude", slurm.exclude), ("gres", slurm.gres), ("dependency", slurm.dependency),
              ("mail-type", ",".join(slurm.mail_type)), ("mail-user", slurm.mail_user)) if value]
    lines = [sbatch_list_value(line) if line.startswith(("--exclude=", "--dependency=")) else sbatch_value(line)
             for line in lines]
    return lines + ([exclusive] if slurm.exclusive else [])


def sbatch_list_value(value: str) -> str:
    """A node list or dependency: sbatch_value's characters, plus the [ ] of node ranges and the ? of
    "any of" dependencies (literal on an #SBATCH line, which no shell reads)."""
    sbatch_value(value.replace("[", "").replace("]", "").replace("?", ","))
    return value


def extra_sbatch_lines(slurm: SlurmSettings) -> list[str]:
    """The target's extra_sbatch lines, each checked again: one --flag[=value], nothing a shell could read."""
    for line in slurm.extra_sbatch:
        problem = extra_sbatch_problem(line, mem_set=slurm.mem is not None)
        if problem:
            raise UnsafeValueError(f"extra_sbatch {line!r}: {problem[0]}")
    return [line.strip() for line in slurm.extra_sbatch]


def signal_lead(*, slurm: SlurmSettings, model: ModelInfo | None, strategy: str,
                world_size: int) -> tuple[int, list[str]]:
    """Seconds between SLURM's SIGUSR2 and the time limit, and the comment lines that explain the number.

    The ranks need the step in flight plus the checkpoint write: trained parameters × 12 bytes (fp32 weights and
    Adam's two moments; FSDP's sharded checkpoint also holds the frozen weights, 2 bytes each), written by every
    rank at once when the strategy shards (FSDP, DeepSpeed), by rank 0 alone otherwise, at 1 GiB/s per writer;
    twice that write time for a slow file system, rounded up to whole minutes, at least two minutes."""
    if slurm.signal_lead_s is not None:
        return slurm.signal_lead_s, ["signal_lead_s from the target file."]
    if model is None or model.parameters is None or model.trainable_parameters is None:
        return UNKNOWN_MODEL_LEAD_S, [f"The model's size is unknown: {UNKNOWN_MODEL_LEAD_S} s (set signal_lead_s in "
                                      "the target file to change it)."]
    frozen = model.parameters - model.trainable_parameters if strategy == "fsdp" else 0
    size = model.trainable_parameters * CHECKPOINT_BYTES_PER_TRAINED_PARAMETER + frozen * FROZEN_BYTES_PER_PARAMETER
    writers = world_size if strategy in ("fsdp", "deepspeed") else 1
    write_s = size / writers / WRITE_BYTES_PER_S
    lead = max(120, math.ceil((STEP_IN_FLIGHT_S + 2 * write_s) / 60) * 60)
    return lead, [one_line(
        f"Lead: {STEP_IN_FLIGHT_S} s for the step in flight + 2 × {size / 2**30:,.1f} GiB checkpoint "
        f"({model.trainable_parameters:,} trained parameters × {CHECKPOINT_BYTES_PER_TRAINED_PARAMETER} bytes"
        + (f" + {frozen:,} frozen × {FROZEN_BYTES_PER_PARAMETER}" if frozen else "")
        + f") / ({writers} writer(s) × 1 GiB/s), rounded up to whole minutes, at least 120 s = {lead} s"
        " (signal_lead_s in the target file overrides it).")]


def render_job_sbatch(*, version: str, config_name: str, summary: list[str], target: Target,
                      deepspeed: bool, config_paths: list[tuple[KeyPath, str, bool]] | None = None,
                      model: ModelInfo | None = None, strategy: str = "single", output_dir: str = "./model-out") -> str:
    """CONFIG_PATHS: the config's absolute paths (containers.config_paths), mounted into a container.
    MODEL and STRATEGY size the checkpoint the signal's lead must leave time for; OUTPUT_DIR holds it."""
    slurm = target.slurm
    lead, lead_comment = signal_lead(slurm=slurm, model=model, strategy=strategy, world_size=target.world_size)
    cpus, cpus_comment = cpus_per_task(target)
    optional = sbatch_option_lines(slurm)
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
        extra_lines=extra_sbatch_lines(slurm),
        container=container_invocation(target, config_paths or []),
        deepspeed=deepspeed,
        signal_lead_s=lead,
        signal_lead_comment=lead_comment,
        max_restarts=slurm.max_restarts,
        output_dir=output_dir,
    )


def container_invocation(target: Target, config_paths: list[tuple[KeyPath, str, bool]]) -> dict[str, Any] | None:
    """What job.sbatch needs to run launch.sh in the target's container: shell lines that build the mount
    list, and the words between `srun …` and `bash -c …`, every value quoted. None without a container."""
    slurm = target.slurm
    if not slurm.container_image:
        return None
    runtime = slurm.container_runtime
    if runtime not in RUNTIMES:
        raise UnsafeValueError(f"unknown container runtime {runtime!r}")
    mounts = planned_mounts(user_mounts=slurm.container_mounts, runtime=runtime, env=dict(target.env),
                            paths=config_paths)
    for text in slurm.container_mounts:
        if parse_mount(text, runtime)[1]:
            raise UnsafeValueError(f"container mount {text!r}: {parse_mount(text, runtime)[1]}")
    workdir = shell_quote(slurm.container_workdir) if slurm.container_workdir else '"$PWD"'
    if runtime == "pyxis":
        words = [f"--container-image={shell_quote(slurm.container_image)}",
                 '--container-mounts="$CONTAINER_MOUNTS"', f"--container-workdir={workdir}"]
        if not slurm.container_mount_home:
            words.append("--no-container-mount-home")
        if slurm.container_env:
            words.append("--container-env=" + ",".join(shell_name(name) for name in slurm.container_env))
        lines = words
        env_lines: list[str] = []
    else:
        # --nv makes the host's NVIDIA driver and GPUs visible inside; a CPU target has none to pass.
        words = [runtime, "exec", *(["--nv"] if target.gpu is not None else []), '--bind "$CONTAINER_MOUNTS"',
                 f"--pwd {workdir}", *([] if slurm.container_mount_home else ["--no-home"]),
                 shell_quote(slurm.container_image)]
        lines = [" ".join(words)]
        prefix = "APPTAINERENV_" if runtime == "apptainer" else "SINGULARITYENV_"
        env_lines = [f'if [ -n "${{{shell_name(name)}+set}}" ]; then export {prefix}{name}="${name}"; fi'
                     for name in slurm.container_env]
    return {
        "runtime": runtime,
        "image": one_line(slurm.container_image),
        "mounts": [(one_line(planned.reason), shell_quote(planned.mount.text())) for planned in mounts],
        "create": [shell_quote(planned.mount.source) for planned in mounts if planned.create],
        "workdir": one_line(slurm.container_workdir) if slurm.container_workdir else None,
        "env_lines": env_lines,
        "env_names": ", ".join(slurm.container_env),
        "lines": lines,
    }
