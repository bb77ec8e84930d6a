"""The tiny model loads like a hub checkpoint for every architecture, and is deterministic for a seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import require_module

require_module("torch", "make install")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from tunefile.runtime.tiny_model import build_tiny_model  # noqa: E402

ARCH_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@pytest.mark.parametrize("arch", sorted(ARCH_CLASSES))
def test_each_architecture_saves_and_loads_like_a_hub_checkpoint(tmp_path: Path, arch: str) -> None:
    directory = build_tiny_model(tmp_path / arch, arch=arch)
    assert (directory / "model.safetensors").is_file()
    assert (directory / "tokenizer.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == ARCH_CLASSES[arch]
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size) == (64, 2, 4, 2, 128)
    assert config.vocab_size == len(tokenizer)
    assert config.max_position_embeddings == 2048 and not config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    ids = tokenizer("the quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))


def test_tokenizer_has_special_tokens_and_a_chatml_template(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")
    assert 1000 <= len(tok) <= 2000
    # bos is prepended; special tokens are single tokens; any text round-trips (byte-level).
    ids = tok("Add the two numbers.")["input_ids"]
    assert ids[0] == tok.bos_token_id
    for special in ("<|im_start|>", "<|im_end|>", "<|eot_id|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    text = "naïve café — 12 + 30 = 42 🙂"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "Say red."}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nSay red.<|im_end|>\n<|im_start|>assistant\n"


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path / "a", seed=3)
    second = build_tiny_model(tmp_path / "b", seed=3)
    third = build_tiny_model(tmp_path / "c", seed=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (third / "model.safetensors").read_bytes()
    assert json.loads((first / "tiny_model.json").read_text()) == {"arch": "llama", "seed": 3}


def test_generation_stops_at_end_of_text_and_end_of_turn(tiny_model_dir: Path, tiny_tokenizer) -> None:
    config = json.loads((tiny_model_dir / "generation_config.json").read_text())
    stops = set(tiny_tokenizer.convert_ids_to_tokens(config["eos_token_id"]))
    assert {"<|end_of_text|>", "<|im_end|>", "<|eot_id|>"} == stops


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny-model architecture 'gpt2'"):
        build_tiny_model(tmp_path / "x", arch="gpt2")


def test_cli_builds_the_model(tmp_path: Path) -> None:
    from tunefile.runtime.__main__ import main

    assert main(["tiny-model", str(tmp_path / "m"), "--arch", "qwen2"]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "qwen2"
