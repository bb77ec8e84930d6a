"""tiled_mlp and fp8 through compiled bundles on the tiny model, as a user runs them (`tunefile compile`, then
`bash bundle/launch.sh`).

On the CPU: a tiled-MLP run trains exactly as the same run untiled, and an fp8 bundle compiled for a Hopper GPU but
landing on a machine without CUDA trains exactly as its bf16 twin and says why in the runtime decisions. On a GPU
(`make test-gpu`, compute capability 8.9 or newer): the fp8 run computes its linear layers in float8 and learns."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import require_module
from runtime_bundles import build_tiny_model, compile_bundle, launch, summary, train_losses, workspace, write_config

NO_CUDA = {"CUDA_VISIBLE_DEVICES": ""}


def run(root: Path, name: str, *, target: str = "cpu", env: dict[str, str] | None = None,
        **values: Any) -> tuple[list[float], dict[str, Any]]:
    """(losses, runtime decisions) of a bundle made from the base config with ``values``, run in out-NAME."""
    config = write_config(root, f"{name}.yml", output_dir=f"out-{name}", **values)
    launch(compile_bundle(config, f"bundle-{name}", target=target, gpus_per_node=1 if target != "cpu" else None),
           env=env)
    return train_losses(root / f"out-{name}"), summary(root / f"out-{name}")["runtime_decisions"]


def test_a_tiled_mlp_run_trains_as_the_untiled_one(tmp_path: Path) -> None:
    root = workspace(tmp_path, build_tiny_model(tmp_path / "tiny-model-files"))
    common = {"max_steps": 4, "gradient_checkpointing": True}
    untiled, _ = run(root, "untiled", **common)
    tiled, decisions = run(root, "tiled", tiled_mlp=True, tiled_mlp_num_shards=3, **common)
    assert len(tiled) == 4 and tiled == pytest.approx(untiled, rel=1e-5)
    assert decisions["tiled_mlp"] == {"layers": 2, "implementation": "tunefile TiledMlp", "num_shards": 3,
                                      "mlp": "the model's own"}


def test_an_fp8_bundle_on_a_machine_without_float8_trains_in_bf16(tmp_path: Path) -> None:
    root = workspace(tmp_path, build_tiny_model(tmp_path / "tiny-model-files"))
    common = {"max_steps": 3, "bf16": True}
    plain, _ = run(root, "bf16", target="h100-80gb", env=NO_CUDA, **common)
    fp8_losses, decisions = run(root, "fp8", target="h100-80gb", env=NO_CUDA, fp8=True, **common)
    assert fp8_losses == plain
    assert decisions["fp8"] == {
        "enabled": False, "recipe": "tensorwise", "fsdp_float8_all_gather": False,
        "fallback": "FP8 training needs a CUDA GPU and this run is on the cpu; training in bf16"}


@pytest.mark.gpu
def test_fp8_training_on_a_gpu_computes_in_float8_and_learns(tmp_path: Path) -> None:
    require_module("torchao", "pip install 'tunefile[torchao]'")
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA; deselect them with -m 'not gpu'")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 matmuls need compute capability 8.9 or newer")
    root = workspace(tmp_path, build_tiny_model(tmp_path / "tiny-model-files"))
    losses, decisions = run(root, "fp8", target="h100-80gb", bf16=True, fp8=True, tiled_mlp=True,
                            max_steps=30, learning_rate=1e-2)
    assert decisions["fp8"]["enabled"] and decisions["fp8"]["float8_layers"] == 13
    assert decisions["tiled_mlp"]["layers"] == 2
    assert len(losses) == 30 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
