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
    Fp8Plan,
    FsdpPlan,
    KernelsPlan,
    LisaPlan,
    LoraPlan,
    MlflowPlan,
    ModelPlan,
    OptimizerPlan,
    OtelPlan,
    ParallelismPlan,
    QatPlan,
    ReloraPlan,
    RunPlan,
    SchedulePlan,
    SwanlabPlan,
    TiledMlpPlan,
    TrackersPlan,
    WandbPlan,
    WatchdogPlan,
    plan_to_dict,
)
from ..plan import Plan
from ..resolve.distribution import mesh_of
from ..shell import one_line
from ..spec import DEFAULT_LORA_TARGETS, DatasetSpec, Spec, mlflow_on, optimizer_arguments, swanlab_on, wandb_on

# What each type reads when the entry leaves it unset (Axolotl's defaults).
COMPLETION_FIELD = "text"
CHAT_DEFAULTS: dict[str, Any] = {"field_messages": "messages", "roles_to_train": ("assistant",),
                                 "train_on_eos": "turn"}
MESSAGE_PROPERTY_DEFAULTS = {"role": "role", "content": "content"}
THINKING_FIELD = "reasoning_content"  # Axolotl's default key of a message's reasoning trace
# Axolotl's gradient-checkpointing default: transformers' reentrant checkpointing.
GRADIENT_CHECKPOINTING_KWARGS = {"use_reentrant": True}
MLFLOW_DEFAULT_EXPERIMENT = "tunefile"
AXOLOTL_WARMUP_RATIO, AXOLOTL_WARMUP_CAP = 0.03, 100
MLFLOW_OFFLINE_URI = "file:./mlruns"  # relative to the launch directory, like output_dir
# Axolotl's ReLoRA defaults (its jagged scheduler and optimizer-state pruning).
RELORA_WARMUP_STEPS, RELORA_ANNEAL_STEPS, RELORA_MIN_LR_SCALE = 10, 1, 0.001
RELORA_PRUNE_RATIO, RELORA_RESET_PRUNE_RATIO = 0.9, 0.999
AXOLOTL_MIN_SAMPLE_LEN = 2  # Axolotl drops rows shorter than this when min_sample_len is not set

# Spec key → where its value lands in the plan ("section.field"). Keys absent here are read by the compiler
# alone (COMPILER_ONLY) or become several plan facts (precision, attention, distribution).
PLAN_LOCATION: dict[str, str] = {
    "base_model": "model.base_model", "trust_remote_code": "model.trust_remote_code",
    "tokenizer_type": "model.tokenizer_class", "special_tokens": "model.special_tokens", "tokens": "model.tokens",
    "shrink_embeddings": "model.shrink_embeddings", "adapter": "model.adapter",
    "lora_r": "model.lora.r", "lora_alpha": "model.lora.alpha", "lora_dropout": "model.lora.dropout",
    "lora_dropout_recompute": "model.lora.recompute_dropout",
    "lora_target_linear": "model.lora.target_linear", "lora_target_modules": "model.lora.target_modules",
    "lora_modules_to_save": "model.lora.modules_to_save", "lora_model_dir": "model.lora.model_dir",
    "load_in_4bit": "model.load_in_4bit", "load_in_8bit": "model.load_in_8bit", "tf32": "model.tf32",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "gradient_checkpointing_kwargs": "model.gradient_checkpointing_kwargs",
    "gradient_checkpointing_every_n_layers": "model.gradient_checkpointing_every_n_layers",
    "activation_offloading": "model.activation_offloading", "unfrozen_parameters": "model.unfrozen_parameters",
    "lora_target_parameters": "model.lora.target_parameters", "lora_fan_in_fan_out": "model.lora.fan_in_fan_out",
    "peft_use_rslora": "model.lora.use_rslora", "eot_tokens": "data.eot_tokens",
    "eval_sample_packing": "data.eval_packing", "chat_template_kwargs": "data.chat_template_kwargs",
    "skip_prepare_dataset": "data.skip_prepare",
    "adam_beta1": "optimizer.adam_beta1", "adam_beta2": "optimizer.adam_beta2",
    "adam_epsilon": "optimizer.adam_epsilon", "use_tensorboard": "trackers.tensorboard",
    "revision_of_model": "model.revision", "cosine_constant_lr_ratio": "schedule.min_lr_from",
    "early_stopping_patience": "schedule.early_stopping_patience", "model_config_overrides": "model.config_overrides",
    "quantize_moe_experts": "model.quantize_moe_experts", "reinit_weights": "model.from_scratch",
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
    "llama4_linearized_experts": "model.llama4_linearized_experts",
    "dataset_exact_deduplication": "data.exact_deduplication", "group_by_length": "data.group_by_length",
    "ple_cpu_offload": "model.ple_cpu_offload",
}
# Keys that become resolved facts rather than one plan field: precision (bf16/fp16/bfloat16/float16), the
# sections present only when switched on (lisa, relora, swanlab, otel), the attention kernel
# (flash/sdp/eager_attention), packing (sample_packing → data.packing_attention), the distribution
# (deepspeed, fsdp_*, strategy), and compiler inputs (target, model_type, model_parameters, tokenizer_config).
RESOLVED_OR_COMPILER_ONLY = ("bf16", "fp16", "attn_implementation", "sample_packing", "deepspeed", "fsdp_version",
                             "fsdp_config", "strategy", "target", "model_type", "model_parameters",
                             "tokenizer_config", "datasets", "pretraining_dataset", "plugins", "cut_cross_entropy",
                             "liger_rms_norm", "liger_glu_activation", "liger_layer_norm", "liger_rope",
                             "liger_rms_norm_gated", "liger_fused_linear_cross_entropy", "cosine_min_lr_ratio",
                             "eta_min", "use_wandb", "wandb_project", "wandb_entity",
                             "wandb_name", "wandb_run_id", "wandb_mode", "wandb_log_model", "mlflow_tracking_uri",
                             "mlflow_experiment_name", "mlflow_run_name", "model_quantization_config", "dp_shard_size",
                             "dp_replicate_size", "tensor_parallel_size", "context_parallel_size",
                             "optim_args", "qat",
                             "model_quantization_config_kwargs", "tokenizer_use_mistral_common",
                             "resize_token_embeddings_to_32x", "bfloat16", "float16", "peft", "relora",
                             "jagged_restart_warmup_steps", "jagged_restart_anneal_steps", "relora_prune_ratio",
                             "relora_prune_method", "streaming", "use_swanlab", "swanlab_project",
                             "swanlab_experiment_name", "swanlab_description", "swanlab_workspace", "swanlab_mode",
                             "use_otel_metrics", "otel_metrics_host", "otel_metrics_port", "lisa_n_layers",
                             "lisa_step_interval", "lisa_layers_attribute", "jagged_restart_steps",
                             "relora_cpu_offload", "min_sample_len", "tiled_mlp", "tiled_mlp_num_shards",
                             "tiled_mlp_use_original_mlp", "fp8", "fp8_config", "fp8_enable_fsdp_float8_all_gather",
                             "lr_quadratic_warmup", "device_map")


def dataset_plan(dataset: DatasetSpec) -> DatasetPlan:
    """One entry with the defaults of its type written out; keys its type does not read stay None."""
    chat = dataset.type == "chat_template"
    mappings = {**MESSAGE_PROPERTY_DEFAULTS, **(dataset.message_property_mappings or {})}
    thinking = dataset.field_thinking or THINKING_FIELD

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
        field_messages=chat_key("field_messages"),
        message_field_role=mappings["role"] if chat else None,
        message_field_content=mappings["content"] if chat else None, roles_to_train=chat_key("roles_to_train"),
        train_on_eos=chat_key("train_on_eos"), chat_template=dataset.chat_template if chat else None,
        field_thinking=thinking if chat else None,
        template_thinking_key=(dataset.template_thinking_key or thinking) if chat else None,
        drop_system_message=bool(dataset.drop_system_message) if chat else None,
    )


def lora_plan(spec: Spec) -> LoraPlan:
    regex = spec.lora_target_modules if isinstance(spec.lora_target_modules, str) else None
    names = None if spec.lora_target_linear or regex else tuple(spec.lora_target_modules or DEFAULT_LORA_TARGETS)
    return LoraPlan(r=spec.lora_r, alpha=spec.lora_alpha, dropout=spec.lora_dropout,
                    target_linear=spec.lora_target_linear, target_modules=names,
                    target_modules_regex=None if spec.lora_target_linear else regex,
                    target_parameters=tuple(spec.lora_target_parameters) if spec.lora_target_parameters else None,
                    fan_in_fan_out=spec.lora_fan_in_fan_out, use_rslora=spec.peft_use_rslora,
                    modules_to_save=tuple(spec.lora_modules_to_save) if spec.lora_modules_to_save else None,
                    model_dir=spec.lora_model_dir,
                    loftq_bits=spec.peft.loftq_config.loftq_bits if spec.peft and spec.peft.loftq_config else None,
                    recompute_dropout=spec.lora_dropout_recompute)


def lisa_plan(spec: Spec) -> LisaPlan | None:
    """LISA runs when both of its keys are set, as in Axolotl (the rules refuse one without the other)."""
    if spec.lisa_n_layers is None or spec.lisa_step_interval is None:
        return None
    return LisaPlan(n_layers=spec.lisa_n_layers, step_interval=spec.lisa_step_interval,
                    layers_attribute=spec.lisa_layers_attribute)


def relora_plan(spec: Spec) -> ReloraPlan | None:
    """Axolotl's defaults: warm up 10 steps and anneal 1 after/before each restart (an empty, false or zero
    value means the default, as Axolotl's `or` does), prune 90 % of the optimizer state (99.9 % with reset)."""
    if not spec.relora or spec.jagged_restart_steps is None:
        return None
    method = spec.relora_prune_method or "magnitude"
    ratio = spec.relora_prune_ratio
    if ratio is None:
        ratio = RELORA_RESET_PRUNE_RATIO if method == "reset" else RELORA_PRUNE_RATIO
    return ReloraPlan(restart_steps=spec.jagged_restart_steps,
                      warmup_steps=spec.jagged_restart_warmup_steps or RELORA_WARMUP_STEPS,
                      anneal_steps=spec.jagged_restart_anneal_steps or RELORA_ANNEAL_STEPS,
                      min_lr_scale=spec.cosine_min_lr_ratio or RELORA_MIN_LR_SCALE,
                      prune_ratio=ratio, prune_method=method, cpu_offload=spec.relora_cpu_offload)


def trackers_plan(spec: Spec) -> TrackersPlan:
    wandb = None
    if wandb_on(spec):
        offline = spec.offline or spec.wandb_mode == "offline"
        wandb = WandbPlan(project=spec.wandb_project or "tunefile", entity=spec.wandb_entity, name=spec.wandb_name,
                          run_id=spec.wandb_run_id, mode="offline" if offline else "online",
                          log_model=bool(spec.wandb_log_model) and not offline)
    mlflow = None
    if mlflow_on(spec):
        uri = spec.mlflow_tracking_uri or MLFLOW_OFFLINE_URI
        if spec.offline and not uri.startswith("file:"):
            uri = MLFLOW_OFFLINE_URI
        mlflow = MlflowPlan(tracking_uri=uri, experiment_name=spec.mlflow_experiment_name or MLFLOW_DEFAULT_EXPERIMENT,
                            run_name=spec.mlflow_run_name)
    swanlab = None
    if swanlab_on(spec):
        mode = "offline" if spec.offline else (spec.swanlab_mode or "cloud")
        swanlab = SwanlabPlan(project=spec.swanlab_project or "tunefile", experiment_name=spec.swanlab_experiment_name,
                              description=spec.swanlab_description, workspace=spec.swanlab_workspace, mode=mode)
    otel = OtelPlan(host=spec.otel_metrics_host, port=spec.otel_metrics_port) if spec.use_otel_metrics else None
    return TrackersPlan(tensorboard=spec.use_tensorboard, wandb=wandb, mlflow=mlflow, swanlab=swanlab, otel=otel)


def data_sources(spec: Spec) -> tuple[DatasetPlan, ...]:
    if spec.pretraining_dataset:
        return tuple(dataset_plan(d.model_copy(update={"type": "completion"})) for d in spec.pretraining_dataset)
    return tuple(dataset_plan(d) for d in spec.datasets)


def tiled_mlp_plan(spec: Spec) -> TiledMlpPlan | None:
    if not spec.tiled_mlp:
        return None
    return TiledMlpPlan(num_shards=spec.tiled_mlp_num_shards, use_original_mlp=spec.tiled_mlp_use_original_mlp)


def fp8_plan(spec: Spec) -> Fp8Plan | None:
    if not spec.fp8:
        return None
    return Fp8Plan(recipe=spec.fp8_config.recipe if spec.fp8_config else "tensorwise",
                   fsdp_float8_all_gather=spec.fp8_enable_fsdp_float8_all_gather)


def quadratic_warmup(spec: Spec) -> bool:
    """Axolotl warms up quadratically only with the cosine schedule."""
    return spec.lr_quadratic_warmup and spec.lr_scheduler == "cosine"


def streamed(spec: Spec) -> bool:
    """Rows read while training (pretraining_dataset, or datasets with streaming: true): no cache, no eval split."""
    return bool(spec.pretraining_dataset) or spec.streaming


def distribution_plan(plan: Plan) -> DistributionPlan:
    target, distribution = plan.target, plan.distribution
    fsdp = distribution.fsdp if distribution.strategy == "fsdp" else None
    mesh = mesh_of(distribution)  # N-D parallelism (HSDP, tensor, context), as resolve/distribution.py filled it in
    return DistributionPlan(
        strategy=distribution.strategy, device="cpu" if target.on_cpu else "cuda", num_nodes=target.nodes,
        processes_per_node=target.gpus_per_node, world_size=target.world_size,
        fsdp=FsdpPlan(version=fsdp.version, offload_params=fsdp.offload_params,
                      state_dict_type=fsdp.state_dict_type, auto_wrap_policy=fsdp.auto_wrap_policy,
                      layer_cls_to_wrap=fsdp.layer_cls_to_wrap, reshard_after_forward=fsdp.reshard_after_forward,
                      cpu_ram_efficient_loading=fsdp.cpu_ram_efficient_loading,
                      activation_checkpointing=fsdp.activation_checkpointing) if fsdp else None,
        deepspeed=DeepSpeedPlan(stage=int(distribution.deepspeed_stage or 0), config_file="deepspeed.json",
                                leaf_module_class=distribution.deepspeed_leaf_module,
                                frozen_base_whole=distribution.deepspeed_frozen_base_whole)
        if distribution.strategy == "deepspeed" else None,
        parallelism=ParallelismPlan(dp_replicate_size=mesh.dp_replicate, dp_shard_size=mesh.dp_shard,
                                    tensor_parallel_size=mesh.tensor_parallel,
                                    context_parallel_size=mesh.context_parallel) if mesh else None,
    )


def fsdp_checkpoints(plan: Plan) -> bool:
    fsdp = plan.distribution.fsdp
    return plan.distribution.strategy == "fsdp" and fsdp is not None and fsdp.activation_checkpointing


def min_lr_ratio(spec: Spec) -> float:
    if spec.cosine_min_lr_ratio is not None:
        return spec.cosine_min_lr_ratio
    return spec.eta_min / spec.learning_rate if spec.eta_min is not None else 0.0


def build_run_plan(plan: Plan) -> RunPlan:
    spec = plan.spec
    # Axolotl's warmup when neither key is set: 3% of the steps, at most 100.
    default_warmup = spec.warmup_steps is None and spec.warmup_ratio is None
    warmup_ratio = AXOLOTL_WARMUP_RATIO if default_warmup else spec.warmup_ratio
    warmup_cap = AXOLOTL_WARMUP_CAP if default_warmup else None
    # A 4-bit base under a LoRA adapter is QLoRA, however the config spelt it.
    adapter = "qlora" if spec.adapter and plan.load_in_4bit else spec.adapter
    return RunPlan(
        run_plan_version=RUN_PLAN_VERSION, tunefile_version=plan.tunefile_version, seed=spec.seed,
        offline=spec.offline,
        data=DataPlan(
            datasets=data_sources(spec), sequence_len=spec.sequence_len,
            micro_batch_size=plan.batch.micro_batch_size,
            packing_attention=plan.packing_attention if spec.sample_packing else None,
            pad_to_sequence_len=spec.pad_to_sequence_len, train_on_inputs=spec.train_on_inputs,
            val_set_size=0.0 if streamed(spec) else spec.val_set_size,
            prepared_path=spec.dataset_prepared_path,
            chat_template=spec.chat_template, chat_template_jinja=spec.chat_template_jinja,
            chat_template_kwargs=dict(spec.chat_template_kwargs or {}),
            eot_tokens=tuple(spec.eot_tokens) if spec.eot_tokens else None,
            # Axolotl packs evaluation only when training packs.
            eval_packing=spec.sample_packing and spec.eval_sample_packing is not False,
            skip_prepare=spec.skip_prepare_dataset or streamed(spec),
            streaming=streamed(spec),
            exact_deduplication=spec.dataset_exact_deduplication,
            # Axolotl's sampler groups by length only when it does not pack.
            group_by_length=spec.group_by_length and not spec.sample_packing,
            min_sample_len=spec.min_sample_len or AXOLOTL_MIN_SAMPLE_LEN),
        model=ModelPlan(
            base_model=spec.base_model, revision=spec.revision_of_model, architecture=plan.model.architecture,
            parameters=plan.model.parameters, config_overrides=dict(spec.model_config_overrides or {}),
            quantization_config={"class": spec.model_quantization_config,
                                 "kwargs": dict(spec.model_quantization_config_kwargs or {})}
            if spec.model_quantization_config else None,
            quantize_moe_experts=spec.quantize_moe_experts, from_scratch=spec.reinit_weights,
            tokenizer=spec.tokenizer_config or spec.base_model, tokenizer_class=spec.tokenizer_type,
            tokenizer_backend="mistral_common" if spec.tokenizer_use_mistral_common else "huggingface",
            pad_embeddings_to_multiple_of=32 if spec.resize_token_embeddings_to_32x else None,
            special_tokens=spec.special_tokens.model_dump(exclude_none=True) if spec.special_tokens else None,
            tokens=tuple(spec.tokens) if spec.tokens else None, trust_remote_code=spec.trust_remote_code,
            precision=plan.precision, tf32=plan.tf32, attn_implementation=plan.attention,
            load_in_4bit=plan.load_in_4bit, load_in_8bit=plan.load_in_8bit,
            # FSDP's own activation checkpointing replaces transformers' (a warning says so).
            gradient_checkpointing=bool(spec.gradient_checkpointing) and not fsdp_checkpoints(plan),
            gradient_checkpointing_kwargs=dict(spec.gradient_checkpointing_kwargs or GRADIENT_CHECKPOINTING_KWARGS),
            gradient_checkpointing_every_n_layers=spec.gradient_checkpointing_every_n_layers,
            activation_offloading=bool(spec.activation_offloading) or spec.gradient_checkpointing == "offload",
            half_precision_weights=spec.bfloat16 or spec.float16,
            llama4_linearized_experts=spec.llama4_linearized_experts, ple_cpu_offload=spec.ple_cpu_offload,
            unfrozen_parameters=tuple(spec.unfrozen_parameters) if spec.unfrozen_parameters and not adapter
            else None,
            shrink_embeddings=spec.shrink_embeddings, adapter=adapter, lora=lora_plan(spec) if adapter else None,
            qat=QatPlan(**spec.qat.model_dump()) if spec.qat else None,
            lisa=lisa_plan(spec), relora=relora_plan(spec), tiled_mlp=tiled_mlp_plan(spec), fp8=fp8_plan(spec)),
        kernels=KernelsPlan(**plan.kernels),
        optimizer=OptimizerPlan(name=plan.optimizer, learning_rate=spec.learning_rate,
                                weight_decay=spec.weight_decay, max_grad_norm=spec.max_grad_norm,
                                adam_beta1=spec.adam_beta1, adam_beta2=spec.adam_beta2,
                                adam_epsilon=spec.adam_epsilon,
                                bf16_stochastic_round=optimizer_arguments(spec).get("bf16_stochastic_round") is True),
        schedule=SchedulePlan(
            gradient_accumulation_steps=plan.batch.gradient_accumulation_steps, max_steps=spec.max_steps,
            num_epochs=None if spec.max_steps else spec.num_epochs, lr_scheduler=spec.lr_scheduler,
            warmup_steps=spec.warmup_steps, warmup_ratio=warmup_ratio, warmup_max_steps=warmup_cap,
            warmup_shape="quadratic" if quadratic_warmup(spec) else "linear",
            # Axolotl's quadratic-warmup cosine has no floor: it drops cosine_min_lr_ratio (a warning says so).
            min_lr_ratio=0.0 if quadratic_warmup(spec) else min_lr_ratio(spec),
            min_lr_from=spec.cosine_constant_lr_ratio or None,
            early_stopping_patience=spec.early_stopping_patience, logging_steps=spec.logging_steps,
            eval_steps=None if streamed(spec) else spec.eval_steps,
            evals_per_epoch=None if streamed(spec) else spec.evals_per_epoch),
        watchdog=WatchdogPlan(loss_threshold=spec.loss_watchdog_threshold, loss_patience=spec.loss_watchdog_patience),
        checkpointing=CheckpointPlan(
            output_dir=spec.output_dir, save_steps=spec.save_steps, saves_per_epoch=spec.saves_per_epoch,
            save_total_limit=spec.save_total_limit, resume_from_checkpoint=spec.resume_from_checkpoint,
            auto_resume=spec.auto_resume_from_checkpoints),
        trackers=trackers_plan(spec),
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
