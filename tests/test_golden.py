"""Golden bundles: every case in tests/golden_configs/ compiles to exactly golden/<case>/.

After an intended change: `pytest tests/test_golden.py --update-golden` (or `make golden`), then
review the diff of golden/ like any other code.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import GOLDEN, GOLDEN_CONFIGS, require_tool
from tunefile.compiler.pipeline import TargetOptions
from tunefile.compiler.review import check_golden, find_configs

CASES = [path.stem for path in find_configs(GOLDEN_CONFIGS)]
UPDATE_COMMAND = "pytest tests/test_golden.py --update-golden"


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 12


def test_golden_bundles_match(request: pytest.FixtureRequest) -> None:
    update = request.config.getoption("--update-golden")
    results = check_golden(GOLDEN_CONFIGS, GOLDEN, TargetOptions(), update=update)
    failures = [result for result in results if result.status not in ("same", "updated")]
    report = "\n".join(f"{result.status}: {result.case}\n{result.diff}" for result in failures)
    assert not failures, f"golden bundles differ:\n{report}\nIf the change is intended, run: {UPDATE_COMMAND}"
    stale = sorted({path.name for path in GOLDEN.iterdir() if path.is_dir()} - set(CASES))
    assert not stale, f"golden/ has bundles without a config: {stale}"


GOLDEN_SCRIPTS = sorted(GOLDEN.glob("*/launch.sh")) + sorted(GOLDEN.glob("*/job.sbatch"))


@pytest.mark.parametrize("script", GOLDEN_SCRIPTS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_golden_scripts_pass_shellcheck(script: Path) -> None:
    shellcheck = require_tool("shellcheck")
    result = subprocess.run([shellcheck, "--shell=bash", "--severity=style", str(script)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_golden_case_has_scripts() -> None:
    assert len(GOLDEN_SCRIPTS) == 2 * len(CASES)
