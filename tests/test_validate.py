"""Schema validation: unknown keys at every level, types, ranges, all errors in one round."""

from __future__ import annotations

import pytest

from helpers import MINIMAL
from tunefile.compiler.errors import ConfigError, format_path
from tunefile.compiler.loader import load_document
from tunefile.compiler.validate import validate_document


def problems_of(text: str) -> list[str]:
    document = load_document(text, "c.yml")
    with pytest.raises(ConfigError) as caught:
        validate_document(document)
    located = []
    for problem in caught.value.problems:
        mark = document.locate(problem.path, at_key=problem.at_key)
        located.append((mark.line, mark.column, f"{mark.line}:{mark.column}: {format_path(problem.path)}: "
                        f"{problem.message}"))
    return [line for _, _, line in sorted(located)]


def test_minimal_config_is_valid() -> None:
    spec, warnings = validate_document(load_document(MINIMAL, "c.yml"))
    assert spec.base_model == "meta-llama/Llama-3.1-8B" and warnings == []
    assert spec.datasets[0].type == "alpaca"


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("lora_alpah: 64\n", "5:1: lora_alpah: unknown key; did you mean lora_alpha?"),
        ("fsdp_config:\n  ofload_params: true\n",
         "6:3: fsdp_config.ofload_params: unknown key; did you mean offload_params?"),
        ("special_tokens:\n  pad_tokn: x\n", "6:3: special_tokens.pad_tokn: unknown key; did you mean pad_token?"),
        ("sequence_length: 10\n", "5:1: sequence_length: unknown key; did you mean sequence_len?"),
    ],
)
def test_misspelt_key_at_any_level_gets_its_line_and_a_suggestion(extra: str, expected: str) -> None:
    assert problems_of(MINIMAL + extra) == [expected]


def test_misspelt_key_inside_a_dataset_entry() -> None:
    text = "base_model: x\ndatasets:\n  - path: a\n    type: chat_template\n    feild_messages: conv\n"
    assert problems_of(text) == ["5:5: datasets[0].feild_messages: unknown key; did you mean field_messages?"]


def test_every_error_is_reported_at_once() -> None:
    text = MINIMAL + "lora_r: 0\nsequence_len: 0\nmicro_batch_size: -1\nval_set_size: 1.0\nbf16: maybe\n" \
        "optimizer: adam\nlr_scheduler: cosin\nwarmup_steps: 1\nwarmup_ratio: 0.1\n"
    found = problems_of(text)
    assert [line.split(": ")[1] for line in found] == [
        "lora_r", "sequence_len", "micro_batch_size", "val_set_size", "bf16", "optimizer", "lr_scheduler",
        "warmup_ratio",
    ]
    assert any("greater than or equal to 1" in line for line in found)
    assert any("expected one of" in line and "adamw_torch" in line for line in found)


def test_wrong_types_are_named() -> None:
    found = problems_of(MINIMAL + "micro_batch_size: '2'\nsample_packing: 3\n")
    assert "5:19: micro_batch_size: expected a whole number (got '2')" in found
    assert "6:17: sample_packing: expected true or false (got 3)" in found


def test_unknown_dataset_type_lists_the_known_ones() -> None:
    (line,) = problems_of("base_model: x\ndatasets:\n  - path: a\n    type: sharegpt\n")
    assert line.startswith("4:11: datasets[0].type: expected one of")
    assert "'chat_template'" in line and "'completion'" in line


def test_missing_required_keys() -> None:
    found = problems_of("adapter: lora\n")
    assert found == ["1:1: (top level): required key `base_model` is missing",
                     "1:1: (top level): required key `datasets` is missing"]


def test_axolotl_keys_tunefile_does_not_take_say_what_to_do() -> None:
    document = load_document(MINIMAL + "use_ray: true\n", "c.yml")
    with pytest.raises(ConfigError) as caught:
        validate_document(document)
    (problem,) = caught.value.problems
    assert problem.path == ("use_ray",)
    assert problem.message == "Axolotl's use_ray is not supported by tunefile: Ray is not supported; tunefile " \
                              "launches with accelerate (launch.sh) or SLURM (job.sbatch)"
    # Left at Axolotl's default (off), the same key changes nothing and is accepted.
    spec, _ = validate_document(load_document(MINIMAL + "use_ray: false\n", "c.yml"))
    assert spec.base_model


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError):
        validate_document(load_document("- a\n- b\n", "c.yml"))


def test_every_seed_key_is_accepted() -> None:
    """A config using every key the issue lists compiles through validation."""
    text = """\
base_model: meta-llama/Llama-3.1-8B
datasets:
  - path: chat.jsonl
    type: chat_template
    field_messages: messages
    roles_to_train: [assistant]
    train_on_eos: turn
  - path: corpus.jsonl
    type: completion
    field: text
adapter: qlora
lora_r: 32
lora_alpha: 64
lora_dropout: 0.05
lora_target_linear: true
lora_target_modules: [q_proj, v_proj]
lora_model_dir: previous-adapter
sequence_len: 4096
sample_packing: true
micro_batch_size: 2
gradient_accumulation_steps: 8
num_epochs: 3
max_steps: 1000
optimizer: paged_adamw_8bit
lr_scheduler: cosine
learning_rate: 2e-4
warmup_steps: 100
bf16: auto
fp16: false
tf32: true
flash_attention: true
gradient_checkpointing: true
load_in_4bit: true
load_in_8bit: false
special_tokens:
  pad_token: "<|end_of_text|>"
chat_template: chatml
train_on_inputs: false
val_set_size: 0.05
dataset_prepared_path: last_run_prepared
output_dir: ./outputs/x
logging_steps: 10
save_steps: 100
eval_steps: 50
resume_from_checkpoint: null
seed: 42
fsdp_version: 2
fsdp_config:
  offload_params: true
  state_dict_type: SHARDED_STATE_DICT
  auto_wrap_policy: TRANSFORMER_BASED_WRAP
  transformer_layer_cls_to_wrap: LlamaDecoderLayer
  reshard_after_forward: true
  cpu_ram_efficient_loading: true
  activation_checkpointing: false
shrink_embeddings: true
max_grad_norm: 1.0
weight_decay: 0.01
offline: true
"""
    spec, _ = validate_document(load_document(text, "c.yml"))
    assert spec.fsdp_config is not None and spec.fsdp_config.offload_params
    assert spec.learning_rate == pytest.approx(2e-4)
