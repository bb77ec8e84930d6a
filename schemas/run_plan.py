"""The run plan: the one contract between the compiler and the runtime.

The compiler resolves a user's YAML into a ``RunPlan`` and writes it as a bundle's ``config.yaml``; the
runtime reads that file back into the same types and reads nothing else. Both sides import this module and
neither imports the other, so it holds no logic of either side: only the shape of the plan and a strict
parser. It imports nothing outside the standard library (a login node has no torch, a GPU node may have no
pydantic).

Rules the types encode:
- every default is already decided: a field is ``None`` only where ``None`` is a meaning the field documents
  ("no adapter", "no checkpoint cadence"), never "the runtime picks";
- each fact appears once, in the section of the component that reads it (data, model, optimizer,
  schedule, watchdog, checkpointing, distribution);
- sections that mean nothing for the run are absent (``lora`` without an adapter, ``fsdp`` unless the
  strategy is FSDP, ``deepspeed`` unless it is DeepSpeed);
- parsing is strict: a missing key, an unknown key, a value of the wrong type or another ``run_plan_version``
  is an error naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

RUN_PLAN_VERSION = 6

Precision = Literal["fp32", "bf16", "fp16"]
Strategy = Literal["single", "ddp", "fsdp", "deepspeed"]
PackingAttention = Literal["torch_varlen", "flash_varlen", "block_mask"]

# Optional sections: written only when they apply (None is then "absent" in the YAML, not `key: null`).
OMIT_WHEN_NONE = {"omit_when_none": True}


class RunPlanError(ValueError):
    """The mapping is not a run plan of this version; the message names the key."""


@dataclass(frozen=True)
class DatasetPlan:
    """One `datasets:` entry with the defaults of its type written out; fields a type does not use are None."""

    path: str
    # alpaca:chat, alpaca:phi and jeopardy: Axolotl's instruction formats with other prompt wordings
    type: Literal["alpaca", "alpaca:chat", "alpaca:phi", "jeopardy", "chat_template", "completion", "pretokenized"]
    name: str | None  # Hub dataset configuration
    split: str
    data_files: tuple[str, ...] | None
    ds_type: Literal["json", "parquet", "csv", "text"] | None  # None: from the file extension
    field: str | None  # completion: the text column
    field_messages: str | None  # chat_template: the messages column …
    message_field_role: str | None  # … and the message keys holding the role and the content
    message_field_content: str | None  # (Axolotl's message_property_mappings, or its older spelling)
    roles_to_train: tuple[str, ...] | None
    train_on_eos: Literal["turn", "last", "all", "none"] | None
    chat_template: str | None  # chat_template: None = the tokenizer's own template
    # chat_template: the message key holding a reasoning trace, and the key the template reads it from
    # (Axolotl's field_thinking and template_thinking_key); the trace is renamed from one to the other.
    field_thinking: str | None
    template_thinking_key: str | None
    drop_system_message: bool | None  # chat_template: leave a conversation's leading system turn out


@dataclass(frozen=True)
class DataPlan:
    """What the data pipeline reads: sources, tokenisation options, the prepared-data cache, batching."""

    datasets: tuple[DatasetPlan, ...]
    sequence_len: int
    micro_batch_size: int
    # Sample packing, and the attention isolation the compiler chose for it; None: no packing.
    packing_attention: PackingAttention | None
    pad_to_sequence_len: bool
    train_on_inputs: bool
    val_set_size: float  # < 1: a fraction of the rows; >= 1: a count; 0: no evaluation split
    prepared_path: str
    chat_template: str | None
    chat_template_jinja: str | None
    chat_template_kwargs: dict[str, Any]  # extra variables the chat template is rendered with
    # Tokens that end a turn (Axolotl's eot_tokens); train_on_eos decides which of them are trained on.
    # None: the chat template's own end-of-turn token (the tokenizer's eos token).
    eot_tokens: tuple[str, ...] | None
    eval_packing: bool  # pack evaluation batches too (Axolotl's eval_sample_packing, default: as training)
    # Tokenise in the training process and keep nothing on disk (Axolotl's skip_prepare_dataset): no cache.
    skip_prepare: bool
    # Read the sources lazily, tokenising and packing as training goes, with no cache and no held-out split
    # (Axolotl's pretraining_dataset, or datasets with streaming: true). Training then needs schedule.max_steps.
    streaming: bool
    # Drop rows whose tokens exactly repeat an earlier row's, before the evaluation split is taken
    # (Axolotl's dataset_exact_deduplication).
    exact_deduplication: bool
    # Without packing: draw batches of rows of similar length, so less of each batch is padding (Axolotl's
    # group_by_length, as Hugging Face's length-grouped sampler does it).
    group_by_length: bool
    # Rows shorter than this many tokens are dropped (Axolotl's min_sample_len, or 2).
    min_sample_len: int


@dataclass(frozen=True)
class LoraPlan:
    r: int
    alpha: int
    dropout: float
    target_linear: bool
    target_modules: tuple[str, ...] | None  # None with target_linear (every linear layer but the output head)
    target_modules_regex: str | None  # instead of target_modules: a regular expression a module's full name
    # must match from its start to its end (Axolotl passes a string lora_target_modules to peft this way)
    target_parameters: tuple[str, ...] | None  # nn.Parameter names (MoE experts) that get LoRA too
    fan_in_fan_out: bool  # the layer stores its weight as (in, out), as GPT-2's Conv1D does
    use_rslora: bool  # scale updates by alpha / sqrt(r) instead of alpha / r
    modules_to_save: tuple[str, ...] | None
    model_dir: str | None  # an existing adapter to continue training
    # LoftQ: initialise the adapter so that base + adapter approximates the 16-bit weights quantised to this
    # many bits (Axolotl's peft.loftq_config.loftq_bits); None: peft's default initialisation.
    loftq_bits: int | None
    # Draw each dropout mask again in the backward from a seed instead of keeping the dropped input and the mask
    # (tunefile's lora_dropout_recompute; runtime/lora_dropout.py); false: peft's own dropout.
    recompute_dropout: bool


@dataclass(frozen=True)
class LisaPlan:
    """LISA (Axolotl's lisa_*): full fine-tuning where only n_layers decoder layers, drawn at random every
    step_interval optimizer steps, train; embeddings and the output head always train."""

    n_layers: int
    step_interval: int
    layers_attribute: str  # the attribute path of the decoder layer list, e.g. model.layers


@dataclass(frozen=True)
class ReloraPlan:
    """ReLoRA (Axolotl's relora and jagged_restart_*): every restart_steps optimizer steps the LoRA update is
    merged into the base weights, the adapter starts again, the optimizer state is pruned and the learning
    rate warms up again, so that many low-rank updates add up to a high-rank one."""

    restart_steps: int
    warmup_steps: int  # after each restart (Axolotl: jagged_restart_warmup_steps, or 10)
    anneal_steps: int  # before each restart (Axolotl: jagged_restart_anneal_steps, or 1)
    min_lr_scale: float  # the floor of the restart's warm-up/anneal factor (Axolotl: cosine_min_lr_ratio or 0.001)
    prune_ratio: float  # the share of optimizer state reset at a restart (prune_method chooses which)
    prune_method: Literal["magnitude", "random", "reset"]
    cpu_offload: bool  # merge on the CPU to save GPU memory


@dataclass(frozen=True)
class QatPlan:
    """Quantisation-aware training (Axolotl's qat): torchao fake-quantises the linear layers' weights (and
    activations) in forward, so the model learns to survive the quantisation applied after training."""

    weight_dtype: Literal["int4", "int8", "float8_e4m3fn", "nvfp4", "mxfp4", "ternary"]
    activation_dtype: Literal["int4", "int8", "float8_e4m3fn", "nvfp4", "mxfp4"] | None
    group_size: int  # elements per quantisation group of a weight row
    quantize_embedding: bool
    fake_quant_after_n_steps: int | None  # None: from the first step


@dataclass(frozen=True)
class TiledMlpPlan:
    """ALST's tiled MLP (Axolotl's tiled_mlp): each MLP runs over the sequence in num_shards slices, forward and
    backward, so its intermediate activations exist for one slice at a time (long sequences)."""

    num_shards: int | None  # None: ceil(sequence length / 32768), decided per batch as Axolotl does
    use_original_mlp: bool  # tile the model's own MLP module (false: a generic gated MLP on its weights)


@dataclass(frozen=True)
class Fp8Plan:
    """FP8 training with torchao (Axolotl's fp8): the linear layers compute in float8 with dynamic scaling."""

    recipe: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"]
    fsdp_float8_all_gather: bool  # FSDP2 gathers the float8 weights instead of the bf16 ones


@dataclass(frozen=True)
class ModelPlan:
    """The base model, its tokenizer and vocabulary, precision, attention and the adapter."""

    base_model: str
    revision: str | None  # a Hub branch, tag or commit of base_model (Axolotl's revision_of_model)
    architecture: str | None
    parameters: int | None
    # Overrides of the model's configuration (Axolotl's model_config), e.g. {output_router_logits: true}: the
    # MoE router's auxiliary loss is then added to the training loss, as transformers' own loss would.
    config_overrides: dict[str, Any]
    # A transformers quantisation config the weights load with, e.g. {class: Mxfp4Config, kwargs: {dequantize:
    # true}} (Axolotl's model_quantization_config); None: none.
    quantization_config: dict[str, Any] | None
    # With load_in_4bit/8bit: also quantise MoE expert weights stored as 3-D parameters (Axolotl's
    # quantize_moe_experts), which bitsandbytes' nn.Linear replacement does not reach.
    quantize_moe_experts: bool
    # Build the architecture from its configuration with fresh random weights (seeded) instead of loading the
    # checkpoint's (Axolotl's reinit_weights: pretraining from scratch).
    from_scratch: bool
    tokenizer: str  # folder or hub id the tokenizer loads from
    tokenizer_class: str | None  # a transformers class name; None: AutoTokenizer
    tokenizer_backend: Literal["huggingface", "mistral_common"]  # mistral_common: Axolotl's
    # tokenizer_use_mistral_common (the mistral-common package's tokenizer, through transformers)
    # Round the embedding matrix up to a multiple of this when resizing it (Axolotl's
    # resize_token_embeddings_to_32x); None: exactly the tokenizer's size.
    pad_embeddings_to_multiple_of: int | None
    special_tokens: dict[str, Any] | None
    tokens: tuple[str, ...] | None  # added to the vocabulary
    trust_remote_code: bool
    precision: Precision
    tf32: bool
    attn_implementation: str
    load_in_4bit: bool
    load_in_8bit: bool
    gradient_checkpointing: bool
    gradient_checkpointing_kwargs: dict[str, Any]  # passed to transformers' gradient_checkpointing_enable
    # Checkpoint decoder layers 0, n, 2n, …; the others keep their activations (1: every layer).
    gradient_checkpointing_every_n_layers: int
    # Keep the activations saved for backward in pinned CPU memory (Axolotl's activation_offloading, and
    # gradient_checkpointing: offload, which offloads the checkpointed layer inputs).
    activation_offloading: bool
    # Every weight, the trained ones too, in the run's half precision, with no fp32 master copy (Axolotl's
    # bfloat16: true / float16: true); false: full fine-tuning keeps fp32 master weights.
    half_precision_weights: bool
    # Llama 4: replace each fused expert tensor with one nn.Linear per expert and projection, so LoRA and
    # 4-bit quantisation reach the experts (Axolotl's llama4_linearized_experts).
    llama4_linearized_experts: bool
    # Keep the parameters the model lists in _no_placement_params (huge per-layer embeddings) in host memory
    # (Axolotl's ple_cpu_offload).
    ple_cpu_offload: bool
    # Full fine-tuning only: train just the parameters whose names match one of these regular expressions
    # (Axolotl's unfrozen_parameters); None: every parameter trains.
    unfrozen_parameters: tuple[str, ...] | None
    shrink_embeddings: bool
    adapter: Literal["lora", "qlora"] | None
    lora: LoraPlan | None = field(default=None, metadata=OMIT_WHEN_NONE)
    qat: QatPlan | None = field(default=None, metadata=OMIT_WHEN_NONE)
    lisa: LisaPlan | None = field(default=None, metadata=OMIT_WHEN_NONE)
    relora: ReloraPlan | None = field(default=None, metadata=OMIT_WHEN_NONE)
    tiled_mlp: TiledMlpPlan | None = field(default=None, metadata=OMIT_WHEN_NONE)
    fp8: Fp8Plan | None = field(default=None, metadata=OMIT_WHEN_NONE)


@dataclass(frozen=True)
class KernelsPlan:
    """Fused kernels patched into the model (Axolotl's Liger and cut-cross-entropy plugins). Each one the
    runtime cannot use on the machine it lands on (package missing, no CUDA) falls back to the plain PyTorch
    code, and says so in metrics.jsonl's runtime decisions."""

    liger_rms_norm: bool
    liger_glu_activation: bool
    liger_layer_norm: bool
    liger_rope: bool
    liger_rms_norm_gated: bool
    # The loss: at most one of these is true. Both compute the cross-entropy from the hidden states in
    # chunks, never materialising the (tokens × vocabulary) logits.
    liger_fused_linear_cross_entropy: bool
    cut_cross_entropy: bool


@dataclass(frozen=True)
class OptimizerPlan:
    name: str
    learning_rate: float
    weight_decay: float
    max_grad_norm: float  # 0: no clipping (the norm is still measured, for the watchdog)
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    # torchao's low-bit AdamW: round bf16 weights stochastically when it updates them (Axolotl's
    # optim_args: {bf16_stochastic_round: true}); false for every other optimizer.
    bf16_stochastic_round: bool


@dataclass(frozen=True)
class WandbPlan:
    project: str
    entity: str | None
    name: str | None  # the run's display name; None: wandb picks one
    run_id: str | None
    mode: Literal["online", "offline"]  # offline when the config says offline: true
    log_model: bool  # upload the final adapter or model as an artifact (never in offline mode)


@dataclass(frozen=True)
class MlflowPlan:
    tracking_uri: str  # a file:// folder when offline
    experiment_name: str
    run_name: str | None


@dataclass(frozen=True)
class SwanlabPlan:
    project: str
    experiment_name: str | None
    description: str | None
    workspace: str | None
    mode: Literal["cloud", "local", "offline", "disabled"]  # offline when the config says offline: true


@dataclass(frozen=True)
class OtelPlan:
    """OpenTelemetry metrics (Axolotl's use_otel_metrics): training metrics served for Prometheus to scrape."""

    host: str
    port: int


@dataclass(frozen=True)
class TrackersPlan:
    """Experiment trackers fed with the same metrics as metrics.jsonl (rank 0 only)."""

    tensorboard: bool  # event files under output_dir/runs
    wandb: WandbPlan | None = field(default=None, metadata=OMIT_WHEN_NONE)
    mlflow: MlflowPlan | None = field(default=None, metadata=OMIT_WHEN_NONE)
    swanlab: SwanlabPlan | None = field(default=None, metadata=OMIT_WHEN_NONE)
    otel: OtelPlan | None = field(default=None, metadata=OMIT_WHEN_NONE)


@dataclass(frozen=True)
class SchedulePlan:
    """How long to train, the learning-rate schedule, and how often to log and evaluate."""

    gradient_accumulation_steps: int
    max_steps: int | None  # exactly one of max_steps and num_epochs is set
    num_epochs: float | None
    lr_scheduler: str
    warmup_steps: int | None  # at most one of warmup_steps and warmup_ratio is set; neither: no warmup
    warmup_ratio: float | None  # warmup = int(ratio × total steps) (rounded down, as Axolotl) …
    warmup_max_steps: int | None  # … and at most this many (Axolotl's default warmup: 3%, at most 100)
    warmup_shape: Literal["linear", "quadratic"]  # quadratic: Axolotl's lr_quadratic_warmup
    # Cosine: the learning rate decays to this fraction of its peak (Axolotl's cosine_min_lr_ratio, or eta_min
    # as a fraction of learning_rate) …
    min_lr_ratio: float
    # … reaching it at this fraction of the steps and staying there (Axolotl's cosine_constant_lr_ratio);
    # None: at the last step.
    min_lr_from: float | None
    logging_steps: int
    eval_steps: int | None  # at most one of eval_steps and evals_per_epoch; neither: no evaluation
    evals_per_epoch: int | None
    # Stop when the evaluation loss has not improved for this many evaluations in a row (Axolotl's
    # early_stopping_patience); None: never.
    early_stopping_patience: int | None


@dataclass(frozen=True)
class WatchdogPlan:
    """A non-finite loss or gradient norm always stops the run; the threshold is Axolotl's loss watchdog."""

    loss_threshold: float | None
    loss_patience: int


@dataclass(frozen=True)
class CheckpointPlan:
    output_dir: str
    save_steps: int | None  # at most one of save_steps and saves_per_epoch; neither: only the final save
    saves_per_epoch: int | None
    save_total_limit: int | None
    resume_from_checkpoint: str | None
    auto_resume: bool


@dataclass(frozen=True)
class FsdpPlan:
    version: int
    offload_params: bool
    state_dict_type: str
    auto_wrap_policy: str
    layer_cls_to_wrap: str | None
    reshard_after_forward: bool
    cpu_ram_efficient_loading: bool
    activation_checkpointing: bool


@dataclass(frozen=True)
class DeepSpeedPlan:
    stage: int
    config_file: str  # beside config.yaml in the bundle
    # ZeRO-3: the decoder layer class DeepSpeed gathers whole, one all-gather per layer as FSDP does
    # (deepspeed.utils.set_z3_leaf_modules); None: DeepSpeed's own gathering, module by module.
    leaf_module_class: str | None
    # ZeRO-3 under an adapter, where the base fits: loaded whole on every GPU and its frozen weights left out of
    # ZeRO-3's partitioning (runtime/zero3_gathering.py); ZeRO-3 partitions the adapter's gradients and state.
    frozen_base_whole: bool


@dataclass(frozen=True)
class ParallelismPlan:
    """N-D parallelism (Axolotl's dp_replicate_size, dp_shard_size, tensor_parallel_size, context_parallel_size,
    carried out by accelerate's ParallelismConfig): their product is the world size."""

    dp_replicate_size: int  # > 1 with dp_shard_size > 1: HSDP (replicas of FSDP groups)
    dp_shard_size: int
    tensor_parallel_size: int
    context_parallel_size: int


@dataclass(frozen=True)
class DistributionPlan:
    strategy: Strategy
    device: Literal["cpu", "cuda"]
    num_nodes: int
    processes_per_node: int
    world_size: int
    fsdp: FsdpPlan | None = field(default=None, metadata=OMIT_WHEN_NONE)
    deepspeed: DeepSpeedPlan | None = field(default=None, metadata=OMIT_WHEN_NONE)
    parallelism: ParallelismPlan | None = field(default=None, metadata=OMIT_WHEN_NONE)


@dataclass(frozen=True)
class RunPlan:
    run_plan_version: int
    tunefile_version: str
    seed: int
    offline: bool
    data: DataPlan
    model: ModelPlan
    kernels: KernelsPlan
    optimizer: OptimizerPlan
    schedule: SchedulePlan
    watchdog: WatchdogPlan
    checkpointing: CheckpointPlan
    trackers: TrackersPlan
    distribution: DistributionPlan


# --- writing ------------------------------------------------------------------------------------------------

def plan_to_dict(value: Any) -> Any:
    """Plain data for YAML: dataclasses → dicts (absent optional sections left out), tuples → lists."""
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if item is None and f.metadata.get("omit_when_none"):
                continue
            out[f.name] = plan_to_dict(item)
        return out
    if isinstance(value, (tuple, list)):
        return [plan_to_dict(v) for v in value]
    if isinstance(value, dict):
        return {k: plan_to_dict(v) for k, v in value.items()}
    return value


# --- reading ------------------------------------------------------------------------------------------------

def parse_run_plan(mapping: Any) -> RunPlan:
    """The RunPlan in ``mapping`` (a loaded config.yaml), checked key by key; RunPlanError names the first
    problem."""
    if not isinstance(mapping, dict):
        raise RunPlanError("not a mapping")
    version = mapping.get("run_plan_version")
    if version != RUN_PLAN_VERSION:
        raise RunPlanError(f"run_plan_version is {version!r}; this runtime reads version {RUN_PLAN_VERSION} "
                           "(recompile the config with the tunefile that runs it)")
    plan = _parse_dataclass(RunPlan, mapping, "")
    check_invariants(plan)
    return plan


def check_invariants(plan: RunPlan) -> None:
    """The rules between fields that types alone do not carry."""
    def one_of(section: str, a: str, b: str, *, exactly: bool) -> None:
        values = getattr(plan, section)
        set_ = [name for name in (a, b) if getattr(values, name) is not None]
        if len(set_) > 1 or (exactly and not set_):
            need = "exactly one" if exactly else "at most one"
            raise RunPlanError(f"{section}: {need} of {a} and {b} may be set")

    one_of("schedule", "max_steps", "num_epochs", exactly=True)
    one_of("schedule", "warmup_steps", "warmup_ratio", exactly=False)
    one_of("schedule", "eval_steps", "evals_per_epoch", exactly=False)
    one_of("checkpointing", "save_steps", "saves_per_epoch", exactly=False)
    if (plan.model.adapter is None) != (plan.model.lora is None):
        raise RunPlanError("model: lora is present exactly when adapter is set")
    if plan.kernels.liger_fused_linear_cross_entropy and plan.kernels.cut_cross_entropy:
        raise RunPlanError("kernels: liger_fused_linear_cross_entropy and cut_cross_entropy cannot both be true")
    lora = plan.model.lora
    if lora is not None and lora.target_modules is not None and lora.target_modules_regex is not None:
        raise RunPlanError("model.lora: at most one of target_modules and target_modules_regex may be set")
    if plan.model.unfrozen_parameters is not None and plan.model.adapter is not None:
        raise RunPlanError("model: unfrozen_parameters applies to full fine-tuning only")
    if plan.data.streaming and plan.schedule.max_steps is None:
        raise RunPlanError("data: streaming needs schedule.max_steps")
    dist = plan.distribution
    if (dist.strategy == "fsdp") != (dist.fsdp is not None):
        raise RunPlanError("distribution: fsdp is present exactly when strategy is fsdp")
    if (dist.strategy == "deepspeed") != (dist.deepspeed is not None):
        raise RunPlanError("distribution: deepspeed is present exactly when strategy is deepspeed")
    if dist.world_size != dist.num_nodes * dist.processes_per_node:
        raise RunPlanError("distribution: world_size is not num_nodes × processes_per_node")
    mesh = dist.parallelism
    if mesh is not None:
        sizes = (mesh.dp_replicate_size, mesh.dp_shard_size, mesh.tensor_parallel_size, mesh.context_parallel_size)
        if not (mesh.tensor_parallel_size > 1 or mesh.context_parallel_size > 1
                or (mesh.dp_replicate_size > 1 and mesh.dp_shard_size > 1)):
            raise RunPlanError("distribution: parallelism is present only with tensor or context parallelism or HSDP "
                               "(dp_replicate_size and dp_shard_size both > 1)")
        if min(sizes) < 1 or sizes[0] * sizes[1] * sizes[2] * sizes[3] != dist.world_size:
            raise RunPlanError("distribution.parallelism: dp_replicate_size × dp_shard_size × tensor_parallel_size × "
                               "context_parallel_size is not world_size")
        if dist.strategy != "fsdp" and (mesh.dp_shard_size > 1 or mesh.tensor_parallel_size > 1):
            raise RunPlanError("distribution.parallelism: dp_shard_size and tensor_parallel_size above 1 need "
                               "strategy fsdp")


def _parse_dataclass(cls: type, mapping: Any, where: str) -> Any:
    if not isinstance(mapping, dict):
        raise RunPlanError(f"{where or 'the plan'}: expected a mapping, got {type(mapping).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise RunPlanError(f"{_join(where, unknown[0])}: unknown key")
    values = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name not in mapping:
            if f.metadata.get("omit_when_none"):
                values[name] = None
                continue
            raise RunPlanError(f"{key}: missing")
        values[name] = _parse_value(hints[name], mapping[name], key)
    return cls(**values)


def _parse_value(hint: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _parse_value(option, value, key)
            except RunPlanError as exc:
                errors.append(str(exc))
        raise RunPlanError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is none of the allowed types")
    if value is None:
        raise RunPlanError(f"{key}: may not be null")
    if origin is Literal:
        if value not in args:
            raise RunPlanError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(hint):
        return _parse_dataclass(hint, value, key)
    if origin is tuple:
        if not isinstance(value, list):
            raise RunPlanError(f"{key}: expected a list")
        return tuple(_parse_value(args[0], item, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise RunPlanError(f"{key}: expected a mapping")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise RunPlanError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RunPlanError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RunPlanError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RunPlanError(f"{key}: expected a string, got {value!r}")
        return value
    if hint is Any:
        return value
    raise RunPlanError(f"{key}: no parser for {hint!r}")  # a type added to the plan without one


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name
