"""LISA and ReLoRA through compiled bundles: Axolotl's keys (lisa_*, relora and jagged_restart_*) compiled with
the real CLI, then `bash bundle/launch.sh` on the tiny model, as a user runs them. Each feature trains once
uninterrupted (a module fixture) and once killed mid-way and resumed, which must end with the same weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from runtime_bundles import (
    BASE,
    build_tiny_model,
    compile_bundle,
    launch,
    metrics,
    safetensors,
    train_losses,
    workspace,
    write_config,
)
from tunefile.runtime import checkpoint
from tunefile.runtime.lisa import draw_layers

LISA = {"max_steps": 20, "save_steps": 5, "lisa_n_layers": 1, "lisa_step_interval": 5}
RELORA = {"max_steps": 15, "save_steps": 5, "adapter": "lora", "lora_target_linear": True, "relora": True,
          "jagged_restart_steps": 5, "jagged_restart_warmup_steps": 2}
TINY_LAYERS = 2  # runtime/tiny_model.py


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-model")


def train(root: Path, model: Path, config: dict[str, Any], *, fault_after: int | None = None) -> str:
    """Compile and launch in ``root``; with ``fault_after``, the first launch dies after that step and a second
    one resumes. Returns the (last) launch's log."""
    bundle = compile_bundle(write_config(workspace(root, model), **config))
    if fault_after is not None:
        assert launch(bundle, env={"TUNEFILE_FAULT_AFTER_STEP": str(fault_after)}, check=False).returncode != 0
    result = launch(bundle)
    return result.stdout + result.stderr


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = safetensors(a / "model.safetensors"), safetensors(b / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def train_records(output_dir: Path) -> list[dict[str, Any]]:
    return [record for record in metrics(output_dir) if "loss" in record]


# --- LISA ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lisa_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    root = tmp_path_factory.mktemp("lisa")
    train(root, tiny_model, LISA)
    return root


def test_a_lisa_bundle_trains_one_drawn_layer_at_a_time(lisa_run: Path) -> None:
    plan = yaml.safe_load((lisa_run / "bundle" / "config.yaml").read_text(encoding="utf-8"))
    assert plan["model"]["lisa"] == {"n_layers": 1, "step_interval": 5, "layers_attribute": "model.layers"}
    losses = train_losses(lisa_run / "out")
    assert len(losses) == 20 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    # Every logged step names the layers that trained it: the draw of its window of 5 steps.
    for record in train_records(lisa_run / "out"):
        window = (record["step"] - 1) // 5
        expected = draw_layers(seed=BASE["seed"], window=window, total_layers=TINY_LAYERS, n_layers=1)
        assert record["lisa_active_layers"] == list(expected), record["step"]


def test_a_lisa_run_killed_mid_window_resumes_to_the_uninterrupted_weights(tmp_path: Path, tiny_model: Path,
                                                                           lisa_run: Path) -> None:
    """Killed after step 12, resumed from the checkpoint of step 10: steps 11-20 must train the layers the unbroken
    run trained (the draw is recomputed from the step), so the final weights are equal."""
    train(tmp_path, tiny_model, LISA, fault_after=12)
    assert_same_weights(lisa_run / "out", tmp_path / "out")
    assert [r["lisa_active_layers"] for r in train_records(tmp_path / "out")] == \
        [r["lisa_active_layers"] for r in train_records(lisa_run / "out")]


# --- ReLoRA -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def relora_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("relora")
    return root, train(root, tiny_model, RELORA)


def test_a_relora_bundle_restarts_and_saves_the_merged_model(relora_run: tuple[Path, str]) -> None:
    from transformers import AutoModelForCausalLM

    root, log = relora_run
    plan = yaml.safe_load((root / "bundle" / "config.yaml").read_text(encoding="utf-8"))
    assert plan["model"]["relora"] == {"restart_steps": 5, "warmup_steps": 2, "anneal_steps": 1,
                                       "min_lr_scale": 0.001, "prune_ratio": 0.9, "prune_method": "magnitude",
                                       "cpu_offload": False}
    records = train_records(root / "out")
    assert len(records) == 15 and all(math.isfinite(r["loss"]) for r in records)
    # Restarts after steps 5 and 10 (not after the last), logged with every step as Axolotl's num_lora_restarts.
    assert [r["relora_restarts"] for r in records] == [0] * 4 + [1] * 5 + [2] * 6
    assert "restart 1 after step 5" in log and "restart 2 after step 10" in log
    # The rate logged at a step is the next step's: after a restart the floor (0.001) of the plan's constant rate,
    # then half-way up the 2-step warm-up, then the full rate.
    lr, floor = {r["step"]: r["lr"] / BASE["learning_rate"] for r in records}, 0.001
    assert [lr[5], lr[6], lr[7]] == pytest.approx([floor, 0.5 * (1 - floor) + floor, 1.0])
    assert (root / "out" / "checkpoint-5" / "custom_checkpoint_0.pkl").is_file()  # the restarts' factors
    # The output is the merged model, as Axolotl's: no adapter, loadable with plain transformers.
    assert not (root / "out" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(root / "out")
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_a_relora_run_killed_after_a_restart_resumes_to_the_uninterrupted_weights(
        tmp_path: Path, tiny_model: Path, relora_run: tuple[Path, str]) -> None:
    """Killed after step 7, resumed from the checkpoint of step 5 (written after the first restart): the merged
    base is rebuilt by replaying the checkpoint's restart, and training ends where the unbroken run did."""
    log = train(tmp_path, tiny_model, RELORA, fault_after=7)
    assert "replayed 1 restarts" in log
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path / "out")] == [5, 10, 15]
    assert_same_weights(relora_run[0] / "out", tmp_path / "out")
    assert [r["loss"] for r in train_records(tmp_path / "out")] == \
        pytest.approx([r["loss"] for r in train_records(relora_run[0] / "out")], abs=1e-6)
