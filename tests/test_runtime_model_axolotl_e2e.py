"""Axolotl's bfloat16: true and llama4_linearized_experts through a compiled bundle on the CPU, as a user runs
them (`tunefile compile`, then the bundle's launch.sh), on the tiny models. (peft.loftq_config cannot run on a
CPU; its refusal is unit-tested in test_runtime_model_axolotl.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runtime_bundles import (
    build_tiny_model,
    compile_bundle,
    launch,
    safetensors,
    train_losses,
    workspace,
    write_config,
)
from tunefile.runtime.tiny_model import model_config


def test_bfloat16_weights_train_a_full_finetune_in_bf16(tmp_path: Path, tiny_model_dir: Path) -> None:
    """bfloat16: true, full fine-tuning: ten steps with a finite, falling loss, and the model saved in bf16
    (the weights trained were bf16: there was no fp32 copy to save from)."""
    root = workspace(tmp_path, tiny_model_dir)
    config = write_config(root, max_steps=10, bfloat16=True)
    bundle = compile_bundle(config)
    assert "half_precision_weights: true" in (bundle / "config.yaml").read_text(encoding="utf-8")
    launch(bundle)
    losses = train_losses(root / "out")
    assert len(losses) == 10 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    trained = safetensors(root / "out" / "model.safetensors")
    assert {tensor.dtype for tensor in trained.values()} == {torch.bfloat16}
    original = safetensors(tiny_model_dir / "model.safetensors")
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"].float(),
                           original["model.layers.0.mlp.up_proj.weight"].float())


def test_lora_on_linearized_llama4_experts_trains_them(tmp_path: Path,
                                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    """The tiny Llama 4 (fused experts on disk) with llama4_linearized_experts and a LoRA adapter on the expert
    projections, named as Axolotl's Llama 4 examples name them: the loss falls and the saved adapter holds a
    trained update for every expert."""
    model_dir = build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama4", arch="llama4")
    root = workspace(tmp_path, model_dir)
    config = write_config(root, max_steps=10, adapter="lora", lora_r=4, lora_alpha=8, llama4_linearized_experts=True,
                          lora_target_modules=r".*\.experts\.(gate|up|down)_projs\.[0-9]+")
    launch(compile_bundle(config))
    losses = train_losses(root / "out")
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    adapter = safetensors(root / "out" / "adapter_model.safetensors")
    shape = model_config("llama4", vocab_size=1, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    lora_b = {name for name, tensor in adapter.items() if "lora_B" in name and tensor.abs().sum() > 0}
    assert len(lora_b) == shape.num_hidden_layers * 3 * shape.num_local_experts
    assert all(".feed_forward.experts." in name for name in lora_b)

