"""Run-plan sections built by hand for the runtime's unit tests, every field at a plain value, so a test states
only what it studies and a field added to the plan is added here once.

``data_plan(entry, sequence_len=64)`` and ``model_plan(tokenizer_dir, precision="bf16")``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from tunefile.schemas.run_plan import DataPlan, DatasetPlan, ModelPlan


def data_plan(*datasets: DatasetPlan, **changes: Any) -> DataPlan:
    plan = DataPlan(datasets=datasets, sequence_len=256, micro_batch_size=2, packing_attention=None,
                    pad_to_sequence_len=False, train_on_inputs=False, val_set_size=0.0, prepared_path="prepared",
                    chat_template=None, chat_template_jinja=None, chat_template_kwargs={}, eot_tokens=None,
                    eval_packing=False, skip_prepare=False, streaming=False, exact_deduplication=False,
                    group_by_length=False, min_sample_len=2)
    return replace(plan, **changes)


def model_plan(model_dir: Path | str, **changes: Any) -> ModelPlan:
    plan = ModelPlan(base_model=str(model_dir), revision=None, architecture=None, parameters=None,
                     config_overrides={}, quantization_config=None, quantize_moe_experts=False, from_scratch=False,
                     tokenizer=str(model_dir), tokenizer_class=None, tokenizer_backend="huggingface",
                     pad_embeddings_to_multiple_of=None, special_tokens=None, tokens=None, trust_remote_code=False,
                     precision="fp32", tf32=False, attn_implementation="sdpa", load_in_4bit=False,
                     load_in_8bit=False, gradient_checkpointing=False,
                     gradient_checkpointing_kwargs={"use_reentrant": True}, gradient_checkpointing_every_n_layers=1,
                     activation_offloading=False,
                     half_precision_weights=False, llama4_linearized_experts=False, ple_cpu_offload=False,
                     unfrozen_parameters=None, shrink_embeddings=False, adapter=None)
    return replace(plan, **changes)
