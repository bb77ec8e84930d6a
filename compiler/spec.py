"""The config language: typed, frozen pydantic models of an Axolotl-style YAML file.

These models are the single source of truth for the config language. ``tunefile schema``
derives ``schemas/tunefile.schema.json`` from them (a test fails when the two drift) and the
README's config reference is generated from their descriptions. Meanings follow the Axolotl
documentation; keys that are tunefile's own say so in their description.

Defaults of ``None`` mean "decided during resolution"; the bundle's ``config.yaml`` always holds
the concrete value that was chosen.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DATASET_TYPES = ("alpaca", "chat_template", "completion", "pretokenized")
OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
)
# Optimizers that run on bitsandbytes kernels (CUDA only).
BITSANDBYTES_OPTIMIZERS = ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
TRAIN_ON_EOS = ("all", "turn", "last", "none")


def _field(default: Any = ..., description: str = "", group: str = "", **kwargs: Any) -> Any:
    extra = {"x-group": group} if group else None
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


class _Strict(BaseModel):
    """Unknown keys are errors at every nesting level; values are never coerced across types."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DatasetSpec(_Strict):
    """One entry of ``datasets``."""

    path: str = _field(description="Local .jsonl/.json/.parquet file or folder, or a Hugging Face Hub dataset id.")
    type: Literal[DATASET_TYPES] = _field(  # type: ignore[valid-type]
        description="Format of the rows: alpaca (instruction/input/output), chat_template (OpenAI messages), "
        "completion (raw text) or pretokenized (input_ids, optional labels)."
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
    message_field_role: str | None = _field(
        None, description="chat_template datasets: the key of a message's role (default: role)."
    )
    message_field_content: str | None = _field(
        None, description="chat_template datasets: the key of a message's content (default: content)."
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


class SpecialTokens(_Strict):
    """Special tokens to set on the tokenizer (``special_tokens``)."""

    bos_token: str | None = _field(None, description="Beginning-of-sequence token.")
    eos_token: str | None = _field(None, description="End-of-sequence token; must match the chat template's.")
    pad_token: str | None = _field(None, description="Padding token.")
    unk_token: str | None = _field(None, description="Unknown-word token.")
    additional_special_tokens: list[str] | None = _field(None, description="Further special tokens to add.")


class Spec(_Strict):
    """A whole tunefile config."""

    # --- model -------------------------------------------------------------------------
    base_model: str = _field(description="Hugging Face Hub id or local directory of the model.", group="model")
    model_type: str | None = _field(
        None,
        description="Model class, e.g. AutoModelForCausalLM or LlamaForCausalLM; an architecture name here "
        "also tells the FSDP layer class.",
        group="model",
    )
    tokenizer_type: str | None = _field(None, description="Tokenizer class, e.g. AutoTokenizer.", group="model")
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
    shrink_embeddings: bool = _field(
        False,
        description="When merging, shrink resized embeddings back to the tokenizer's vocabulary size.",
        group="model",
    )

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
    lora_target_linear: bool = _field(
        False, description="Apply LoRA to every linear layer except the output head.", group="adapter"
    )
    lora_target_modules: list[str] | None = _field(
        None, description="Module names to apply LoRA to (default: q_proj, v_proj).", group="adapter"
    )
    lora_modules_to_save: list[str] | None = _field(
        None, description="Modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head).",
        group="adapter",
    )
    load_in_4bit: bool = _field(
        False, description="Load the base model in 4-bit (NF4). Implied by adapter: qlora.", group="adapter"
    )
    load_in_8bit: bool = _field(False, description="Load the base model in 8-bit (LoRA only).", group="adapter")

    # --- data ---------------------------------------------------------------------------
    datasets: list[DatasetSpec] = _field(
        description="Training datasets; rows of all of them are mixed.", group="data", min_length=1
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
    train_on_inputs: bool = _field(
        False, description="alpaca datasets: also train on the prompt (default: only the response).", group="data"
    )
    val_set_size: float = _field(
        0.0, ge=0.0, lt=1.0, description="Fraction of rows held out for evaluation.", group="data"
    )
    dataset_prepared_path: str = _field(
        "last_run_prepared", description="Folder of the tokenised-data cache.", group="data"
    )
    sequence_len: int = _field(2048, ge=1, le=1048576, description="Maximum tokens per sample.", group="data")
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
        None, ge=1, description="Stop after this many optimizer steps (overrides num_epochs).", group="training"
    )
    optimizer: Literal[OPTIMIZERS] = _field(  # type: ignore[valid-type]
        "adamw_torch_fused",
        description="Optimizer. 8-bit and paged ones use bitsandbytes (CUDA); adamw_bnb_8bit is adamw_8bit.",
        group="training",
    )
    lr_scheduler: Literal[SCHEDULERS] = _field(  # type: ignore[valid-type]
        "cosine", description="Learning-rate schedule after warmup.", group="training"
    )
    learning_rate: float = _field(2e-4, gt=0, description="Peak learning rate.", group="training")
    warmup_steps: int | None = _field(None, ge=0, description="Linear warmup steps.", group="training")
    warmup_ratio: float | None = _field(
        None, ge=0.0, lt=1.0, description="Warmup as a fraction of all steps.", group="training"
    )
    weight_decay: float = _field(0.0, ge=0.0, le=10.0, description="Decoupled weight decay.", group="training")
    max_grad_norm: float = _field(1.0, ge=0.0, description="Gradient clipping norm (0 turns it off).", group="training")
    seed: int = _field(42, ge=0, le=2**32 - 1, description="Random seed for data order and initialisation.",
                       group="training")
    loss_watchdog_threshold: float | None = _field(
        None, gt=0, description="Stop the run when the loss stays above this for loss_watchdog_patience steps "
        "(about twice the first loss is a good value). A non-finite loss or gradient always stops it.",
        group="training")
    loss_watchdog_patience: int = _field(
        3, ge=1, description="Steps in a row above loss_watchdog_threshold before the run stops.", group="training")

    # --- precision and kernels -----------------------------------------------------------
    bf16: bool | Literal["auto"] = _field(
        "auto", description="bfloat16 mixed precision; auto uses it where the GPU supports it.", group="precision"
    )
    fp16: bool = _field(False, description="float16 mixed precision (GPUs without bf16).", group="precision")
    tf32: bool = _field(False, description="Allow TF32 matrix multiplies on Ampere or newer.", group="precision")
    flash_attention: bool = _field(
        False, description="Use flash-attn kernels (Ampere or newer; falls back to SDPA elsewhere).",
        group="precision",
    )
    sdp_attention: bool = _field(
        False, description="Use PyTorch scaled-dot-product attention (the default when flash_attention is off).",
        group="precision",
    )
    eager_attention: bool = _field(
        False, description="Use the model's plain attention code (debugging only; no sample_packing).",
        group="precision",
    )
    gradient_checkpointing: bool = _field(
        False, description="Recompute activations in backward to save memory.", group="precision"
    )

    # --- distribution --------------------------------------------------------------------
    deepspeed: str | None = _field(
        None,
        description="DeepSpeed: a built-in name (zero1, zero2, zero2_offload, zero3, zero3_offload) or a JSON "
        "file; inlined into the bundle as deepspeed.json.",
        group="distribution",
    )
    fsdp_version: Literal[1, 2] = _field(2, description="FSDP generation; 2 is FSDP2 (per-parameter sharding).",
                                         group="distribution")
    fsdp_config: FsdpConfig | None = _field(None, description="Turns on FSDP with these settings.",
                                            group="distribution")
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
    output_dir: str = _field("./outputs", description="Where checkpoints, metrics and the adapter go.",
                             group="outputs")
    logging_steps: int = _field(1, ge=1, description="Log metrics every N optimizer steps.", group="outputs")
    save_steps: int | None = _field(None, ge=1, description="Save a checkpoint every N steps.", group="outputs")
    saves_per_epoch: int | None = _field(None, ge=1, description="Checkpoints per epoch.", group="outputs")
    save_total_limit: int | None = _field(None, ge=1, description="Keep only the newest N checkpoints.",
                                          group="outputs")
    eval_steps: int | None = _field(None, ge=1, description="Evaluate every N steps.", group="outputs")
    evals_per_epoch: int | None = _field(None, ge=1, description="Evaluations per epoch.", group="outputs")
    resume_from_checkpoint: str | None = _field(
        None, description="Checkpoint folder to resume from.", group="outputs"
    )
    auto_resume_from_checkpoints: bool = _field(
        True, description="Resume from the newest complete checkpoint in output_dir when one exists.",
        group="outputs",
    )
    offline: bool = _field(
        False,
        description="tunefile: never touch the network (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, "
        "TRANSFORMERS_OFFLINE set before Python starts).",
        group="outputs",
    )


# Axolotl keys tunefile knows of but does not take, with what to do instead.
UNSUPPORTED_KEYS: dict[str, str] = {
    "strict": "tunefile always validates strictly; remove the line",
    "wandb_project": "tunefile writes metrics.jsonl and TensorBoard logs; remove the wandb_* lines",
    "wandb_entity": "tunefile writes metrics.jsonl and TensorBoard logs; remove the wandb_* lines",
    "wandb_name": "tunefile writes metrics.jsonl and TensorBoard logs; remove the wandb_* lines",
    "wandb_watch": "tunefile writes metrics.jsonl and TensorBoard logs; remove the wandb_* lines",
    "wandb_log_model": "tunefile writes metrics.jsonl and TensorBoard logs; remove the wandb_* lines",
    "xformers_attention": "use flash_attention: true or sdp_attention: true",
    "fsdp": "FSDP is set with fsdp_config: {...} (and fsdp_version: 2); remove the fsdp: list",
    "load_in_4bit_quant_type": "tunefile always quantises 4-bit weights as NF4 with double quantisation",
}
