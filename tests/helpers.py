"""Helpers shared by the tests."""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tunefile.compiler.cli import cli

REPO = Path(__file__).resolve().parent.parent
GOLDEN_CONFIGS = REPO / "tests" / "golden_configs"
GOLDEN = REPO / "golden"


def require_tool(name: str) -> str:
    """The path of a real tool a test needs; a skip on a laptop, a failure in CI (CI=true)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (.ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL = """\
base_model: meta-llama/Llama-3.1-8B
datasets:
  - path: data/alpaca.jsonl
    type: alpaca
"""


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run `tunefile ARGS` in-process: (exit code, stdout, stderr)."""
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def require_module(name: str, install: str) -> Any:
    """An importable Python package a test needs (``install`` says how to get it); like require_tool, a skip on
    a laptop and a failure in CI (CI=true), where `make install` must have installed it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        message = f"the Python package {name} is not installed ({install})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message, allow_module_level=True)  # also from a test module's top level


def run_process_tree(command: list[str], *, timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None,
                     input: str | None = None) -> subprocess.CompletedProcess[str]:
    """subprocess.run(COMMAND, capture_output=True, text=True, timeout=TIMEOUT) for a command that starts
    processes of its own; on timeout everything it started is killed and the test fails with the output's tail.

    subprocess.run kills only its direct child on timeout. `bash launch.sh` execs `accelerate launch`, and
    torch elastic starts every rank with start_new_session=True: the ranks are in neither the child's process
    group nor its session, so they outlived the timeout, kept CPU and ports, and held the output pipes open
    (which blocks a reader that waits for EOF, such as a CI step). The output goes to temporary files rather
    than pipes for the same reason: reading a file never waits for a process that escaped."""
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr, tempfile.TemporaryFile() as stdin:
        if input is not None:
            stdin.write(input.encode())
            stdin.seek(0)
        child = subprocess.Popen(command, cwd=cwd, env=env, stdin=stdin if input is not None else None,
                                 stdout=stdout, stderr=stderr, start_new_session=True)
        try:
            returncode: int | None = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        if returncode is None:
            killed = kill_process_tree(child.pid)
            child.wait()
            pytest.fail(f"{' '.join(command)} did not finish in {timeout:g} s; killed it and the {killed - 1} "
                        f"processes it started (ranks in sessions of their own included).\n"
                        f"--- stdout (tail) ---\n{_read_text(stdout)[-4000:]}\n"
                        f"--- stderr (tail) ---\n{_read_text(stderr)[-6000:]}")
        return subprocess.CompletedProcess(command, returncode, _read_text(stdout), _read_text(stderr))


def _read_text(file: Any) -> str:
    """What a process wrote, decoded with the universal newlines of subprocess's text=True."""
    file.seek(0)
    return file.read().decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def kill_process_tree(root: int) -> int:
    """SIGKILL ROOT, every process descended from it and the process groups they lead; the number killed.

    Each process is stopped (SIGSTOP) before its children are listed, so none can start another behind the
    walk, and none is killed before the walk ends: a parent's death re-parents its children to init, after
    which nothing leads from ROOT to them. Linux's /proc gives the parent links; elsewhere only ROOT's process
    group is killed."""
    if not Path("/proc").is_dir():
        _kill_group(root)
        return 1
    stopped: list[int] = []
    groups: set[int] = set()
    pending = [root]
    while pending:
        pid = pending.pop()
        try:
            groups.add(os.getpgid(pid))
            os.kill(pid, signal.SIGSTOP)
        except (ProcessLookupError, PermissionError):
            continue
        stopped.append(pid)
        pending += _children(pid)
    for group in groups - {os.getpgrp()}:
        _kill_group(group)
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(stopped)


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _children(parent: int) -> list[int]:
    """The processes whose parent is PARENT, read from /proc/*/stat (field 4; the command name in field 2
    may hold spaces and parentheses, hence the split after its last ')')."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children
