"""A sample never starts with the pad token: the data build strips leading padding.

Why (the root cause of a NaN first seen on a GPU): a pad token's input-embedding row is exactly zero wherever the
embedding has ``padding_idx`` (the tiny model's does). At a sample's first position attention sees only that
position and MLP(0) = 0, so the hidden state stays exactly zero through every layer; RMSNorm's backward at zero
multiplies the gradient by 1/sqrt(eps) in each layer, it overflows to inf after ~16 layers, and inf × 0 gives
NaN weight gradients. These tests pin the data side (what the cache holds) and the consequence (a deep model
trained on the pipeline's batches has finite gradients; the same rows fed raw do not).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers import require_module

require_module("torch", "make install")

import numpy as np  # noqa: E402
import runtime_plans  # noqa: E402
import torch  # noqa: E402

from tunefile.runtime import attention  # noqa: E402
from tunefile.runtime.data import prepare_data  # noqa: E402
from tunefile.runtime.data.batching import collate, plan_batches  # noqa: E402
from tunefile.runtime.data.examples import Example, leading_padding_id, strip_leading_padding  # noqa: E402
from tunefile.runtime.losses import token_loss_sum  # noqa: E402
from tunefile.schemas.run_plan import DataPlan, DatasetPlan  # noqa: E402

SEQUENCE_LEN = 64


def pretokenized(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def data_plan(tmp_path: Path, path: Path, **changes: Any) -> DataPlan:
    entry = DatasetPlan(path=str(path), type="pretokenized", name=None, split="train", data_files=None, ds_type=None,
                        field=None, field_messages=None, message_field_role=None, message_field_content=None,
                        roles_to_train=None, train_on_eos=None, chat_template=None, field_thinking=None,
                        template_thinking_key=None, drop_system_message=None)
    return runtime_plans.data_plan(entry, **{"sequence_len": SEQUENCE_LEN, "packing_attention": "block_mask",
                                             "prepared_path": str(tmp_path / "prepared"), **changes})


def cached(dataset: Any) -> list[tuple[list[int], list[int]]]:
    return [(dataset[i]["input_ids"].tolist(), dataset[i]["labels"].tolist()) for i in range(len(dataset))]


# --- (a) the data: leading pads leave the cache, pads inside stay --------------------------------------------

def test_leading_pad_tokens_are_stripped_with_their_labels(tmp_path: Path, tiny_tokenizer: Any) -> None:
    pad = tiny_tokenizer.pad_token_id
    assert pad == 2 and pad != tiny_tokenizer.bos_token_id
    rows = [
        {"input_ids": [pad, 10, 11, 12]},  # labels default to the ids, the pad's too
        {"input_ids": [pad, pad, pad, 20, 21], "labels": [-100, -100, -100, 20, 21]},
        {"input_ids": [pad, pad, pad]},  # nothing but padding: dropped
        {"input_ids": [30, pad, 31], "labels": [30, -100, 31]},  # a pad inside is harmless: kept as is
        {"input_ids": [pad, 40, 41], "labels": [pad, -100, 41]},  # labels stay aligned with their tokens
        {"input_ids": [pad, 50], "labels": [pad, -100]},  # one token left: shorter than Axolotl's minimum of 2
        {"input_ids": [pad, 60, 61], "labels": [pad, -100, -100]},  # only the pad was trained: nothing left
    ]
    path = pretokenized(tmp_path / "ids.jsonl", rows)
    prepared = prepare_data(data_plan(tmp_path, path), tiny_tokenizer, seed=0, offline=True)
    assert cached(prepared.train) == [
        ([10, 11, 12], [10, 11, 12]),
        ([20, 21], [20, 21]),
        ([30, pad, 31], [30, -100, 31]),
        ([40, 41], [-100, 41]),
    ]
    assert [prepared.train.origin(i) for i in range(len(prepared.train))] == [
        (str(path), 0), (str(path), 1), (str(path), 3), (str(path), 4)]
    stats = prepared.stats
    assert stats["leading_padding_stripped"] == 6
    assert stats["dropped"] == {"only_padding": 1, "too_short": 1, "nothing_to_train": 1}
    assert stats["dropped_rows"] == 3
    # min_sample_len counts the tokens left after the padding is stripped.
    longer = prepare_data(data_plan(tmp_path, path, min_sample_len=3, prepared_path=str(tmp_path / "p3")),
                          tiny_tokenizer, seed=0, offline=True)
    assert cached(longer.train) == [([10, 11, 12], [10, 11, 12]), ([30, pad, 31], [30, -100, 31])]
    assert longer.stats["dropped"]["too_short"] == 4


def test_a_pad_token_that_is_the_bos_token_is_kept(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.bos_token  # then a leading "pad" is a real, trained beginning of sequence
    bos = tokenizer.bos_token_id
    assert leading_padding_id(tokenizer) is None
    path = pretokenized(tmp_path / "ids.jsonl", [{"input_ids": [bos, 10, 11]}])
    prepared = prepare_data(data_plan(tmp_path, path), tokenizer, seed=0, offline=True)
    assert cached(prepared.train) == [([bos, 10, 11], [bos, 10, 11])]
    assert prepared.stats["leading_padding_stripped"] == 0


def test_strip_leading_padding_leaves_other_examples_alone() -> None:
    example = Example([5, 2, 6], [5, -100, 6])
    assert strip_leading_padding(example, 2) is example
    assert strip_leading_padding(example, None) is example
    assert strip_leading_padding(Example([2, 2], [2, 2]), 2) == Example([], [])


# --- (b) the consequence: a deep model's gradients on the pipeline's batches ----------------------------------

def deep_llama(pad_token_id: int) -> Any:
    """16 layers, eps 1e-6: enough for 1000× per layer to overflow fp32 when a sample starts at a zero state."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=16,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=pad_token_id,
                         initializer_range=0.1, rms_norm_eps=1e-6, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def loss_and_grad_norm(model: Any, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """One forward and backward of the summed next-token loss, as the trainer runs a packed micro-batch."""
    model.zero_grad(set_to_none=True)
    isolation = attention.packing_forward_kwargs("block_mask", batch["position_ids"], attn_implementation="sdpa",
                                                 dtype=torch.float32)
    inputs = {key: value for key, value in batch.items() if key != "labels"} | isolation
    loss_sum, _ = token_loss_sum(model(**inputs, use_cache=False).logits, batch["labels"])
    loss_sum.backward()
    norms = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
    return loss_sum.item(), torch.linalg.vector_norm(norms).item()


def test_a_deep_model_trains_finitely_on_rows_that_start_with_padding(tmp_path: Path, tiny_tokenizer: Any) -> None:
    pad = tiny_tokenizer.pad_token_id
    rng = np.random.default_rng(0)
    # Left-padded exports: every row starts with padding (ids < 256 so the small model's vocabulary holds them).
    rows = [[pad] * int(rng.integers(1, 4)) + rng.integers(3, 256, size=int(rng.integers(8, 24))).tolist()
            for _ in range(8)]
    path = pretokenized(tmp_path / "left_padded.jsonl", [{"input_ids": ids} for ids in rows])
    plan = data_plan(tmp_path, path)
    prepared = prepare_data(plan, tiny_tokenizer, seed=0, offline=True)
    assert prepared.stats["leading_padding_stripped"] == len(rows) == len(prepared.train)

    def micro_batches(dataset: Any, lengths: Any) -> list[dict[str, torch.Tensor]]:
        plan_ = plan_batches(lengths, micro_batch_size=plan.micro_batch_size, sequence_len=plan.sequence_len,
                             sample_packing=True, seed=0, epoch=0)
        return [collate(dataset, micro_batch, pad_token_id=pad, sequence_len=plan.sequence_len,
                        pad_to_sequence_len=plan.pad_to_sequence_len, packed=True) for micro_batch in plan_]

    model = deep_llama(pad)
    assert not model.get_input_embeddings().weight[pad].any()  # the premise: the pad embedding row is zero
    for batch in micro_batches(prepared.train, prepared.train.lengths):
        assert not (batch["input_ids"][batch["position_ids"] == 0] == pad).any()  # no sample starts with pad
        loss, grad_norm = loss_and_grad_norm(model, batch)
        assert np.isfinite(loss) and np.isfinite(grad_norm) and grad_norm > 0

    # The same rows without the pipeline's fix (raw ids, pad first), batched and packed the same way.
    raw = [{"input_ids": np.array(ids, dtype=np.int32), "labels": np.array(ids, dtype=np.int32)} for ids in rows]
    raw_norms = [loss_and_grad_norm(model, batch)[1] for batch in micro_batches(raw, [len(ids) for ids in rows])]
    assert not all(np.isfinite(raw_norms)), raw_norms


@pytest.mark.parametrize("first", ["pad", "other"])
def test_the_deep_model_reproduces_the_nan_from_one_leading_pad(tiny_tokenizer: Any, first: str) -> None:
    """The premise on its own: one sequence, unpacked; only its first token differs."""
    pad = tiny_tokenizer.pad_token_id
    ids = torch.from_numpy(np.random.default_rng(1).integers(3, 256, size=(1, 32)))
    ids[0, 0] = pad if first == "pad" else 7
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(32)[None]}
    _, grad_norm = loss_and_grad_norm(deep_llama(pad), batch)
    assert np.isfinite(grad_norm) == (first == "other")
