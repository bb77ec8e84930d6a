"""GPU-only: bf16 LoRA, QLoRA (bitsandbytes 4-bit) and packing with PyTorch's varlen kernel, each
through a compiled bundle on one GPU. Marked `gpu`; CPU CI runs `-m "not gpu"`. On a GPU machine
these run for real: `pytest -m gpu tests/test_runtime_gpu.py`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import require_module
from runtime_bundles import build_tiny_model, compile_bundle, launch, metrics, train_losses, workspace, write_config

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA; deselect them with -m 'not gpu'")
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-model")


def _run(tmp_path: Path, tiny_model: Path, **overrides: object) -> Path:
    root = workspace(tmp_path, tiny_model)
    # The random tiny model's head starts near zero, so its LoRA runs train lm_head in full too (as on the CPU).
    values = {"adapter": "lora", "lora_target_linear": True, "lora_modules_to_save": ["lm_head"],
              "learning_rate": 1e-2, "bf16": True, **overrides}
    values = {key: value for key, value in values.items() if value is not None}  # None: leave the key out
    # One GPU of the H100 kind: bf16, and sample packing resolves to torch_varlen.
    launch(compile_bundle(write_config(root, **values), target="h100-80gb", gpus_per_node=1))
    return root / "out"


def _learned(out: Path) -> None:
    losses = train_losses(out)
    assert len(losses) >= 30
    assert sum(losses[-3:]) / 3 <= sum(losses[:3]) / 3 / 2


def test_bf16_lora_with_varlen_packing(tmp_path: Path, tiny_model: Path) -> None:
    out = _run(tmp_path, tiny_model, sample_packing=True)
    _learned(out)
    assert (out / "adapter_model.safetensors").exists()
    assert metrics(out)[-1]["tokens_per_s"] > 0


def test_qlora(tmp_path: Path, tiny_model: Path) -> None:
    require_module("bitsandbytes", "QLoRA needs it: pip install 'tunefile[qlora]'")
    out = _run(tmp_path, tiny_model, adapter="qlora", load_in_4bit=True, optimizer="paged_adamw_8bit")
    _learned(out)
    assert (out / "adapter_model.safetensors").exists()


def test_lora_on_an_8bit_base(tmp_path: Path, tiny_model: Path) -> None:
    require_module("bitsandbytes", "8-bit loading needs it: pip install 'tunefile[qlora]'")
    out = _run(tmp_path, tiny_model, load_in_8bit=True)
    _learned(out)
    assert (out / "adapter_model.safetensors").exists()


def test_full_fine_tuning_bf16_with_gradient_checkpointing(tmp_path: Path, tiny_model: Path) -> None:
    out = _run(tmp_path, tiny_model, adapter=None, lora_target_linear=None, lora_modules_to_save=None,
               learning_rate=3e-3,
               gradient_checkpointing=True, optimizer="adamw_torch_fused")
    _learned(out)
    assert (out / "model.safetensors").exists()
