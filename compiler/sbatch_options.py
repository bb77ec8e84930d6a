"""The target file's sbatch settings beyond the basics, checked as SLURM (22.05, `man sbatch`) reads them.

``#SBATCH`` lines are read by sbatch itself, not by a shell: a value there cannot be quoted, so each one is
held to the characters SLURM takes literally, and values SLURM would refuse (a mail type, a dependency)
are refused here, with the target file's line, before anything is submitted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .errors import KeyPath, did_you_mean

Report = Callable[[KeyPath, str, str | None], None]

MAIL_TYPES = ("NONE", "BEGIN", "END", "FAIL", "REQUEUE", "ALL", "INVALID_DEPEND", "STAGE_OUT", "TIME_LIMIT",
              "TIME_LIMIT_90", "TIME_LIMIT_80", "TIME_LIMIT_50", "ARRAY_TASKS")
DEPENDENCY_TYPES = ("after", "afterany", "afterburstbuffer", "aftercorr", "afternotok", "afterok")
# type:job_id[:job_id…]; a job id may name an array task (123_4) and, for `after`, a delay in minutes (+10).
_DEPENDENCY = re.compile(r"^(singleton|(" + "|".join(DEPENDENCY_TYPES) + r")(:\d+(_\d+)?(\+\d+)?)+)$")
_NODE_LIST = re.compile(r"^[A-Za-z0-9._\[\],-]+$")  # node names and ranges: node[01-04,07],gpu12
_NAME_LIST = re.compile(r"^[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*$")  # reservation names
# name[[:type]:count], count with an optional K/M/G/T/P suffix.
_GRES = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(:[A-Za-z0-9_.-]+)?(:\d+[KkMmGgTtPp]?)?$")
_MAIL_USER = re.compile(r"^[A-Za-z0-9._%+-]+(@[A-Za-z0-9.-]+)?$")
_FLAG = re.compile(r"^--[a-z][a-z0-9-]*$")
_FLAG_VALUE = re.compile(r"^[A-Za-z0-9._:/%@+,=#\[\]-]+$")

# Flags job.sbatch sets itself (or that a setting of its own sets), with the reason an extra line may not.
RESERVED_FLAGS: dict[str, str] = {
    **dict.fromkeys(("job-name",), "set job_name in the target file"),
    **dict.fromkeys(("nodes", "ntasks", "ntasks-per-node"),
                    "tunefile runs one task per node (set nodes in the target file or --nodes)"),
    **dict.fromkeys(("gpus", "gpus-per-node", "gpus-per-task"),
                    "tunefile requests --gpus-per-node from gpus_per_node"),
    **dict.fromkeys(("cpus-per-task", "cpus-per-gpu"), "set cpus_per_task in the target file"),
    **dict.fromkeys(("output", "error", "open-mode"), "tunefile names the logs (set log_dir in the target file)"),
    **dict.fromkeys(("requeue", "no-requeue", "signal"), "tunefile's preemption handling sets it"),
    "wrap": "job.sbatch is the batch script",
    **{flag: f"set {flag.replace('-', '_')} in the target file" for flag in (
        "time", "partition", "account", "qos", "constraint", "mem", "exclusive", "reservation", "exclude",
        "dependency", "mail-type", "mail-user", "gres")},
}


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def check_sbatch_settings(data: dict[str, Any], bad: Report) -> dict[str, Any]:
    """Check the settings present in ``data``; return them as SlurmSettings fields."""
    settings: dict[str, Any] = {}
    if "exclusive" in data:
        value = data["exclusive"]
        if value is True or value is False or value in ("user", "mcs"):
            settings["exclusive"] = value
        else:
            bad(("exclusive",), f"must be true, false, user or mcs, got {value!r}", None)
    if "reservation" in data:
        if _NAME_LIST.match(str(data["reservation"])):
            settings["reservation"] = data["reservation"]
        else:
            bad(("reservation",), f"{data['reservation']!r} is not a reservation name (or a comma-separated list)",
                "use letters, digits and ._- only")
    if "exclude" in data:
        names = _as_list(data["exclude"])
        wrong = [name for name in names if not isinstance(name, str) or not _NODE_LIST.match(name)]
        if wrong or not names:
            bad(("exclude",), f"{wrong[0] if wrong else names!r} is not a SLURM node list",
                "write node names or ranges, e.g. node[01-03],node07 (or a list of them)")
        else:
            settings["exclude"] = ",".join(names)
    if "dependency" in data:
        value = data["dependency"]
        parts = re.split(r"[,?]", value)
        if "," in value and "?" in value:
            bad(("dependency",), f"{value!r} mixes , and ?", "SLURM takes one separator: , (all) or ? (any)")
        elif not all(_DEPENDENCY.match(part) for part in parts):
            wrong = next(part for part in parts if not _DEPENDENCY.match(part))
            kind = wrong.split(":")[0]
            hint = ("one of " + ", ".join((*DEPENDENCY_TYPES, "singleton")) + did_you_mean(kind, DEPENDENCY_TYPES)
                    if kind not in (*DEPENDENCY_TYPES, "singleton") else "type:job_id[:job_id…], e.g. afterok:1234")
            bad(("dependency",), f"{wrong!r} is not a SLURM dependency", hint)
        else:
            settings["dependency"] = value
    if "mail_type" in data:
        types = [str(item) for item in _as_list(data["mail_type"])]
        types = [part.strip() for item in types for part in item.split(",")]
        wrong = [item for item in types if item.upper() not in MAIL_TYPES]
        if wrong or not types:
            word = wrong[0] if wrong else ""
            bad(("mail_type",), f"{word!r} is not a SLURM mail type" + did_you_mean(word.upper(), MAIL_TYPES),
                "one or more of " + ", ".join(MAIL_TYPES))
        else:
            settings["mail_type"] = tuple(item.upper() for item in types)
    if "mail_user" in data:
        if not _MAIL_USER.match(data["mail_user"]):
            bad(("mail_user",), f"{data['mail_user']!r} is not a user name or mail address", None)
        elif "mail_type" not in data:
            bad(("mail_user",), "SLURM sends no mail without mail_type", "add mail_type, e.g. [END, FAIL]")
        else:
            settings["mail_user"] = data["mail_user"]
    if "gres" in data:
        entries = _as_list(data["gres"])
        entries = [part for entry in entries for part in str(entry).split(",")]
        wrong = next((entry for entry in entries if not _GRES.match(entry)), None)
        gpu = next((entry for entry in entries if entry.split(":")[0] == "gpu"), None)
        if wrong is not None or not entries:
            bad(("gres",), f"{wrong!r} is not a generic resource", "name[[:type]:count], e.g. nvme:1 or shard:2")
        elif gpu is not None:
            bad(("gres",), f"{gpu!r}: tunefile requests GPUs with --gpus-per-node from gpus_per_node",
                "set gpus_per_node (and constraint for the GPU kind) instead")
        else:
            settings["gres"] = ",".join(entries)
    lines = []
    for index, line in enumerate(data.get("extra_sbatch", [])):
        problem = extra_sbatch_problem(line, mem_set="mem" in data)
        if problem:
            bad(("extra_sbatch", index), problem[0], problem[1])
        else:
            lines.append(line)
    if lines:
        settings["extra_sbatch"] = tuple(lines)
    return settings


def extra_sbatch_problem(line: Any, *, mem_set: bool) -> tuple[str, str | None] | None:
    """Why one extra_sbatch line cannot go into job.sbatch (message, hint), or None."""
    if not isinstance(line, str):
        return f"must be a string, got {type(line).__name__}", None
    if "\n" in line or "\r" in line or "\0" in line:
        return "must be one line", None
    text = line.strip()
    if text.startswith("#SBATCH"):
        return "write the option only, without #SBATCH", None
    flag, equals, value = text.partition("=")
    if not _FLAG.match(flag):
        return (f"{line!r} is not one --flag or --flag=value",
                "long options only (--exclusive, not -x), without spaces, quotes or shell characters")
    if equals and not _FLAG_VALUE.match(value):
        return (f"{value!r} cannot go on an #SBATCH line",
                "use letters, digits and ._:/%@+,=#[]- only (no spaces, quotes or $)")
    name = flag[2:]
    if name in RESERVED_FLAGS:
        return f"job.sbatch sets --{name} itself", RESERVED_FLAGS[name]
    # sbatch accepts an unambiguous prefix of a long option: --out=x is --output=x.
    prefixed = sorted(reserved for reserved in RESERVED_FLAGS if reserved.startswith(name))
    if prefixed:
        return f"--{name} abbreviates --{prefixed[0]}, which job.sbatch sets itself", RESERVED_FLAGS[prefixed[0]]
    if mem_set and name in ("mem-per-cpu", "mem-per-gpu"):
        return "SLURM takes one of --mem, --mem-per-cpu and --mem-per-gpu; the target sets mem", None
    return None
