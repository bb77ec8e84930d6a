"""config.yaml: the run plan (tunefile.schemas.run_plan), the runtime's only input.

``build_run_plan`` turns the compiler's Plan into the contract's types, deciding every default here so the
runtime decides none; ``render_config_yaml`` writes it. ``PLAN_LOCATION`` says where each user-facing key
lands in the plan: tests compare the Spec's declared defaults with what a compiled plan holds, key by key.
"""

from __future__ import annotations

from typing import Any

import yaml

from ...schemas.run_plan import (
    RUN_PLAN_VERSION,
    CheckpointPlan,
    DataPlan,
    DatasetPlan,
    DeepSpeedPlan,
    DistributionPlan,
    FsdpPlan,
    LoraPlan,
    ModelPlan,
    OptimizerPlan,
    RunPlan,
    SchedulePlan,
    WatchdogPlan,
    plan_to_dict,
)
from ..plan import Plan
from ..shell import one_line
from ..spec import DatasetSpec, Spec

# What each type reads when the entry leaves it unset (Axolotl's defaults).
COMPLETION_FIELD = "text"
CHAT_DEFAULTS: dict[str, Any] = {"field_messages": "messages", "message_field_role": "role",
                                 "message_field_content": "content", "roles_to_train": ("assistant",),
                                 "train_on_eos": "turn"}
DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")  # peft's choice for Llama-style attention when none is named

# Spec key → where its value lands in the plan ("section.field"). Keys absent here are read by the compiler
# alone (COMPILER_ONLY) or become several plan facts (precision, attention, distribution).
PLAN_LOCATION: dict[str, str] = {
    "base_model": "model.base_model", "trust_remote_code": "model.trust_remote_code",
    "tokenizer_type": "model.tokenizer_class", "special_tokens": "model.special_tokens", "tokens": "model.tokens",
    "shrink_embeddings": "model.shrink_embeddings", "adapter": "model.adapter",
    "lora_r": "model.lora.r", "lora_alpha": "model.lora.alpha", "lora_dropout": "model.lora.dropout",
    "lora_target_linear": "model.lora.target_linear", "lora_target_modules": "model.lora.target_modules",
    "lora_modules_to_save": "model.lora.modules_to_save", "lora_model_dir": "model.lora.model_dir",
    "load_in_4bit": "model.load_in_4bit", "load_in_8bit": "model.load_in_8bit", "tf32": "model.tf32",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "chat_template": "data.chat_template", "chat_template_jinja": "data.chat_template_jinja",
    "train_on_inputs": "data.train_on_inputs", "val_set_size": "data.val_set_size",
    "dataset_prepared_path": "data.prepared_path", "sequence_len": "data.sequence_len",
    "pad_to_sequence_len": "data.pad_to_sequence_len", "micro_batch_size": "data.micro_batch_size",
    "gradient_accumulation_steps": "schedule.gradient_accumulation_steps", "num_epochs": "schedule.num_epochs",
    "max_steps": "schedule.max_steps", "lr_scheduler": "schedule.lr_scheduler",
    "warmup_steps": "schedule.warmup_steps", "warmup_ratio": "schedule.warmup_ratio",
    "logging_steps": "schedule.logging_steps", "eval_steps": "schedule.eval_steps",
    "evals_per_epoch": "schedule.evals_per_epoch",
    "optimizer": "optimizer.name", "learning_rate": "optimizer.learning_rate",
    "weight_decay": "optimizer.weight_decay", "max_grad_norm": "optimizer.max_grad_norm",
    "loss_watchdog_threshold": "watchdog.loss_threshold", "loss_watchdog_patience": "watchdog.loss_patience",
    "output_dir": "checkpointing.output_dir", "save_steps": "checkpointing.save_steps",
    "saves_per_epoch": "checkpointing.saves_per_epoch", "save_total_limit": "checkpointing.save_total_limit",
    "resume_from_checkpoint": "checkpointing.resume_from_checkpoint",
    "auto_resume_from_checkpoints": "checkpointing.auto_resume",
    "seed": "seed", "offline": "offline",
}
# Keys that become resolved facts rather than one plan field: precision (bf16/fp16), the attention kernel
# (flash/sdp/eager_attention), packing (sample_packing → data.packing_attention), the distribution
# (deepspeed, fsdp_*, strategy), and compiler inputs (target, model_type, model_parameters, tokenizer_config).
RESOLVED_OR_COMPILER_ONLY = ("bf16", "fp16", "flash_attention", "sdp_attention", "eager_attention",
                             "sample_packing", "deepspeed", "fsdp_version", "fsdp_config", "strategy", "target",
                             "model_type", "model_parameters", "tokenizer_config", "datasets")


def dataset_plan(dataset: DatasetSpec) -> DatasetPlan:
    """One entry with the defaults of its type written out; keys its type does not read stay None."""
    chat = dataset.type == "chat_template"

    def chat_key(name: str) -> Any:
        value = getattr(dataset, name)
        if not chat:
            return None
        value = CHAT_DEFAULTS[name] if value is None else value
        return tuple(value) if isinstance(value, list) else value

    return DatasetPlan(
        path=dataset.path, type=dataset.type, name=dataset.name, split=dataset.split,
        data_files=tuple(dataset.data_files) if dataset.data_files else None, ds_type=dataset.ds_type,
        field=(dataset.field or COMPLETION_FIELD) if dataset.type == "completion" else None,
        field_messages=chat_key("field_messages"), message_field_role=chat_key("message_field_role"),
        message_field_content=chat_key("message_field_content"), roles_to_train=chat_key("roles_to_train"),
        train_on_eos=chat_key("train_on_eos"), chat_template=dataset.chat_template if chat else None,
    )


def lora_plan(spec: Spec) -> LoraPlan:
    return LoraPlan(r=spec.lora_r, alpha=spec.lora_alpha, dropout=spec.lora_dropout,
                    target_linear=spec.lora_target_linear,
                    target_modules=None if spec.lora_target_linear
                    else tuple(spec.lora_target_modules or DEFAULT_LORA_TARGETS),
                    modules_to_save=tuple(spec.lora_modules_to_save) if spec.lora_modules_to_save else None,
                    model_dir=spec.lora_model_dir)


def distribution_plan(plan: Plan) -> DistributionPlan:
    target, distribution = plan.target, plan.distribution
    fsdp = distribution.fsdp if distribution.strategy == "fsdp" else None
    return DistributionPlan(
        strategy=distribution.strategy, device="cpu" if target.on_cpu else "cuda", num_nodes=target.nodes,
        processes_per_node=target.gpus_per_node, world_size=target.world_size,
        fsdp=FsdpPlan(version=fsdp.version, offload_params=fsdp.offload_params,
                      state_dict_type=fsdp.state_dict_type, auto_wrap_policy=fsdp.auto_wrap_policy,
                      layer_cls_to_wrap=fsdp.layer_cls_to_wrap, reshard_after_forward=fsdp.reshard_after_forward,
                      cpu_ram_efficient_loading=fsdp.cpu_ram_efficient_loading,
                      activation_checkpointing=fsdp.activation_checkpointing) if fsdp else None,
        deepspeed=DeepSpeedPlan(stage=int(distribution.deepspeed_stage or 0), config_file="deepspeed.json")
        if distribution.strategy == "deepspeed" else None,
    )


def build_run_plan(plan: Plan) -> RunPlan:
    spec = plan.spec
    # A 4-bit base under a LoRA adapter is QLoRA, however the config spelt it.
    adapter = "qlora" if spec.adapter and plan.load_in_4bit else spec.adapter
    return RunPlan(
        run_plan_version=RUN_PLAN_VERSION, tunefile_version=plan.tunefile_version, seed=spec.seed,
        offline=spec.offline,
        data=DataPlan(
            datasets=tuple(dataset_plan(d) for d in spec.datasets), sequence_len=spec.sequence_len,
            micro_batch_size=plan.batch.micro_batch_size,
            packing_attention=plan.packing_attention if spec.sample_packing else None,
            pad_to_sequence_len=spec.pad_to_sequence_len, train_on_inputs=spec.train_on_inputs,
            val_set_size=spec.val_set_size, prepared_path=spec.dataset_prepared_path,
            chat_template=spec.chat_template, chat_template_jinja=spec.chat_template_jinja),
        model=ModelPlan(
            base_model=spec.base_model, architecture=plan.model.architecture, parameters=plan.model.parameters,
            tokenizer=spec.tokenizer_config or spec.base_model, tokenizer_class=spec.tokenizer_type,
            special_tokens=spec.special_tokens.model_dump(exclude_none=True) if spec.special_tokens else None,
            tokens=tuple(spec.tokens) if spec.tokens else None, trust_remote_code=spec.trust_remote_code,
            precision=plan.precision, tf32=plan.tf32, attn_implementation=plan.attention,
            load_in_4bit=plan.load_in_4bit, load_in_8bit=plan.load_in_8bit,
            gradient_checkpointing=spec.gradient_checkpointing, shrink_embeddings=spec.shrink_embeddings,
            adapter=adapter, lora=lora_plan(spec) if adapter else None),
        optimizer=OptimizerPlan(name=plan.optimizer, learning_rate=spec.learning_rate,
                                weight_decay=spec.weight_decay, max_grad_norm=spec.max_grad_norm),
        schedule=SchedulePlan(
            gradient_accumulation_steps=plan.batch.gradient_accumulation_steps, max_steps=spec.max_steps,
            num_epochs=None if spec.max_steps else spec.num_epochs, lr_scheduler=spec.lr_scheduler,
            warmup_steps=spec.warmup_steps, warmup_ratio=spec.warmup_ratio, logging_steps=spec.logging_steps,
            eval_steps=spec.eval_steps, evals_per_epoch=spec.evals_per_epoch),
        watchdog=WatchdogPlan(loss_threshold=spec.loss_watchdog_threshold, loss_patience=spec.loss_watchdog_patience),
        checkpointing=CheckpointPlan(
            output_dir=spec.output_dir, save_steps=spec.save_steps, saves_per_epoch=spec.saves_per_epoch,
            save_total_limit=spec.save_total_limit, resume_from_checkpoint=spec.resume_from_checkpoint,
            auto_resume=spec.auto_resume_from_checkpoints),
        distribution=distribution_plan(plan),
    )


def render_config_yaml(run_plan: RunPlan, *, config_name: str) -> str:
    header = (
        f"# Generated by tunefile {run_plan.tunefile_version} from {one_line(config_name)}; do not edit, recompile.\n"
        f"# The run plan (version {run_plan.run_plan_version}): the runtime reads this file and nothing else. Every\n"
        "# default is decided, each fact appears once, in the section of the component that reads it.\n"
        "# Relative paths (datasets, output_dir) are relative to the directory the job is launched from.\n"
    )
    body = yaml.safe_dump(plan_to_dict(run_plan), sort_keys=True, default_flow_style=False, allow_unicode=True)
    return header + body
