"""Regression: the packed LoRA run that turned NaN on the GPU (issue 10), reduced to its cause.

The cause: the pad token's input-embedding row is exactly zero (transformers zero-initialises the
``padding_idx`` row and the embedding never updates it), and the data held examples whose first token was
the pad id (random pretokenized ids: 1 in 128,000; left-padded exports: every row). Attention at a sample's
first position sees only itself, so that position's hidden state stays exactly zero through every layer;
RMSNorm's backward at zero multiplies the gradient by 1/sqrt(eps) in every layer, the activation gradient
overflows to inf, and inf × 0 gives NaN weight gradients, which the optimizer then applied. Nothing in it is
GPU-specific: a deep, narrow model shows it on the CPU in fp32 as the 1B model did on the GPU in bf16.

The fix is in the data build (leading pad tokens are padding, not content). These tests train such data
through a compiled bundle and fail on the old code (NaN losses, or on a trainer with the watchdog but
without the fix, exit 3).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from runtime_bundles import build_tiny_model, compile_bundle, launch, train_losses, workspace, write_config

PAD_ID = 2  # the tiny tokenizer's pad token


def deep_model_with_a_zero_pad_row(directory: Path, tokenizer_dir: Path) -> Path:
    """16 narrow layers, initialised wide enough that 16 RMSNorm backward gains overflow fp32 from a zero
    hidden state; the tiny tokenizer's files beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (directory / "config.json").exists():
        return directory
    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=16,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD_ID, initializer_range=0.1,
                         rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert float(model.get_input_embeddings().weight[PAD_ID].detach().abs().sum()) == 0.0
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def rows_starting_with_the_pad_id(path: Path, count: int = 48) -> Path:
    generator = torch.Generator().manual_seed(1)
    with path.open("w", encoding="utf-8") as out:
        for i in range(count):
            length = 24 + (i * 7) % 40
            ids = torch.randint(3, 1000, (length,), generator=generator).tolist()
            if i % 2 == 0:
                ids[0] = PAD_ID  # half the rows begin with the pad token, as random ids sometimes do
            out.write(json.dumps({"input_ids": ids}) + "\n")
    return path


def train_on_pad_first_rows(tmp_path: Path, *, target: str, **overrides: object) -> Path:
    tiny = build_tiny_model(tmp_path / "tiny-model-tokenizer")
    root = workspace(tmp_path / "run", tiny)
    deep_model_with_a_zero_pad_row(root / "deep-model", tiny)
    rows_starting_with_the_pad_id(root / "data" / "pad_first.jsonl")
    config = write_config(root, base_model="deep-model", datasets=[{"path": "data/pad_first.jsonl",
                                                                     "type": "pretokenized"}],
                          adapter="lora", lora_target_linear=True, sample_packing=True, sequence_len=256,
                          micro_batch_size=2, max_steps=8, learning_rate=2e-4, **overrides)
    launch(compile_bundle(config, target=target, gpus_per_node=1 if target != "cpu" else None))
    return root / "out"


def test_rows_that_begin_with_the_pad_token_train_finite_on_the_cpu(tmp_path: Path) -> None:
    losses = train_losses(train_on_pad_first_rows(tmp_path, target="cpu"))
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses), losses


@pytest.mark.gpu
def test_rows_that_begin_with_the_pad_token_train_finite_on_the_gpu_with_varlen_packing(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA; deselect them with -m 'not gpu'")
    out = train_on_pad_first_rows(tmp_path, target="h100-80gb", bf16=True)
    losses = train_losses(out)
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses), losses
    decisions = json.loads((out / "train_summary.json").read_text())["runtime_decisions"]
    assert decisions["packing_attention"] == "torch_varlen" and decisions["device"] == "cuda"
