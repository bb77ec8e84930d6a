"""config.yaml: the runtime's only input — the Spec with every choice made concrete."""

from __future__ import annotations

from typing import Any

import yaml

from ..plan import BatchPlan, DistributionPlan, FsdpPlan, ModelInfo
from ..shell import one_line
from ..spec import DatasetSpec, Spec
from ..targets import Target

# Keys only the compiler reads. model_parameters is a hint for the memory estimate (it may say "8B");
# the number that was used is in resolved.model_parameters.
_COMPILER_ONLY = ("target", "strategy", "model_parameters")
_COMPLETION_DEFAULTS: dict[str, Any] = {"field": "text"}
_CHAT_DEFAULTS: dict[str, Any] = {"field_messages": "messages", "message_field_role": "role",
                                  "message_field_content": "content", "roles_to_train": ["assistant"],
                                  "train_on_eos": "turn"}


def dataset_entry(dataset: DatasetSpec, *, top_level_chat_template: str | None) -> dict[str, Any]:
    """One ``datasets`` entry with the defaults of its type written out."""
    entry = dataset.model_dump(mode="json")
    defaults = {"completion": _COMPLETION_DEFAULTS, "chat_template": _CHAT_DEFAULTS}.get(dataset.type, {})
    for key, default in defaults.items():
        if entry[key] is None:
            entry[key] = list(default) if isinstance(default, list) else default
    if dataset.type == "chat_template" and entry["chat_template"] is None:
        # May stay null: the runtime then uses the tokenizer's own template.
        entry["chat_template"] = top_level_chat_template
    return entry


def fsdp_section(fsdp: FsdpPlan) -> dict[str, Any]:
    """fsdp_config in the Spec's own key names (accelerate.yaml spells them its way)."""
    return {
        "offload_params": fsdp.offload_params,
        "state_dict_type": fsdp.state_dict_type,
        "auto_wrap_policy": fsdp.auto_wrap_policy,
        "transformer_layer_cls_to_wrap": fsdp.layer_cls_to_wrap,
        "reshard_after_forward": fsdp.reshard_after_forward,
        "cpu_ram_efficient_loading": fsdp.cpu_ram_efficient_loading,
        "activation_checkpointing": fsdp.activation_checkpointing,
    }


def resolved_section(*, target: Target, distribution: DistributionPlan, batch: BatchPlan, model: ModelInfo,
                     precision: str, attention: str, packing_attention: str | None,
                     version: str) -> dict[str, Any]:
    """What the compiler decided, in one place the runtime reads."""
    return {
        "strategy": distribution.strategy,
        "num_nodes": target.nodes,
        "processes_per_node": target.gpus_per_node,
        "world_size": target.world_size,
        "device": "cpu" if target.on_cpu else "cuda",
        "precision": precision,
        "attn_implementation": attention,
        "packing_attention": packing_attention,
        "micro_batch_size": batch.micro_batch_size,
        "gradient_accumulation_steps": batch.gradient_accumulation_steps,
        "effective_batch_size": batch.effective_batch_size,
        "deepspeed_stage": distribution.deepspeed_stage,
        "fsdp_layer_cls": distribution.fsdp.layer_cls_to_wrap if distribution.fsdp else None,
        "model_architecture": model.architecture,
        "model_parameters": model.parameters,
        "tunefile_version": version,
    }


def render_config_yaml(*, spec: Spec, config_name: str, version: str, target: Target,
                       distribution: DistributionPlan, batch: BatchPlan, model: ModelInfo, precision: str,
                       tf32: bool, attention: str, packing_attention: str | None, load_in_4bit: bool,
                       load_in_8bit: bool, optimizer: str) -> str:
    config = spec.model_dump(mode="json", exclude=set(_COMPILER_ONLY))
    config.update({
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "tf32": tf32,
        "load_in_4bit": load_in_4bit,
        "load_in_8bit": load_in_8bit,
        # A 4-bit base under a LoRA adapter is QLoRA, however the config spelt it.
        "adapter": "qlora" if spec.adapter and load_in_4bit else spec.adapter,
        "optimizer": optimizer,
        "flash_attention": attention == "flash_attention_2",
        "sdp_attention": attention == "sdpa",
        "eager_attention": attention == "eager",
        "datasets": [dataset_entry(d, top_level_chat_template=spec.chat_template) for d in spec.datasets],
        "deepspeed": "deepspeed.json" if distribution.strategy == "deepspeed" else None,
        "fsdp_config": None,
        "resolved": resolved_section(target=target, distribution=distribution, batch=batch, model=model,
                                     precision=precision, attention=attention,
                                     packing_attention=packing_attention, version=version),
    })
    if distribution.strategy == "fsdp" and distribution.fsdp is not None:
        config["fsdp_config"] = fsdp_section(distribution.fsdp)
        config["fsdp_version"] = distribution.fsdp.version
    header = (
        f"# Generated by tunefile {version} from {one_line(config_name)}; do not edit, recompile.\n"
        "# The fully resolved config the runtime reads: every default explicit, every choice made.\n"
        "# Relative paths (datasets, output_dir) are relative to the directory the job is launched from.\n"
    )
    return header + yaml.safe_dump(config, sort_keys=True, default_flow_style=False, allow_unicode=True)
