"""Time to the first step (issue 13, target 5): the phases add up to the whole, the clock starts when launch.sh
started, and a run through the bundle logs one line and records the figures in train_summary.json."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from runtime_bundles import build_tiny_model, compile_bundle, launch, summary, workspace, write_config
from tunefile.runtime import startup_clock
from tunefile.runtime.startup_clock import LAUNCH_STARTED, StartupClock, process_age_s


def test_the_process_age_is_read_from_proc() -> None:
    age = process_age_s()
    assert age is not None and 0 < age < 24 * 3600  # this pytest process started a while ago, not in the future


def test_the_clock_counts_from_when_launch_sh_started(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LAUNCH_STARTED, f"{time.time() - 5.0:.6f}")
    monkeypatch.setattr(startup_clock, "process_age_s", lambda: None)  # the launcher's share cannot be told apart
    clock = StartupClock()
    clock.mark_imports()
    line = clock.finish()
    record = clock.record()
    assert clock.since == "launch.sh started" and 5.0 <= record["seconds_to_first_step"] < 6.0
    assert line.startswith("first step 5.") and "after launch.sh started: launcher and imports 5." in line
    assert [name for name, _ in record["phases_s"]] == ["launcher and imports", "the step"]
    assert sum(seconds for _, seconds in record["phases_s"]) == pytest.approx(record["seconds_to_first_step"],
                                                                              abs=0.01)


def test_the_launchers_share_ends_when_this_process_started(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LAUNCH_STARTED, f"{time.time() - 5.0:.6f}")
    monkeypatch.setattr(startup_clock, "process_age_s", lambda: 2.0)  # this rank started 3 s after launch.sh
    clock = StartupClock()
    clock.mark_imports()
    clock.finish()
    phases = dict(clock.record()["phases_s"])
    assert list(phases) == ["launcher", "imports", "the step"]
    assert phases["launcher"] == pytest.approx(3.0, abs=0.05) and phases["imports"] == pytest.approx(2.0, abs=0.05)


@pytest.mark.parametrize("value", ["not a time", "1e30", "-5"])
def test_a_foreign_launch_time_falls_back_to_the_process_start(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(LAUNCH_STARTED, value)  # macOS date prints "%N" literally; a value from another day
    assert StartupClock().since == "the process started"


def test_without_proc_the_clock_starts_at_set_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LAUNCH_STARTED, raising=False)
    monkeypatch.setattr(startup_clock, "process_age_s", lambda: None)
    clock = StartupClock()
    assert clock.since == "set-up began" and clock.record() == {}  # nothing recorded before the first step
    clock.finish()
    assert clock.record()["seconds_to_first_step"] < 1.0
    clock.mark("later")  # after the first step, marks change nothing
    assert [name for name, _ in clock.record()["phases_s"]] == ["the step"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-model")


def test_a_run_logs_its_first_step_and_records_each_phase(tmp_path: Path, tiny_model: Path) -> None:
    root = workspace(tmp_path, tiny_model)
    result = launch(compile_bundle(write_config(root, adapter="lora", lora_target_linear=True, max_steps=2)))
    lines = [line for line in result.stderr.splitlines() if "first step" in line]
    assert len(lines) == 1, result.stderr[-3000:]
    assert re.search(r"first step \d+\.\d s after launch\.sh started: launcher \d+\.\d, imports \d+\.\d, accelerator "
                     r"\d+\.\d, tokenizer and data \d+\.\d, model \d+\.\d, wrapping and resume \d+\.\d, the step "
                     r"\d+\.\d$", lines[0]), lines[0]
    startup = summary(root / "out")["startup"]
    assert startup["measured_from"] == "launch.sh started"
    assert [name for name, _ in startup["phases_s"]] == ["launcher", "imports", "accelerator", "tokenizer and data",
                                                         "model", "wrapping and resume", "the step"]
    assert sum(seconds for _, seconds in startup["phases_s"]) == pytest.approx(startup["seconds_to_first_step"],
                                                                               abs=0.01)
    assert 0 < startup["seconds_to_first_step"] < 300
