"""Cross-field rules that need only the config."""

from __future__ import annotations

import pytest

from helpers import MINIMAL
from tunefile.compiler.errors import ConfigError
from tunefile.compiler.loader import load_document
from tunefile.compiler.validate import validate_document


def errors_of(extra: str, base: str = MINIMAL) -> dict[tuple, str]:
    with pytest.raises(ConfigError) as caught:
        validate_document(load_document(base + extra, "c.yml"))
    return {problem.path: problem.message + " | " + (problem.hint or "") for problem in caught.value.problems}


def warnings_of(extra: str, base: str = MINIMAL) -> dict[tuple, str]:
    _, warnings = validate_document(load_document(base + extra, "c.yml"))
    return {problem.path: problem.message for problem in warnings}


def test_deepspeed_with_fsdp() -> None:
    found = errors_of("deepspeed: zero2\nfsdp_config:\n  offload_params: false\n")
    assert "cannot both be set" in found[("deepspeed",)]


def test_qlora_implies_4bit_and_rejects_the_opposite() -> None:
    assert "contradicts" in errors_of("adapter: qlora\nload_in_4bit: false\n")[("load_in_4bit",)]
    assert "not 8-bit" in errors_of("adapter: qlora\nload_in_8bit: true\n")[("load_in_8bit",)]
    assert warnings_of("adapter: qlora\n") == {}


def test_lora_on_4bit_is_qlora_with_a_warning() -> None:
    assert "QLoRA" in warnings_of("adapter: lora\nload_in_4bit: true\n")[("load_in_4bit",)]


@pytest.mark.parametrize("key", ["load_in_4bit", "load_in_8bit"])
def test_quantised_loading_needs_an_adapter(key: str) -> None:
    assert "without an adapter" in errors_of(f"{key}: true\n")[(key,)]


def test_both_quantisations() -> None:
    assert "both be true" in errors_of("adapter: lora\nload_in_4bit: true\nload_in_8bit: true\n")[("load_in_8bit",)]


@pytest.mark.parametrize(
    "extra, path",
    [
        ("warmup_steps: 10\nwarmup_ratio: 0.1\n", ("warmup_ratio",)),
        ("save_steps: 10\nsaves_per_epoch: 2\n", ("saves_per_epoch",)),
        ("eval_steps: 10\nevals_per_epoch: 2\nval_set_size: 0.1\n", ("evals_per_epoch",)),
    ],
)
def test_two_ways_of_saying_one_thing(extra: str, path: tuple) -> None:
    assert "cannot both be set" in errors_of(extra)[path]


def test_bf16_and_fp16() -> None:
    assert "both be true" in errors_of("bf16: true\nfp16: true\n")[("fp16",)]


def test_sample_packing_needs_isolating_attention() -> None:
    assert "isolates packed samples" in errors_of("sample_packing: true\neager_attention: true\n")[("sample_packing",)]


def test_legacy_attention_flags_that_disagree() -> None:
    found = errors_of("flash_attention: true\nsdp_attention: true\n")
    assert "contradicts attn_implementation: flash_attention_2" in found[("sdp_attention",)]


def test_chat_only_keys_on_other_dataset_types() -> None:
    base = "base_model: x\ndatasets:\n  - path: a\n    type: alpaca\n    roles_to_train: [assistant]\n" \
           "    train_on_eos: all\n"
    found = errors_of("", base)
    assert "only to type: chat_template" in found[("datasets", 0, "roles_to_train")]
    assert "only to type: chat_template" in found[("datasets", 0, "train_on_eos")]


def test_field_only_on_completion() -> None:
    base = "base_model: x\ndatasets:\n  - path: a\n    type: chat_template\n    field: text\n"
    assert "only to type: completion" in errors_of("", base)[("datasets", 0, "field")]


def test_chat_keys_are_fine_on_chat_datasets() -> None:
    base = "base_model: x\ndatasets:\n  - path: a\n    type: chat_template\n    roles_to_train: [assistant]\n"
    assert warnings_of("", base) == {}


def test_lora_keys_without_adapter_warn() -> None:
    assert "full fine-tune" in warnings_of("lora_r: 16\n")[("lora_r",)]
    assert "needs `adapter" in errors_of("lora_model_dir: prev\n")[("lora_model_dir",)]


def test_eval_without_validation_split_warns() -> None:
    assert "val_set_size is 0" in warnings_of("eval_steps: 10\n")[("eval_steps",)]


def test_unreadable_parameter_hint() -> None:
    assert "cannot read" in errors_of("model_parameters: lots\n")[("model_parameters",)]


def test_fsdp_and_gradient_checkpointing_twice() -> None:
    """Axolotl accepts both; FSDP's own checkpointing is kept and a warning says so."""
    found = warnings_of("gradient_checkpointing: true\nfsdp_config:\n  activation_checkpointing: true\n")
    assert "gradient_checkpointing is turned off" in found[("fsdp_config", "activation_checkpointing")]


def test_rule_errors_come_with_schema_errors() -> None:
    """Keys that passed the schema still get their cross-field checks in the same round."""
    found = errors_of("lora_alpah: 3\nwarmup_steps: 10\nwarmup_ratio: 0.1\n")
    assert set(found) == {("lora_alpah",), ("warmup_ratio",)}
