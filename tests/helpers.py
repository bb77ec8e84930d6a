"""Helpers shared by the tests."""

from __future__ import annotations

import importlib
import os
import shutil
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
