"""Helpers for tests that submit jobs to the real SLURM cluster `.ci/slurm-up.sh` starts (two nodes on this host,
partition `debug`). Without SLURM a test skips; in CI (CI=true) it fails instead, so it is never silently skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

PARTITION = "debug"
NODES = 2
CLUSTER_WAIT_S = 60  # nodes still completing an earlier job (another test's) come back idle within seconds
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}


def unavailable(message: str) -> None:
    """Skip on a laptop; fail in CI (CI=true), where a skipped SLURM test would hide a broken job.sbatch."""
    message += " (run `.ci/slurm-up.sh` as root to start a two-node SLURM on this host)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """ENV (default: the caller's environment) without SLURM's job variables (pytest may itself run inside a job),
    tunefile's own (TUNEFILE_BUNDLE_DIR would override where job.sbatch looks for its bundle) or a rendezvous."""
    return {key: value for key, value in (os.environ if env is None else env).items()
            if not key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "TUNEFILE_"))
            and key not in ("MASTER_ADDR", "MASTER_PORT")}


def idle_nodes() -> list[str]:
    result = subprocess.run(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %t"], capture_output=True,
                            text=True, timeout=30, env=clean_env())
    if result.returncode != 0:
        return []
    return sorted({line.split()[0] for line in result.stdout.splitlines()
                   if len(line.split()) == 2 and line.split()[1] == "idle"})


def require_cluster() -> None:
    """SLURM's tools on PATH and NODES nodes of PARTITION usable (idle, or busy with another test's job)."""
    for tool in ("sbatch", "sinfo", "scontrol", "scancel", "squeue"):
        if shutil.which(tool) is None:
            unavailable(f"SLURM's `{tool}` is not on PATH")
    deadline = time.monotonic() + CLUSTER_WAIT_S
    while len(idle := idle_nodes()) < NODES:
        if time.monotonic() > deadline:
            info = subprocess.run(["sinfo", "-N", "-l"], capture_output=True, text=True, timeout=30)
            unavailable(f"SLURM partition {PARTITION!r} does not have {NODES} idle nodes (idle: {idle}):\n"
                        f"{info.stdout}{info.stderr}")
        time.sleep(0.5)


def submit(script: Path, *, cwd: Path, env: dict[str, str], extra_env: dict[str, str] | None = None,
           args: tuple[str, ...] = ()) -> int:
    """sbatch SCRIPT from CWD with ENV made clean (clean_env) plus EXTRA_ENV; the job id."""
    result = subprocess.run(["sbatch", "--parsable", *args, str(script)], cwd=cwd,
                            env=clean_env(env) | (extra_env or {}),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"sbatch {script} failed:\n{result.stdout}\n{result.stderr}"
    return int(result.stdout.strip().split(";")[0])


def scontrol(*args: str) -> str:
    result = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30, env=clean_env())
    assert result.returncode == 0, f"scontrol {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


def job_fields(job_id: int) -> dict[str, str]:
    result = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                            timeout=30, env=clean_env())
    if result.returncode != 0:
        return {}
    # One line of Key=Value pairs; values have no spaces except in a few fields we do not read.
    return dict(re.findall(r"(\w+)=(\S*)", result.stdout))


def wait_for(job_id: int, condition: Callable[[dict[str, str]], bool], *, timeout: float, what: str,
             context: Callable[[], str] = lambda: "") -> dict[str, str]:
    """Poll the job's fields until CONDITION holds; on timeout cancel the job and fail naming WHAT."""
    deadline = time.monotonic() + timeout
    while True:
        fields = job_fields(job_id)
        if condition(fields):
            return fields
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=30)
            pytest.fail(f"job {job_id}: not {what} within {timeout:g} s: {fields}{context()}")
        time.sleep(0.25)


def finished(fields: dict[str, str]) -> bool:
    return fields.get("JobState") in TERMINAL_STATES


def release_requeued(job_id: int, *, timeout: float, context: Callable[[], str] = lambda: "") -> None:
    """Wait until the job is requeued (pending with Restarts ≥ 1), then start it now. SLURM holds a requeued job for
    the credential lifetime (cred_expire, 120 s) because slurmd refuses a credential issued no later than the
    second it revoked the job's old one ("Job credential revoked"): with every daemon on this one host's clock,
    a wait into the next second is enough, and the two minutes would test nothing of the bundle."""
    wait_for(job_id, lambda f: f.get("JobState") == "PENDING" and int(f.get("Restarts", "0")) >= 1,
             timeout=timeout, what="requeued", context=context)
    time.sleep(2)
    scontrol("update", f"JobId={job_id}", "StartTime=now")


def logs(fields: dict[str, str]) -> str:
    """The job's stdout and stderr files, for failure messages."""
    text = ""
    for stream in ("StdOut", "StdErr"):
        path = fields.get(stream, "")
        body = Path(path).read_text(encoding="utf-8", errors="replace") if path and Path(path).is_file() \
            else "(missing)"
        text += f"\n--- job {stream} ({path}):\n{body[-8000:]}"
    return text
