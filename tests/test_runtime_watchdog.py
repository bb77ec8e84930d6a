"""The loss and gradient watchdog: the verdicts (pure), and a run through a compiled bundle that it stops
with one line, exit code 3 and nothing saved."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from runtime_bundles import compile_bundle, launch, metrics, workspace, write_config
from tunefile.runtime.errors import EXIT_WATCHDOG
from tunefile.runtime.watchdog import Watchdog
from tunefile.schemas.run_plan import WatchdogPlan

# --- verdicts --------------------------------------------------------------------------------------------------


def test_a_non_finite_loss_or_gradient_norm_stops_at_once() -> None:
    watchdog = Watchdog(WatchdogPlan(loss_threshold=None, loss_patience=3))
    assert watchdog.check(1, 2.5, 0.7) is None
    assert "the loss is nan" in watchdog.check(2, math.nan, 0.7).reason
    assert "the gradient norm is inf" in watchdog.check(3, 2.5, math.inf).reason
    assert "the loss is inf" in watchdog.check(4, math.inf, None).reason  # DeepSpeed: no norm before its step


def test_the_threshold_needs_patience_steps_in_a_row() -> None:
    watchdog = Watchdog(WatchdogPlan(loss_threshold=5.0, loss_patience=3))
    assert [watchdog.check(step, loss, 1.0) for step, loss in enumerate([6, 7, 4, 6, 6], start=1)] == [None] * 5
    alarm = watchdog.check(6, 9.0, 1.0)
    assert alarm is not None and alarm.step == 6
    assert "stayed above loss_watchdog_threshold 5 for 3 steps in a row" in alarm.reason


def test_the_stop_line_names_step_and_rows_and_has_its_own_exit_code() -> None:
    alarm = Watchdog(WatchdogPlan(loss_threshold=None, loss_patience=3)).check(49, math.nan, math.inf)
    stop = alarm.stop("data/x.jsonl rows 3, 17")
    assert stop.exit_code == EXIT_WATCHDOG == 3
    assert str(stop).startswith("watchdog: step 49: the loss is nan") and "data/x.jsonl rows 3, 17" in str(stop)
    assert "\n" not in str(stop)


# --- through a bundle ------------------------------------------------------------------------------------------


def assert_stopped_by_the_watchdog(run: object, out: Path) -> str:
    text = run.stdout + run.stderr
    lines = [line for line in text.splitlines() if "tunefile runtime: watchdog: step" in line]
    assert run.returncode == EXIT_WATCHDOG, f"exit {run.returncode}:\n{text[-3000:]}"
    assert len(lines) == 1, text[-3000:]
    assert "Traceback" not in text
    assert not (out / "adapter_model.safetensors").exists() and not list(out.glob("checkpoint-*"))
    return lines[0]


def test_an_absurd_learning_rate_is_stopped_by_the_loss_watchdog(tmp_path: Path, tiny_model: Path) -> None:
    """learning_rate 30 on the tiny model: the loss leaps from 6.9 to hundreds (in fp32 it stays finite),
    and Axolotl's loss watchdog (threshold about three times the first loss, patience 3) stops the run."""
    root = workspace(tmp_path, tiny_model)
    bundle = compile_bundle(write_config(root, adapter="lora", lora_target_linear=True,
                                         lora_modules_to_save=["lm_head"], learning_rate=30.0,
                                         optimizer="adamw_torch", lr_scheduler="constant",
                                         loss_watchdog_threshold=20.0, max_steps=30, save_steps=1000))
    line = assert_stopped_by_the_watchdog(launch(bundle, check=False), root / "out")
    assert "stayed above loss_watchdog_threshold 20 for 3 steps in a row (loss_watchdog_patience 3)" in line, line
    assert "data/alpaca.jsonl row" in line  # the rows of the step's micro-batches, by file


def test_a_non_finite_loss_is_stopped_before_it_is_applied(tmp_path: Path, tiny_model: Path) -> None:
    """A base model with one corrupt (infinite) weight: the first loss is NaN, and the watchdog stops the run
    at step 1, before the optimizer, with nothing saved and no NaN in the metrics."""
    from safetensors.torch import load_file, save_file

    root = workspace(tmp_path, tiny_model)
    corrupt = root / "corrupt-model"
    shutil.copytree(tiny_model, corrupt)
    weights = load_file(str(corrupt / "model.safetensors"))
    name = next(key for key in sorted(weights) if key.endswith("mlp.down_proj.weight"))
    weights[name][0, 0] = math.inf
    save_file(weights, str(corrupt / "model.safetensors"), metadata={"format": "pt"})
    bundle = compile_bundle(write_config(root, base_model="corrupt-model", adapter="lora", lora_target_linear=True,
                                         max_steps=5))
    line = assert_stopped_by_the_watchdog(launch(bundle, check=False), root / "out")
    assert line.startswith("tunefile runtime: watchdog: step 1: the loss is nan"), line
    assert "data/alpaca.jsonl row" in line
    assert not [r for r in metrics(root / "out") if "loss" in r]


def test_loss_watchdog_patience_counts_steps_in_a_row(tmp_path: Path, tiny_model: Path) -> None:
    root = workspace(tmp_path, tiny_model)
    bundle = compile_bundle(write_config(root, adapter="lora", loss_watchdog_threshold=0.5, loss_watchdog_patience=2,
                                         max_steps=10))
    line = assert_stopped_by_the_watchdog(launch(bundle, check=False), root / "out")
    assert "watchdog: step 2: the loss" in line and "for 2 steps in a row (loss_watchdog_patience 2)" in line


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from runtime_bundles import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-model")
