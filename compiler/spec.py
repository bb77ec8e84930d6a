"""The config language: typed, frozen pydantic models of an Axolotl-style YAML file.

These models are the single source of truth for the config language. ``tunefile schema``
derives ``schemas/tunefile.schema.json`` from them (a test fails when the two drift) and the
README's config reference is generated from their descriptions. Meanings follow the Axolotl
documentation; keys that are tunefile's own say so in their description.

Defaults of ``None`` mean "decided during resolution"; the bundle's ``config.yaml`` always holds
the concrete value that was chosen.
"""

from __future__ import annotations

import types
import typing
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

DATASET_TYPES = ("alpaca", "alpaca:chat", "alpaca:phi", "jeopardy", "chat_template", "completion", "pretokenized")
# The instruction formats: rows of instruction/input/output (jeopardy: question/category/answer).
INSTRUCTION_TYPES = ("alpaca", "alpaca:chat", "alpaca:phi", "jeopardy")
OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_torch_8bit",
    "adamw_torch_4bit",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "muon",
)
# Optimizers that run on bitsandbytes kernels (CUDA only), and torchao's low-bit AdamW.
BITSANDBYTES_OPTIMIZERS = ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
TORCHAO_OPTIMIZERS = ("adamw_torch_8bit", "adamw_torch_4bit")
# Axolotl's attn_implementation values tunefile reads (the kernels-community/… Hub kernels are read too).
ATTN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "sdpa", "eager", "flex_attention", "xformers",
                        "sage")
# Axolotl plugins tunefile carries out itself (their keys are top-level keys of this Spec).
LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
CCE_PLUGIN = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
SWANLAB_PLUGIN = "axolotl.integrations.swanlab.SwanLabPlugin"
KNOWN_PLUGINS = (LIGER_PLUGIN, CCE_PLUGIN, SWANLAB_PLUGIN)
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
TRAIN_ON_EOS = ("all", "turn", "last", "none")


def _field(default: Any = ..., description: str = "", group: str = "", **kwargs: Any) -> Any:
    extra = {"x-group": group} if group else None
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


def _whole_float_as_int(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _refuse_bool(value: Any) -> Any:
    """A strict Literal of numbers still takes true as 1 (True == 1 in Python); JSON Schema's enum does not."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not true or false")
    return value


def _takes_int(annotation: Any) -> bool:
    """Whether a field's type has an int member (int | None, str | Annotated[int, …]); Literals of numbers aside."""
    if annotation is int:
        return True
    if typing.get_origin(annotation) is Annotated:
        return _takes_int(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_takes_int(member) for member in typing.get_args(annotation))
    return False


@cache
def _whole_number_keys(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(info.alias or name for name, info in model.model_fields.items() if _takes_int(info.annotation))


DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")  # peft's choice for Llama-style attention when none is named

# The upper bound of step counts and intervals: a billion optimizer steps is far beyond any run, and keeps every
# number that reaches a script or a JSON file an ordinary integer.
MAX_STEPS = 1_000_000_000


class _Strict(BaseModel):
    """Unknown keys are errors at every nesting level; values are never coerced across types (a number without a
    fraction in a whole-number key is the one exception: see _whole_floats_as_ints)."""

    # allow_inf_nan: no .inf or .nan (YAML spells them), which would reach deepspeed.json as Infinity, not JSON.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _whole_floats_as_ints(cls, data: Any) -> Any:
        """8.0 is read as 8 in a whole-number key: JSON Schema, and so every editor that checks a config against
        tunefile's schema, counts a number without a fraction as an integer, and compile must not refuse what the
        editor accepted. 8.5, true and "8" are still refused."""
        if not isinstance(data, dict):
            return data
        whole = _whole_number_keys(cls)
        return {key: _whole_float_as_int(value) if key in whole else value for key, value in data.items()}


class DatasetSpec(_Strict):
    """One entry of ``datasets``."""

    path: str = _field(description="Local .jsonl/.json/.parquet file or folder, or a Hugging Face Hub dataset id.",
                       min_length=1)
    type: Literal[DATASET_TYPES] = _field(  # type: ignore[valid-type]
        "pretokenized",
        description="Format of the rows: alpaca (instruction/input/output), chat_template (OpenAI messages), "
        "completion (raw text) or pretokenized (input_ids, optional labels; Axolotl's meaning of no type).",
    )
    name: str | None = _field(None, description="Configuration name of a Hub dataset.")
    split: str = _field("train", description="Split to read.")
    data_files: list[str] | None = _field(None, description="Files to read inside a Hub dataset or folder.")
    ds_type: Literal["json", "parquet", "csv", "text"] | None = _field(
        None, description="File format when it cannot be told from the extension."
    )
    field: str | None = _field(
        None, description="completion datasets: the column that holds the text (default: text)."
    )
    field_messages: str | None = _field(
        None, description="chat_template datasets: the column that holds the message list (default: messages)."
    )
    message_property_mappings: dict[str, str] | None = _field(
        None,
        description="chat_template datasets: where a message keeps its role and content, e.g. "
        "{role: from, content: value} (default: {role: role, content: content}). The older spellings "
        "message_field_role and message_field_content are read into it.",
    )
    roles_to_train: list[str] | None = _field(
        None,
        description="chat_template datasets: roles whose turns are trained on (default: [assistant]); "
        "other turns are masked from the loss.",
    )
    train_on_eos: Literal[TRAIN_ON_EOS] | None = _field(  # type: ignore[valid-type]
        None,
        description="chat_template datasets: which end-of-turn tokens are trained on: all, turn (those "
        "ending trained turns), last, none (default: turn).",
    )
    chat_template: str | None = _field(
        None, description="chat_template datasets: template for this dataset, overriding the top-level one."
    )
    field_thinking: str | None = _field(
        None, description="chat_template datasets: the message key holding a reasoning trace (default: "
        "reasoning_content).")
    template_thinking_key: str | None = _field(
        None, description="chat_template datasets: the key the chat template reads the reasoning trace from "
        "(default: field_thinking).")
    drop_system_message: bool | None = _field(
        None, description="chat_template datasets: leave a conversation's leading system turn out (default: false; "
        "a system prompt the template writes by itself stays).")


class FsdpConfig(_Strict):
    """Settings of Fully Sharded Data Parallel (``fsdp_config``)."""

    offload_params: bool = _field(False, description="Keep parameters and optimizer state in CPU memory.")
    state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"] = _field(
        "FULL_STATE_DICT",
        description="How checkpoints are saved: one full state dict gathered on rank 0, or one shard per rank.",
    )
    auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"] = _field(
        "TRANSFORMER_BASED_WRAP", description="How the model is split into FSDP units."
    )
    transformer_layer_cls_to_wrap: str | None = _field(
        None,
        description="Decoder layer class wrapped as one FSDP unit; derived from the model architecture "
        "when left out.",
    )
    reshard_after_forward: bool = _field(
        True, description="Free gathered parameters after forward (saves memory, costs a second all-gather)."
    )
    cpu_ram_efficient_loading: bool = _field(
        False, description="Load weights on rank 0 only and broadcast them (saves host memory on big models)."
    )
    activation_checkpointing: bool = _field(
        False, description="FSDP's own activation checkpointing (use instead of gradient_checkpointing)."
    )
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP"] | None = _field(
        None, description="FSDP1: FULL_SHARD or SHARD_GRAD_OP (FSDP2 reads reshard_after_forward instead)."
    )


QAT_DTYPES = ("int4", "int8", "float8_e4m3fn", "nvfp4", "mxfp4", "ternary")


class QatConfig(_Strict):
    """Quantisation-aware training (``qat``), carried out with torchao's fake quantisation."""

    weight_dtype: Literal[QAT_DTYPES] = _field(  # type: ignore[valid-type]
        "int8", description="Fake-quantised weight format: int4, int8, float8_e4m3fn (fp8), nvfp4, mxfp4 or ternary "
        "(weights in {-1, 0, 1} times a per-row scale, BitNet-style).")
    activation_dtype: Literal[QAT_DTYPES] | None = _field(  # type: ignore[valid-type]
        None, description="Fake-quantised activation format (default: activations stay as they are).")
    group_size: int = _field(32, ge=1, description="Elements per quantisation group: it must divide the layers' "
                             "widths; int4/float8_e4m3fn needs 128, nvfp4 16, mxfp4 32.")
    quantize_embedding: bool = _field(False, description="Fake-quantise the embedding too.")
    fake_quant_after_n_steps: int | None = _field(
        None, ge=0, description="Start fake quantisation after this many steps (default: from the first).")


class SpecialTokens(_Strict):
    """Special tokens to set on the tokenizer (``special_tokens``)."""

    bos_token: str | None = _field(None, description="Beginning-of-sequence token.")
    eos_token: str | None = _field(None, description="End-of-sequence token; must match the chat template's.")
    pad_token: str | None = _field(None, description="Padding token.")
    unk_token: str | None = _field(None, description="Unknown-word token.")
    additional_special_tokens: list[str] | None = _field(None, description="Further special tokens to add.")


class LoftqConfig(_Strict):
    """Axolotl's peft.loftq_config."""

    loftq_bits: Annotated[Literal[4, 8], BeforeValidator(_refuse_bool)] = _field(
        4, description="Bits the base is quantised to for LoftQ's initialisation (peft's LoftQ takes 4 or 8).")


class PeftConfig(_Strict):
    """Axolotl's peft section."""

    loftq_config: LoftqConfig | None = _field(
        None, description="LoftQ: initialise the LoRA adapter so that it corrects the base's quantisation error.")


class Fp8Config(_Strict):
    """Axolotl's fp8_config."""

    recipe: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"] = _field(
        "tensorwise", description="torchao's float8 scaling recipe.")


class Spec(_Strict):
    """A whole tunefile config."""

    # --- model -------------------------------------------------------------------------
    base_model: str = _field(description="Hugging Face Hub id or local directory of the model.", group="model",
                             min_length=1)
    model_type: str | None = _field(
        None,
        description="Model class, e.g. AutoModelForCausalLM or LlamaForCausalLM; an architecture name here "
        "also tells the FSDP layer class.",
        group="model",
    )
    revision_of_model: str | None = _field(None, description="Hub branch, tag or commit of base_model.",
                                           group="model")
    # `model_config` is pydantic's own attribute name, hence the alias.
    model_config_overrides: dict[str, Any] | None = _field(
        None, description="Overrides of the model's configuration, e.g. {output_router_logits: true} (the MoE "
        "router's auxiliary loss is then added to the loss).", group="model", alias="model_config")
    model_quantization_config: Literal["Mxfp4Config"] | None = _field(
        None, description="A transformers quantisation config to load the weights with (Mxfp4Config).",
        group="model")
    model_quantization_config_kwargs: dict[str, Any] | None = _field(
        None, description="Its arguments, e.g. {dequantize: true}.", group="model")
    qat: QatConfig | None = _field(
        None, description="Quantisation-aware training with torchao (full fine-tuning or LoRA).", group="model")
    reinit_weights: bool = _field(
        False, description="Train the base model's architecture from fresh random weights (pretraining from "
        "scratch); its checkpoint's weights are not loaded.", group="model")
    quantize_moe_experts: bool = _field(
        False, description="With load_in_4bit/8bit and an adapter: also quantise MoE expert weights stored as "
        "3-D parameters (CUDA, bitsandbytes).", group="model")
    tokenizer_type: str | None = _field(None, description="Tokenizer class, e.g. AutoTokenizer.", group="model")
    tokenizer_use_mistral_common: bool = _field(
        False, description="Tokenise with the mistral-common package's tokenizer (through transformers).",
        group="model")
    resize_token_embeddings_to_32x: bool = _field(
        False, description="Round the embedding matrix up to a multiple of 32 rows when resizing it.",
        group="model")
    tokenizer_config: str | None = _field(
        None, description="Hub id or directory of the tokenizer, when not the base model's.", group="model"
    )
    trust_remote_code: bool = _field(False, description="Allow model code from the Hub to run.", group="model")
    model_parameters: str | Annotated[int, Field(ge=1)] | None = _field(
        None,
        description="tunefile: parameter count for the memory estimate when the model is neither local nor "
        "in the built-in table, as a number or with a suffix (8B, 350M).",
        group="model",
    )
    special_tokens: SpecialTokens | None = _field(None, description="Special tokens to set.", group="model")
    tokens: list[str] | None = _field(
        None, description="Extra (non-special) tokens to add to the vocabulary.", group="model"
    )
    unfrozen_parameters: list[str] | None = _field(
        None, description="Full fine-tuning: train only the parameters whose names match one of these regular "
        "expressions; the rest stay frozen.", group="model",
    )
    shrink_embeddings: bool = _field(
        False,
        description="When merging, shrink resized embeddings back to the tokenizer's vocabulary size.",
        group="model",
    )
    llama4_linearized_experts: bool = _field(
        False, description="Llama 4: one linear layer per expert and projection instead of fused expert tensors, "
        "so LoRA and 4-bit quantisation reach the experts.", group="model")
    tiled_mlp: bool = _field(
        False, description="ALST tiled MLP: run each MLP over the sequence in slices, forward and backward, so long "
        "sequences need less activation memory.", group="model")
    tiled_mlp_num_shards: int | None = _field(
        None, ge=1, le=65536,
        description="Slices per MLP call (default: sequence length / 32768, rounded up, as Axolotl).",
        group="model")
    tiled_mlp_use_original_mlp: bool = _field(
        True, description="Tile the model's own MLP module (false: a generic gated MLP on its weights).",
        group="model")
    ple_cpu_offload: bool = _field(
        False, description="Keep the huge per-layer embeddings a model lists in _no_placement_params in host "
        "memory (one GPU, LoRA/QLoRA).", group="model")
    device_map: str | None = _field(
        None, description="transformers' placement; tunefile places the model itself, so only auto (or one "
        "device) on a one-GPU run is accepted, where it means the same.", group="model")
    lisa_n_layers: int | None = _field(
        None, ge=1, le=100_000,
        description="LISA (full fine-tuning): train only this many decoder layers at a time, drawn at "
        "random; embeddings and head always train.", group="model")
    lisa_step_interval: int | None = _field(
        None, ge=1, le=MAX_STEPS,
        description="LISA: draw new layers every N optimizer steps (default: 20).", group="model")
    lisa_layers_attribute: str = _field(
        "model.layers", description="LISA: where the decoder layers are in the model.", group="model")

    # --- adapter ------------------------------------------------------------------------
    adapter: Literal["lora", "qlora"] | None = _field(
        None, description="lora, qlora (LoRA on a 4-bit base), or leave out for full fine-tuning.", group="adapter"
    )
    lora_model_dir: str | None = _field(None, description="Existing adapter to continue training.", group="adapter")
    lora_r: int = _field(8, ge=1, le=4096, description="Rank of the LoRA matrices.", group="adapter")
    lora_alpha: int = _field(
        16, ge=1, le=65536, description="LoRA scaling: updates scale by alpha / r.", group="adapter"
    )
    lora_dropout: float = _field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.", group="adapter")
    lora_dropout_recompute: bool = _field(
        True, description="Draw each LoRA dropout mask again in the backward pass from a seed instead of storing "
        "the dropped input and the mask: the same function and gradients as peft's dropout, about a third less "
        "activation memory in a LoRA run (single GPU and DDP; peft's own dropout under FSDP and DeepSpeed). "
        "false: peft's dropout, mask for mask (tunefile's own key).", group="adapter")
    lora_target_linear: bool = _field(
        False, description="Apply LoRA to every linear layer except the output head.", group="adapter"
    )
    lora_target_modules: list[str] | str | None = _field(
        None, description="Module names to apply LoRA to (default: q_proj, v_proj), or one regular expression "
        "that a module's full name must match entirely.", group="adapter"
    )
    lora_target_parameters: list[str] | None = _field(
        None, description="Parameter names (MoE expert weights such as experts.gate_up_proj) that get LoRA too.",
        group="adapter",
    )
    lora_fan_in_fan_out: bool = _field(
        False, description="The target layers store weights as (in, out), like GPT-2's Conv1D.", group="adapter"
    )
    peft_use_rslora: bool = _field(
        False, description="Rank-stabilised LoRA: scale updates by alpha / sqrt(r).", group="adapter"
    )
    lora_modules_to_save: list[str] | None = _field(
        None, description="Modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head).",
        group="adapter",
    )
    load_in_4bit: bool = _field(
        False, description="Load the base model in 4-bit (NF4). Implied by adapter: qlora.", group="adapter"
    )
    load_in_8bit: bool = _field(False, description="Load the base model in 8-bit (LoRA only).", group="adapter")
    peft: PeftConfig | None = _field(
        None, description="PEFT options: loftq_config: {loftq_bits: 4} initialises a lora adapter with LoftQ.",
        group="adapter")
    relora: bool = _field(
        False, description="ReLoRA: every jagged_restart_steps merge the adapter into the base and start a new "
        "one (lora or qlora).", group="adapter")
    jagged_restart_steps: int | None = _field(
        None, ge=1, le=MAX_STEPS, description="ReLoRA: optimizer steps between restarts.", group="adapter")
    jagged_restart_warmup_steps: int | None = _field(
        None, ge=0, le=MAX_STEPS, description="ReLoRA: learning-rate warm-up steps after each restart (default: 10).",
        group="adapter")
    jagged_restart_anneal_steps: int | None = _field(
        None, ge=0, le=MAX_STEPS, description="ReLoRA: learning-rate anneal steps before each restart (default: none).",
        group="adapter")
    relora_prune_ratio: float | None = _field(
        None, ge=0.0, le=1.0, description="ReLoRA: share of the optimizer state reset at a restart (default: 0.9).",
        group="adapter")
    relora_prune_method: Literal["magnitude", "random", "reset"] | None = _field(
        None, description="ReLoRA: which optimizer state is reset: magnitude (the smallest), random, or reset "
        "(all of it) (default: magnitude).", group="adapter")
    relora_cpu_offload: bool = _field(
        False, description="ReLoRA: merge the adapter on the CPU to save GPU memory.", group="adapter")

    # --- data ---------------------------------------------------------------------------
    datasets: list[DatasetSpec] = _field(
        [], description="Training datasets; rows of all of them are mixed. Required unless pretraining_dataset "
        "is set.", group="data"
    )
    chat_template: str | None = _field(
        None,
        description="Chat template by name (chatml, llama3, tokenizer_default, …) for chat_template datasets; "
        "default: the tokenizer's own.",
        group="data",
    )
    chat_template_jinja: str | None = _field(
        None, description="A Jinja chat template string, used instead of a named one.", group="data"
    )
    chat_template_kwargs: dict[str, Any] | None = _field(
        None, description="Extra variables the chat template is rendered with, e.g. {reasoning_effort: high}.",
        group="data")
    train_on_inputs: bool = _field(
        False, description="alpaca datasets: also train on the prompt (default: only the response).", group="data"
    )
    val_set_size: float = _field(
        0.0, ge=0.0, lt=1.0, description="Fraction of rows held out for evaluation.", group="data"
    )
    dataset_prepared_path: str = _field(
        "last_run_prepared", description="Folder of the tokenised-data cache.", group="data"
    )
    streaming: bool = _field(
        False, description="Read datasets lazily while training, tokenising and packing as rows arrive: no "
        "prepared-data cache, no evaluation split; needs max_steps.", group="data")
    dataset_exact_deduplication: bool = _field(
        False, description="Drop rows that repeat an earlier row exactly, before the evaluation split.",
        group="data")
    min_sample_len: int | None = _field(
        None, ge=1, le=10_000_000,
        description="Drop rows shorter than this many tokens (default: 2, as Axolotl).", group="data")
    group_by_length: bool = _field(
        False, description="Without sample_packing: batch rows of similar length together (less padding).",
        group="data")
    skip_prepare_dataset: bool = _field(
        False, description="Tokenise in the training process and write no cache.", group="data"
    )
    pretraining_dataset: list[DatasetSpec] | None = _field(
        None, description="Completion data streamed during training (no cache, no evaluation split); needs "
        "max_steps. Entries are read like `datasets` entries of type completion.", group="data"
    )
    eval_sample_packing: bool | None = _field(
        None, description="Pack evaluation batches too (default: as sample_packing).", group="data"
    )
    eot_tokens: list[str] | None = _field(
        None, description="chat_template datasets: tokens that end a turn; train_on_eos decides which are "
        "trained on (default: the tokenizer's eos token).", group="data"
    )
    sequence_len: int = _field(512, ge=1, le=1048576, description="Maximum tokens per sample.", group="data")
    sample_packing: bool = _field(
        False, description="Pack several samples into each sequence_len row, isolated from each other.", group="data"
    )
    pad_to_sequence_len: bool = _field(
        False, description="Pad every batch to sequence_len (steady memory use).", group="data"
    )

    # --- training -----------------------------------------------------------------------
    micro_batch_size: int = _field(1, ge=1, le=65536, description="Samples per GPU per forward pass.", group="training")
    gradient_accumulation_steps: int = _field(
        1, ge=1, le=65536, description="Micro-batches per optimizer step.", group="training"
    )
    num_epochs: float = _field(1, gt=0, le=10000, description="Passes over the data.", group="training")
    max_steps: int | None = _field(
        None, ge=1, le=MAX_STEPS,
        description="Stop after this many optimizer steps (overrides num_epochs).", group="training"
    )
    optimizer: Literal[OPTIMIZERS] = _field(  # type: ignore[valid-type]
        "adamw_torch_fused",
        description="Optimizer. 8-bit and paged ones use bitsandbytes (CUDA); adamw_bnb_8bit is adamw_8bit.",
        group="training",
    )
    lr_scheduler: Literal[SCHEDULERS] = _field(  # type: ignore[valid-type]
        "cosine", description="Learning-rate schedule after warmup.", group="training"
    )
    learning_rate: float = _field(2e-4, gt=0, le=1000.0, description="Peak learning rate.", group="training")
    warmup_steps: int | None = _field(None, ge=0, le=MAX_STEPS, description="Linear warmup steps.", group="training")
    lr_quadratic_warmup: bool = _field(
        False, description="Warm the learning rate up along a quadratic curve instead of a straight line.",
        group="training")
    warmup_ratio: float | None = _field(
        None, ge=0.0, lt=1.0, description="Warmup as a fraction of all steps (rounded down).", group="training"
    )
    cosine_min_lr_ratio: float | None = _field(
        None, ge=0.0, le=1.0, description="Cosine: decay to this fraction of the peak learning rate (default 0).",
        group="training")
    eta_min: float | None = _field(
        None, ge=0.0, le=1000.0, description="Cosine: decay to this learning rate (instead of cosine_min_lr_ratio).",
        group="training")
    cosine_constant_lr_ratio: float | None = _field(
        None, ge=0.0, le=1.0, description="Cosine: reach the minimum at this fraction of the steps and stay there "
        "(0: at the last step).",
        group="training")
    early_stopping_patience: int | None = _field(
        None, ge=1, le=MAX_STEPS,
        description="Stop when the evaluation loss has not improved for this many evaluations.",
        group="training")
    optim_args: dict[str, Any] | str | None = _field(
        None, description="Extra optimizer arguments; tunefile passes bf16_stochastic_round to torchao's "
        "adamw_torch_8bit/4bit (as a mapping or Axolotl's `key=value,…` string).", group="training")
    adam_beta1: float = _field(0.9, ge=0.0, lt=1.0, description="AdamW's first-moment decay.", group="training")
    adam_beta2: float = _field(0.999, ge=0.0, lt=1.0, description="AdamW's second-moment decay.",
                               group="training")
    adam_epsilon: float = _field(1e-8, gt=0.0, le=1.0, description="AdamW's epsilon.", group="training")
    weight_decay: float = _field(0.0, ge=0.0, le=10.0, description="Decoupled weight decay.", group="training")
    max_grad_norm: float = _field(1.0, ge=0.0, le=1e9,
        description="Gradient clipping norm (0 turns it off).", group="training")
    seed: int = _field(42, ge=0, le=2**32 - 1, description="Random seed for data order and initialisation.",
                       group="training")
    loss_watchdog_threshold: float | None = _field(
        None, gt=0, le=1e30, description="Stop the run when the loss stays above this for loss_watchdog_patience steps "
        "(about twice the first loss is a good value). A non-finite loss or gradient always stops it.",
        group="training")
    loss_watchdog_patience: int = _field(
        3, ge=1, le=MAX_STEPS,
        description="Steps in a row above loss_watchdog_threshold before the run stops.", group="training")

    # --- precision and kernels -----------------------------------------------------------
    bf16: bool | Literal["auto"] = _field(
        "auto", description="bfloat16 mixed precision; auto uses it where the GPU supports it.", group="precision"
    )
    fp16: bool = _field(False, description="float16 mixed precision (GPUs without bf16).", group="precision")
    fp8: bool = _field(
        False, description="FP8 training with torchao: linear layers compute in float8 (Hopper or newer).",
        group="precision")
    fp8_config: Fp8Config | None = _field(None, description="FP8 options: recipe.", group="precision")
    fp8_enable_fsdp_float8_all_gather: bool = _field(
        False, description="With fp8 and FSDP2: gather float8 weights instead of bf16 ones.", group="precision")
    bfloat16: bool = _field(
        False, description="Keep every weight, the trained ones too, in bfloat16 (no fp32 master copy).",
        group="precision")
    float16: bool = _field(
        False, description="Keep every weight, the trained ones too, in float16, trained without loss scaling.",
        group="precision")
    tf32: bool | Literal["auto"] = _field(
        "auto", description="TF32 matrix multiplies; auto turns them on where the GPU has them (Ampere or newer).",
        group="precision",
    )
    attn_implementation: str | None = _field(
        None,
        description="Attention kernel: flash_attention_2, flash_attention_3, sdpa, eager, flex_attention, xformers, "
        "sage or a kernels-community/… Hub kernel. Those the target cannot run resolve to the nearest it can, "
        "with the reason in `explain` (default: sdpa). The older flash_attention / sdp_attention / "
        "xformers_attention / flex_attention / eager_attention: true are read into it.",
        group="precision",
    )
    gradient_checkpointing: bool | Literal["offload", "auto"] = _field(
        False, description="Recompute activations in backward to save memory; offload also keeps the "
        "checkpointed layer inputs in CPU memory; auto (tunefile's): none if the run fits the target GPU's memory, "
        "else every n-th layer for the largest n that fits (gradient_checkpointing_every_n_layers), explained in "
        "`tunefile explain`.", group="precision"
    )
    gradient_checkpointing_every_n_layers: int = _field(
        1, ge=1, le=1024, description="With gradient_checkpointing: checkpoint only every n-th decoder layer (the "
        "first, the (n+1)-th, …); the others keep their activations. Trades memory back for speed where full "
        "checkpointing frees more than the run needs (1: every layer; tunefile's own key).", group="precision"
    )
    gradient_checkpointing_kwargs: dict[str, Any] | None = _field(
        None, description="Passed to transformers' gradient_checkpointing_enable, e.g. {use_reentrant: false} "
        "(default: {use_reentrant: true}, as Axolotl).", group="precision"
    )
    activation_offloading: bool | Literal["legacy", "hidden_states"] = _field(
        False, description="Keep activations saved for backward in pinned CPU memory.", group="precision"
    )
    plugins: list[str] | None = _field(
        None, description="Axolotl plugins: axolotl.integrations.liger.LigerPlugin and "
        "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin (carried out by tunefile itself).",
        group="precision",
    )
    cut_cross_entropy: bool = _field(
        True, description="With the cut-cross-entropy plugin: compute the loss without materialising logits "
        "(package cut-cross-entropy, CUDA).", group="precision"
    )
    liger_rms_norm: bool = _field(False, description="Liger plugin: fused RMSNorm.", group="precision")
    liger_glu_activation: bool = _field(False, description="Liger plugin: fused SwiGLU/GeGLU MLP.",
                                        group="precision")
    liger_layer_norm: bool = _field(False, description="Liger plugin: fused LayerNorm.", group="precision")
    liger_rope: bool = _field(False, description="Liger plugin: fused rotary embedding.", group="precision")
    liger_rms_norm_gated: bool = _field(False, description="Liger plugin: fused gated RMSNorm (Qwen3-Next, "
                                        "Nemotron-H).", group="precision")
    liger_fused_linear_cross_entropy: bool = _field(
        False, description="Liger plugin: loss from the hidden states in chunks, no full logits.", group="precision"
    )

    # --- distribution --------------------------------------------------------------------
    deepspeed: str | None = _field(
        None,
        description="DeepSpeed: a built-in name (zero1, zero2, zero2_offload, zero3, zero3_offload) or a JSON "
        "file; inlined into the bundle as deepspeed.json.",
        group="distribution",
    )
    fsdp_version: Annotated[Literal[1, 2], BeforeValidator(_refuse_bool)] | None = _field(
        None, description="FSDP generation: 1 or 2 (FSDP2, per-parameter sharding). An fsdp_config without it is "
        "FSDP1, as in Axolotl; FSDP that tunefile picks itself (strategy) is FSDP2.", group="distribution")
    fsdp_config: FsdpConfig | None = _field(None, description="Turns on FSDP with these settings.",
                                            group="distribution")
    dp_shard_size: int | None = _field(
        None, ge=1, le=100_000,
        description="FSDP's shard group: parameters are sharded across this many GPUs (default: every "
        "GPU the other sizes leave). dp_replicate_size × dp_shard_size × tensor_parallel_size × "
        "context_parallel_size is the GPU count.", group="distribution")
    dp_replicate_size: int | None = _field(
        None, ge=1, le=100_000,
        description="HSDP (FSDP2): this many replicas of the dp_shard_size shard group; the GPUs left "
        "after dp_shard_size by default.", group="distribution")
    tensor_parallel_size: int | None = _field(
        None, ge=1, le=100_000,
        description="Tensor parallelism (full fine-tuning, FSDP2): each layer is split across this many "
        "GPUs, as the model's own tensor-parallel plan says.", group="distribution")
    context_parallel_size: int | None = _field(
        None, ge=1, le=100_000,
        description="Context parallelism: every sequence is split across this many GPUs, which gather "
        "each other's keys and values in attention (sdpa or flash_attention_2).", group="distribution")
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = _field(
        "auto",
        description="tunefile: distribution when neither deepspeed nor fsdp_config is set; auto picks DDP, "
        "FSDP2 or FSDP2 with offload from a memory estimate.",
        group="distribution",
    )
    target: str | None = _field(
        None,
        description="tunefile: hardware target, a built-in name or a target file relative to this config; "
        "command-line flags override it.",
        group="distribution",
    )

    # --- outputs and cadence -------------------------------------------------------------
    output_dir: str = _field("./model-out", min_length=1, description="Where checkpoints, metrics and the adapter go.",
                             group="outputs")
    logging_steps: int = _field(1, ge=1, le=MAX_STEPS,
        description="Log metrics every N optimizer steps.", group="outputs")
    save_steps: int | None = _field(None, ge=1, le=MAX_STEPS,
        description="Save a checkpoint every N steps.", group="outputs")
    saves_per_epoch: int | None = _field(None, ge=1, le=MAX_STEPS,
        description="Checkpoints per epoch.", group="outputs")
    save_total_limit: int | None = _field(None, ge=1, le=MAX_STEPS, description="Keep only the newest N checkpoints.",
                                          group="outputs")
    eval_steps: int | None = _field(None, ge=1, le=MAX_STEPS, description="Evaluate every N steps.", group="outputs")
    evals_per_epoch: int | None = _field(None, ge=1, le=MAX_STEPS,
        description="Evaluations per epoch.", group="outputs")
    resume_from_checkpoint: str | None = _field(
        None, description="Checkpoint folder to resume from.", group="outputs"
    )
    auto_resume_from_checkpoints: bool = _field(
        False, description="Resume from the newest complete checkpoint in output_dir when one exists.",
        group="outputs",
    )
    use_tensorboard: bool = _field(False, description="Write TensorBoard event files under output_dir/runs.",
                                   group="trackers")
    use_wandb: bool | None = _field(None, description="Log to Weights & Biases (default: when wandb_project is "
                                    "set).", group="trackers")
    wandb_project: str | None = _field(None, description="Weights & Biases project; turns wandb on.",
                                       group="trackers")
    wandb_entity: str | None = _field(None, description="Weights & Biases team or user.", group="trackers")
    wandb_name: str | None = _field(None, description="Weights & Biases run name.", group="trackers")
    wandb_run_id: str | None = _field(None, description="Weights & Biases run id (to continue a run).",
                                      group="trackers")
    wandb_mode: Literal["online", "offline", "disabled"] | None = _field(
        None, description="online or offline (always offline with offline: true); disabled turns wandb off.",
        group="trackers")
    wandb_log_model: str | None = _field(
        None, description="checkpoint or end: upload the final model as an artifact (not in offline mode).",
        group="trackers")
    mlflow_tracking_uri: str | None = _field(None, description="MLflow server or folder; turns MLflow on.",
                                             group="trackers")
    mlflow_experiment_name: str | None = _field(None, description="MLflow experiment (default: tunefile).",
                                                group="trackers")
    mlflow_run_name: str | None = _field(None, description="MLflow run name.", group="trackers")
    use_swanlab: bool | None = _field(
        None, description="Log to SwanLab (default: when swanlab_project is set).", group="trackers")
    swanlab_project: str | None = _field(None, description="SwanLab project; turns SwanLab on.", group="trackers")
    swanlab_experiment_name: str | None = _field(None, description="SwanLab experiment name.", group="trackers")
    swanlab_description: str | None = _field(None, description="SwanLab experiment description.",
                                             group="trackers")
    swanlab_workspace: str | None = _field(None, description="SwanLab workspace (team or user).", group="trackers")
    swanlab_mode: Literal["cloud", "local", "offline", "disabled"] | None = _field(
        None, description="cloud, local or offline (always offline with offline: true); disabled turns SwanLab off "
        "(default: cloud).", group="trackers")
    use_otel_metrics: bool = _field(
        False, description="Serve training metrics through OpenTelemetry for Prometheus to scrape.",
        group="trackers")
    otel_metrics_host: str = _field("localhost", description="OpenTelemetry metrics: address to listen on.",
                                    group="trackers")
    otel_metrics_port: int = _field(8000, ge=1, le=65535, description="OpenTelemetry metrics: HTTP port.",
                                    group="trackers")
    offline: bool = _field(
        False,
        description="tunefile: never touch the network (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, "
        "TRANSFORMERS_OFFLINE set before Python starts).",
        group="outputs",
    )


def wandb_on(spec: Spec) -> bool:
    """Axolotl's rule: use_wandb when given, else on exactly when a project is named; mode disabled is off."""
    if spec.wandb_mode == "disabled":
        return False
    return spec.use_wandb if spec.use_wandb is not None else bool(spec.wandb_project)


def swanlab_on(spec: Spec) -> bool:
    """Axolotl's SwanLab plugin's rule: use_swanlab, which naming a project turns on; mode disabled is off.
    tunefile carries the plugin out itself, so listing it is not needed."""
    if spec.swanlab_mode == "disabled":
        return False
    return bool(spec.use_swanlab) or (spec.use_swanlab is None and bool(spec.swanlab_project))


def mlflow_on(spec: Spec) -> bool:
    return bool(spec.mlflow_tracking_uri or spec.mlflow_experiment_name)


def optimizer_arguments(spec: Spec) -> dict[str, Any]:
    """Axolotl's optim_args as a mapping: given as one, or as its `key=value,key=value` string."""
    if isinstance(spec.optim_args, dict):
        return dict(spec.optim_args)
    arguments: dict[str, Any] = {}
    for item in (spec.optim_args or "").split(","):
        key, _, value = item.partition("=")
        if key.strip():
            arguments[key.strip()] = {"true": True, "false": False}.get(value.strip().lower(), value.strip())
    return arguments
