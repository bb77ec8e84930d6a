"""Hardware targets: the built-in GPU catalog, target files, command-line overrides and detection.

A target is plain data handed to ``resolve``. Building one from a file's parsed YAML is pure;
only ``detect_local_hardware`` reads the machine, and only when the user asks (``--target detect``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from .containers import check_container_settings
from .errors import KeyPath, Problem, did_you_mean
from .sbatch_options import check_sbatch_settings
from .shell import breaks_line


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float
    compute_capability: tuple[int, int]
    bf16: bool
    fp8: bool
    description: str

    @property
    def ampere_or_newer(self) -> bool:
        """flash-attn 2, TF32 and PyTorch's varlen attention need compute capability 8.0 or newer."""
        return self.compute_capability >= (8, 0)


GPU_CATALOG: dict[str, GpuSpec] = {
    gpu.name: gpu
    for gpu in (
        GpuSpec("h200", 141, (9, 0), True, True, "NVIDIA H200 141 GB (Hopper)"),
        GpuSpec("h100-80gb", 80, (9, 0), True, True, "NVIDIA H100 80 GB (Hopper)"),
        GpuSpec("a100-80gb", 80, (8, 0), True, False, "NVIDIA A100 80 GB (Ampere)"),
        GpuSpec("a100-40gb", 40, (8, 0), True, False, "NVIDIA A100 40 GB (Ampere)"),
        GpuSpec("l40s", 48, (8, 9), True, True, "NVIDIA L40S 48 GB (Ada)"),
        GpuSpec("l4", 24, (8, 9), True, True, "NVIDIA L4 24 GB (Ada)"),
        GpuSpec("rtx4090", 24, (8, 9), True, True, "NVIDIA GeForce RTX 4090 24 GB (Ada)"),
        GpuSpec("rtx3090", 24, (8, 6), True, False, "NVIDIA GeForce RTX 3090 24 GB (Ampere)"),
        GpuSpec("a10g", 24, (8, 6), True, False, "NVIDIA A10G 24 GB (Ampere)"),
        GpuSpec("v100-32gb", 32, (7, 0), False, False, "NVIDIA V100 32 GB (Volta)"),
        GpuSpec("t4", 16, (7, 5), False, False, "NVIDIA T4 16 GB (Turing)"),
    )
}
CPU = "cpu"
UNSPECIFIED = "unspecified"
TARGET_NAMES = (*GPU_CATALOG, CPU)


@dataclass(frozen=True)
class SlurmSettings:
    """What a target file may say about the cluster; all optional."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "24:00:00"
    cpus_per_task: int | None = None
    mem: str | None = None
    constraint: str | None = None
    job_name: str | None = None
    log_dir: str | None = None
    modules: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    # sbatch settings beyond the basics (compiler/sbatch_options.py checks what SLURM accepts).
    exclusive: bool | str = False  # True: --exclusive; "user" or "mcs": --exclusive=user|mcs
    reservation: str | None = None
    exclude: str | None = None  # a SLURM node list, e.g. node[01-03],node07
    dependency: str | None = None
    mail_type: tuple[str, ...] = ()
    mail_user: str | None = None
    gres: str | None = None
    extra_sbatch: tuple[str, ...] = ()  # each one `--flag` or `--flag=value`, checked
    # Containers (compiler/containers.py): the image (`container:` in a target file is the same setting),
    # the runtime that starts it, mounts beyond the automatic ones, the working directory inside
    # (None: the directory job.sbatch runs in), host variables that win over the image's, and $HOME.
    container_image: str | None = None
    container_runtime: str = "pyxis"  # pyxis | apptainer | singularity
    container_mounts: tuple[str, ...] = ()
    container_workdir: str | None = None
    container_env: tuple[str, ...] = ()
    container_mount_home: bool = True
    # Preemption (templates/job.sbatch.j2): SIGUSR2 this many seconds before the time limit (None: sized for the
    # model's checkpoint), and how many restarts in a row without progress the job allows itself.
    signal_lead_s: int | None = None
    max_restarts: int = 3


@dataclass(frozen=True)
class Target:
    """Where the job runs. ``gpu`` is None on the CPU; ``gpu_known`` is False when nobody said which GPU."""

    name: str
    gpu: GpuSpec | None
    gpu_known: bool
    nodes: int = 1
    gpus_per_node: int = 1  # on the CPU: processes per node
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    env: tuple[tuple[str, str], ...] = ()
    detected: str | None = None  # what --target detect found, in words

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def on_cpu(self) -> bool:
        return self.gpu is None and self.gpu_known


# The assumption made when no target names a GPU: a data-center GPU of Ampere or newer.
# Memory is unknown, so no memory estimate is checked against it.
_GENERIC_GPU = GpuSpec(UNSPECIFIED, 0, (8, 0), True, False, "a GPU of unspecified kind (assumed Ampere or newer)")


def builtin_target(name: str) -> Target:
    if name == CPU:
        return Target(name=CPU, gpu=None, gpu_known=True)
    if name == UNSPECIFIED:
        return Target(name=UNSPECIFIED, gpu=_GENERIC_GPU, gpu_known=False)
    return Target(name=name, gpu=GPU_CATALOG[name], gpu_known=True)


def default_target() -> Target:
    return builtin_target(UNSPECIFIED)


# Upper bounds of the whole-number settings: far above any cluster, low enough for every script and JSON file that
# carries them (a 400-digit node count is a typo, and would reach sbatch as one).
MAX_TARGET_INT = 1_000_000
TARGET_INT_LIMITS = {"nodes": 100_000, "gpus_per_node": 1024, "cpus_per_task": 100_000}


def _short(value: object) -> str:
    """A value for a message, cut to one readable line (a number may have thousands of digits)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}…({len(text)} characters)"


_TARGET_FILE_KEYS = {
    "gpu": str,
    "nodes": int,
    "gpus_per_node": int,
    "env": dict,
    "partition": str,
    "account": str,
    "qos": str,
    "time": str,
    "cpus_per_task": int,
    "mem": str,
    "constraint": str,
    "container": str,
    "job_name": str,
    "log_dir": str,
    "modules": list,
    "setup": list,
    "exclusive": (bool, str),
    "reservation": str,
    "exclude": (str, list),
    "dependency": str,
    "mail_type": (str, list),
    "mail_user": str,
    "gres": (str, list),
    "extra_sbatch": list,
    "container_image": str,
    "container_runtime": str,
    "container_mounts": list,
    "container_workdir": str,
    "container_env": list,
    "container_mount_home": bool,
    "signal_lead_s": int,
    "max_restarts": int,
}
_SLURM_TIME = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SBATCH_SAFE = re.compile(r"^[A-Za-z0-9._:/%@+,=#-]+$")  # #SBATCH values cannot be quoted


def target_from_file_data(data: Any, name: str, file: str) -> tuple[Target, list[Problem]]:
    """Build a Target from a parsed target file. Problems carry key paths inside that file."""
    problems: list[Problem] = []

    def bad(path: KeyPath, message: str, hint: str | None = None, at_key: bool = False) -> None:
        problems.append(Problem(path, message, hint=hint, at_key=at_key, file=file))

    if not isinstance(data, dict):
        bad((), "a target file must be a mapping of settings")
        return default_target(), problems
    for key, value in data.items():
        expected = _TARGET_FILE_KEYS.get(key)
        if expected is None:
            bad((key,), "unknown target setting" + did_you_mean(str(key), _TARGET_FILE_KEYS), at_key=True)
        elif key == "max_restarts" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            bad((key,), f"must be a whole number ≥ 0, got {value!r}")
        elif key == "max_restarts":
            pass
        elif key == "signal_lead_s" and isinstance(value, int) and not isinstance(value, bool) and value > 65535:
            bad((key,), f"must be at most 65535 (SLURM's limit for --signal), got {value!r}")
        elif expected is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            bad((key,), f"must be a whole number ≥ 1, got {_short(value)}")
        elif expected is int and value > TARGET_INT_LIMITS.get(key, MAX_TARGET_INT):
            bad((key,), f"must be at most {TARGET_INT_LIMITS.get(key, MAX_TARGET_INT):,}, got {_short(value)}")
        elif expected is not int and not isinstance(value, expected):
            kinds = " or ".join(kind.__name__ for kind in (expected if isinstance(expected, tuple) else (expected,)))
            bad((key,), f"must be a {kinds}, got {type(value).__name__}")
    if problems:
        return default_target(), problems

    gpu_name = data.get("gpu", UNSPECIFIED)
    if gpu_name not in (*TARGET_NAMES, UNSPECIFIED):
        bad(("gpu",), f"unknown GPU {gpu_name!r}" + did_you_mean(gpu_name, TARGET_NAMES),
            hint="built-in GPUs: " + ", ".join(TARGET_NAMES))
        gpu_name = UNSPECIFIED
    for key in ("partition", "account", "qos", "mem", "constraint", "job_name", "log_dir"):
        if key in data and not _SBATCH_SAFE.match(data[key]):
            bad((key,), f"{data[key]!r} cannot go on an #SBATCH line",
                hint="use letters, digits and ._:/%@+,=#- only (no spaces, quotes or $)")

    def report(path: KeyPath, message: str, hint: str | None) -> None:
        bad(path, message, hint=hint)

    cluster = {**check_sbatch_settings(data, report), **check_container_settings(data, report)}
    if "time" in data and not _SLURM_TIME.match(data["time"]):
        bad(("time",), f"not a SLURM time limit: {data['time']!r}", hint="use D-HH:MM:SS, HH:MM:SS or minutes")
    env = data.get("env", {})
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            bad(("env", key), f"not a valid environment variable name: {key!r}", at_key=True)
        elif not isinstance(value, (str, int, float)) or isinstance(value, bool):
            bad(("env", key), "environment values must be strings or numbers")
        elif breaks_line(str(value)):
            bad(("env", key), "environment values must be one line (no line break, carriage return or NUL)")
    for list_key in ("modules", "setup"):
        for index, item in enumerate(data.get(list_key, [])):
            if not isinstance(item, str) or breaks_line(item):
                bad((list_key, index), "must be a one-line string")

    slurm = SlurmSettings(
        **{key: data[key] for key in ("partition", "account", "qos", "time", "cpus_per_task", "mem",
                                      "constraint", "job_name", "log_dir", "signal_lead_s", "max_restarts")
           if key in data},
        **cluster,
        modules=tuple(data.get("modules", ())),
        setup=tuple(data.get("setup", ())),
    )
    base = builtin_target(gpu_name)
    target = replace(
        base,
        name=name,
        nodes=data.get("nodes", 1),
        gpus_per_node=data.get("gpus_per_node", 1),
        slurm=slurm,
        env=tuple(sorted((str(k), str(v)) for k, v in env.items())),
    )
    return target, problems


def apply_overrides(target: Target, *, nodes: int | None, gpus_per_node: int | None, gpu: str | None) -> Target:
    """Command-line flags win over the target; the GPU name is checked by the CLI."""
    if gpu is not None:
        chosen = builtin_target(gpu)
        target = replace(target, gpu=chosen.gpu, gpu_known=chosen.gpu_known)
    if nodes is not None:
        target = replace(target, nodes=nodes)
    if gpus_per_node is not None:
        target = replace(target, gpus_per_node=gpus_per_node)
    return target


def detect_local_hardware() -> Target:
    """Read the local GPUs with nvidia-smi (never torch: the compiler stays light).

    Only called for ``--target detect``; the result is recorded in the bundle's README.
    """
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return replace(builtin_target(CPU), name="detect", detected="no nvidia-smi on PATH: CPU only")
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return replace(builtin_target(CPU), name="detect", detected=f"nvidia-smi failed ({exc}): CPU only")
    rows = [[part.strip() for part in line.split(",")] for line in out.strip().splitlines() if line.strip()]
    if not rows:
        return replace(builtin_target(CPU), name="detect", detected="nvidia-smi listed no GPU: CPU only")
    gpu = match_gpu(rows[0][0], float(rows[0][1]) / 1024, rows[0][2])
    found = f"{len(rows)} × {rows[0][0]} ({float(rows[0][1]) / 1024:.0f} GiB, compute capability {rows[0][2]})"
    return Target(name="detect", gpu=gpu, gpu_known=True, gpus_per_node=len(rows), detected=found)


def match_gpu(product: str, memory_gib: float, compute_cap: str) -> GpuSpec:
    """Map an nvidia-smi product name to the catalog, or describe an unknown GPU from its own figures."""
    text = product.lower().replace(" ", "")
    for key, words in (("h200", ["h200"]), ("h100-80gb", ["h100"]), ("l40s", ["l40s"]), ("l4", ["nvidial4"]),
                       ("rtx4090", ["4090"]), ("rtx3090", ["3090"]), ("a10g", ["a10g"]), ("t4", ["teslat4"]),
                       ("v100-32gb", ["v100"])):
        if any(word in text for word in words):
            return replace(GPU_CATALOG[key], memory_gib=round(memory_gib))
    if "a100" in text:
        return GPU_CATALOG["a100-80gb" if memory_gib > 50 else "a100-40gb"]
    major, _, minor = compute_cap.partition(".")
    capability = (int(major or 0), int(minor or 0))
    return GpuSpec(product, round(memory_gib), capability, capability >= (8, 0), capability >= (8, 9), product)
