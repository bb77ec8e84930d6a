"""Containers for job.sbatch: pyxis/enroot (``srun --container-image=…``) and Apptainer/Singularity
(``srun apptainer exec …``). Pure: the target's settings and the config's paths in, mounts and words out.

Every mount binds a host path at a place inside the container. Automatic, because the job cannot run
without them, and each at the *same* path inside so that no path in config.yaml or launch.sh changes:
the bundle and the directory job.sbatch runs in (decided at run time, in the script), the Hugging Face
cache (``HF_HOME`` from the target's env) and every absolute path the config names (model, tokenizer,
adapter, datasets, prepared-data cache, output_dir). Relative paths in the config start from the
directory job.sbatch runs in, which is mounted. Anything else the user lists in ``container_mounts``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import KeyPath, Problem

if TYPE_CHECKING:
    from .spec import Spec

RUNTIMES = ("pyxis", "apptainer", "singularity")
# pyxis passes a mount's flags to enroot, joined by +: "ro", "rw" and the mount(8) options enroot accepts
# (rbind, rprivate, nosuid, x-create=dir, …). Apptainer's --bind takes only ro or rw.
_PYXIS_FLAG = re.compile(r"^[a-z][a-z0-9_-]*(=[a-z0-9_-]+)?$")
_APPTAINER_FLAGS = ("ro", "rw")


@dataclass(frozen=True)
class Mount:
    source: str
    destination: str
    flags: str = ""

    def text(self) -> str:
        """``src:dst[:flags]``: the spelling both pyxis's --container-mounts and apptainer's --bind take."""
        return f"{self.source}:{self.destination}" + (f":{self.flags}" if self.flags else "")

    def covers(self, path: str) -> bool:
        """Whether a path inside the container lies at or under this mount's destination."""
        root = self.destination.rstrip("/") or "/"
        return path == root or path.startswith(root.rstrip("/") + "/")


def path_problem(path: str) -> str | None:
    """Why a path cannot be one side of a mount, or None. Both runtimes split their mount list on , and
    each mount on :; a path is taken literally (job.sbatch quotes it), so $VAR and ~ would not expand."""
    if "$" in path or "`" in path or path.startswith("~"):
        return f"{path!r}: variables are not expanded in mounts; write the path out"
    if not path.startswith("/"):
        return f"{path!r} is not an absolute path"
    for char, why in ((",", "separates mounts"), (":", "separates a mount's parts")):
        if char in path:
            return f"{path!r} contains {char!r}, which {why} for pyxis and apptainer"
    if "\n" in path or "\r" in path or "\0" in path:
        return "must be one line"
    return None


def parse_mount(text: str, runtime: str) -> tuple[Mount | None, str | None]:
    """``src:dst[:flags]`` → a Mount, or the reason it is not one."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        return None, f"{text!r} is not src:dst or src:dst:flags"
    source, destination = parts[0], parts[1]
    for side in (source, destination):
        problem = path_problem(side)
        if problem:
            return None, problem
    flags = parts[2] if len(parts) == 3 else ""
    if len(parts) == 3:
        if runtime == "pyxis":
            bad = [flag for flag in flags.split("+") if not _PYXIS_FLAG.match(flag)]
            if bad:
                return None, f"mount flags {flags!r}: {bad[0]!r} is not an enroot mount option (join several with +)"
        elif flags not in _APPTAINER_FLAGS:
            return None, f"{runtime} mount flags are ro or rw, got {flags!r}"
    return Mount(source, destination, flags), None


def config_paths(spec: Spec) -> list[tuple[KeyPath, str, bool]]:
    """Absolute paths the config names, as (key, path, written by the run). Hub ids never start with /."""
    found: list[tuple[KeyPath, str, bool]] = []
    for key in ("base_model", "tokenizer_config", "lora_model_dir"):
        value = getattr(spec, key, None)
        if isinstance(value, str):
            found.append(((key,), value, False))
    for key in ("datasets", "test_datasets", "pretraining_dataset"):
        for index, dataset in enumerate(getattr(spec, key, None) or ()):
            found.append(((key, index, "path"), dataset.path, False))
    found.append((("dataset_prepared_path",), spec.dataset_prepared_path, True))
    found.append((("output_dir",), spec.output_dir, True))
    return [(key, path, written) for key, path, written in found if path.startswith("/")]


def config_path_problems(spec: Spec, *, has_container: bool) -> list[Problem]:
    """An absolute config path that cannot be mounted into the target's container, located at its key."""
    if not has_container:
        return []
    problems = []
    for key, path, _ in config_paths(spec):
        problem = path_problem(path)
        if problem:
            problems.append(Problem(key, f"cannot be mounted into the target's container: {problem}",
                                    hint="rename the path, or mount a folder above it in container_mounts"))
    return problems


@dataclass(frozen=True)
class PlannedMount:
    mount: Mount
    reason: str  # a comment for job.sbatch
    create: bool = False  # the run writes there: job.sbatch creates it, since a mount's source must exist


def planned_mounts(*, user_mounts: tuple[str, ...], runtime: str, env: dict[str, str],
                   paths: list[tuple[KeyPath, str, bool]]) -> list[PlannedMount]:
    """The mounts decided at compile time, in order: the HF cache, the config's absolute paths, the user's.
    A path already inside a user's mount or the HF cache is not mounted again."""
    user = [PlannedMount(mount, "container_mounts from the target file")
            for mount in (parse_mount(text, runtime)[0] for text in user_mounts) if mount is not None]
    automatic: list[PlannedMount] = []
    hf_home = env.get("HF_HOME", "")
    if hf_home and path_problem(hf_home) is None:
        automatic.append(PlannedMount(Mount(hf_home, hf_home), "HF_HOME from the target's env: the Hugging Face cache"))
    for key, path, written in paths:
        if path_problem(path) is not None:
            continue  # refused at validation (config_path_problems); plans built in code skip it
        taken = [planned.mount for planned in (*user, *automatic)]
        if any(mount.covers(path) for mount in taken):
            continue
        name = ".".join(str(part) if isinstance(part, str) else f"[{part}]" for part in key).replace(".[", "[")
        automatic.append(PlannedMount(Mount(path, path), f"{name} from the config", create=written))
    return automatic + user


_IMAGE_URI = re.compile(r"^[a-z]+://")
CONTAINER_KEYS = ("container_runtime", "container_mounts", "container_workdir", "container_env",
                  "container_mount_home")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_container_settings(data: dict, bad) -> dict:  # bad: sbatch_options.Report
    """Check a target file's container settings; return them as SlurmSettings fields."""
    settings: dict = {}
    if "container" in data and "container_image" in data:
        bad(("container",), "container and container_image are the same setting; keep one", None)
        return settings
    image_key = "container_image" if "container_image" in data else "container"
    image = data.get(image_key)
    if image is None:
        for key in CONTAINER_KEYS:
            if key in data:
                bad((key,), "needs container_image (the image to run in)", None)
        return settings
    runtime = data.get("container_runtime", "pyxis")
    if runtime not in RUNTIMES:
        bad(("container_runtime",), f"unknown container runtime {runtime!r}",
            "pyxis (srun --container-image, enroot), apptainer or singularity")
        runtime = "pyxis"
    settings["container_runtime"] = runtime
    if "\n" in image or "\r" in image or "\0" in image or not image.strip():
        bad((image_key,), "must be one non-empty line", None)
    elif image.startswith("-"):
        bad((image_key,), f"{image!r} would be read as an option", None)
    elif runtime != "pyxis" and not (image.startswith("/") or _IMAGE_URI.match(image) or image.endswith(".sif")):
        bad((image_key,), f"{runtime} runs an image file or URI, got {image!r}",
            "a .sif path, or docker://…, oras://…, library://…")
    else:
        settings["container_image"] = image
    mounts = []
    for index, text in enumerate(data.get("container_mounts", [])):
        if not isinstance(text, str):
            bad(("container_mounts", index), f"must be a string src:dst[:flags], got {type(text).__name__}", None)
            continue
        _, problem = parse_mount(text, runtime)
        if problem:
            bad(("container_mounts", index), problem, "src:dst or src:dst:ro, both absolute paths")
        else:
            mounts.append(text)
    settings["container_mounts"] = tuple(mounts)
    if "container_workdir" in data:
        workdir = data["container_workdir"]
        problem = "must be an absolute path" if not workdir.startswith("/") else None
        if problem is None and any(char in workdir for char in "\n\r\0$`"):
            problem = "must be one line, with no $ or ` (variables are not expanded)"
        if problem:
            bad(("container_workdir",), problem, None)
        else:
            settings["container_workdir"] = workdir
    names = []
    for index, name in enumerate(data.get("container_env", [])):
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            bad(("container_env", index), f"not an environment variable name: {name!r}",
                "list names only; their values come from the environment job.sbatch runs in")
        else:
            names.append(name)
    settings["container_env"] = tuple(names)
    if "container_mount_home" in data:
        settings["container_mount_home"] = data["container_mount_home"]
    hf_home = (data.get("env") or {}).get("HF_HOME")
    if isinstance(hf_home, str) and path_problem(hf_home):
        bad(("env", "HF_HOME"), f"the container mounts HF_HOME at the same path: {path_problem(hf_home)}", None)
    return settings
