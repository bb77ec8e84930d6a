"""The model to train: base weights (local directory or hub id), quantisation, adapters, checkpointing.

Precision policy (the "why" behind the dtypes):
- full fine-tuning keeps fp32 master weights; bf16/fp16 compute comes from autocast (accelerate's
  mixed precision), so the optimizer never updates half-precision weights;
- adapters (LoRA) load the frozen base in the compute dtype (half the memory) while peft keeps the
  small trainable adapter weights in fp32;
- QLoRA stores the base in 4-bit nf4 with double quantisation and computes in bf16.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ModelLoadError(Exception):
    """The base model or adapter cannot be loaded; the message names it and says what to do."""


@dataclass(frozen=True)
class ModelOptions:
    base_model: str
    precision: str  # fp32 | bf16 | fp16
    attn_implementation: str
    adapter: str | None = None  # lora | qlora | None (full fine-tuning)
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_linear: bool = False
    lora_target_modules: tuple[str, ...] | None = None
    lora_modules_to_save: tuple[str, ...] | None = None
    lora_model_dir: str | None = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    shrink_embeddings: bool = False

    @classmethod
    def from_config(cls, values: dict[str, Any], *, attn_implementation: str) -> ModelOptions:
        def names(key: str) -> tuple[str, ...] | None:
            value = values.get(key)
            return tuple(value) if value else None

        return cls(
            base_model=str(values["base_model"]), precision=values["resolved"]["precision"],
            attn_implementation=attn_implementation, adapter=values.get("adapter"),
            load_in_4bit=bool(values.get("load_in_4bit")), load_in_8bit=bool(values.get("load_in_8bit")),
            lora_r=int(values.get("lora_r") or 8), lora_alpha=int(values.get("lora_alpha") or 16),
            lora_dropout=float(values.get("lora_dropout") or 0.0),
            lora_target_linear=bool(values.get("lora_target_linear")),
            lora_target_modules=names("lora_target_modules"), lora_modules_to_save=names("lora_modules_to_save"),
            lora_model_dir=values.get("lora_model_dir"),
            gradient_checkpointing=bool(values.get("gradient_checkpointing")),
            trust_remote_code=bool(values.get("trust_remote_code")),
            shrink_embeddings=bool(values.get("shrink_embeddings")),
        )

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit or self.adapter == "qlora"

    @property
    def uses_adapter(self) -> bool:
        return self.adapter in ("lora", "qlora")


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def resolve_model_source(name: str) -> str:
    """A local directory as is; a hub id checked against the cache when offline, so the error names
    the model instead of surfacing as a connection failure deep inside transformers."""
    if Path(name).is_dir():
        return name
    if Path(name).exists() or name.startswith((".", "/")):
        raise ModelLoadError(f"base_model {name}: not a model directory")
    if is_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ModelLoadError(f"base_model {name}: not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                                 f"run `huggingface-cli download {name}` where there is network, or point "
                                 "base_model at a local directory")
    return name


def weights_dtype(options: ModelOptions) -> torch.dtype:
    if options.quantized:
        return HALF.get(options.precision, torch.bfloat16)
    if options.uses_adapter and options.precision in HALF:
        return HALF[options.precision]
    return torch.float32


def quantization_config(options: ModelOptions) -> Any:
    if not options.quantized:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError("load_in_4bit / load_in_8bit need bitsandbytes (and a CUDA GPU): "
                             "pip install 'tunefile[qlora]'") from None
    from transformers import BitsAndBytesConfig

    if options.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=HALF.get(options.precision, torch.bfloat16))


def from_pretrained(base_model: str, **kwargs: Any) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` of a config's base_model (offline-aware), with a missing or
    unreadable model reported as one line."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(resolve_model_source(base_model), **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"base_model {base_model}: cannot load: {exc}") from None


def load_base_model(options: ModelOptions, *, device_index: int | None = None) -> torch.nn.Module:
    kwargs: dict[str, Any] = {
        "dtype": weights_dtype(options),
        "attn_implementation": options.attn_implementation,
        "trust_remote_code": options.trust_remote_code,
    }
    quant = quantization_config(options)
    if quant is not None:
        # bitsandbytes quantises while loading, straight onto this process's GPU.
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device_index if device_index is not None else 0}
    model = from_pretrained(options.base_model, **kwargs)
    model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    return model


def match_vocabulary(model: torch.nn.Module, vocab_size: int, *, shrink: bool) -> None:
    """Grow the embeddings when the tokenizer gained tokens (pad, special tokens); shrink only on request."""
    current = model.get_input_embeddings().num_embeddings
    if vocab_size > current or (shrink and vocab_size < current):
        log.info("resizing token embeddings %d → %d", current, vocab_size)
        model.resize_token_embeddings(vocab_size)


def lora_target_modules(options: ModelOptions) -> str | list[str]:
    if options.lora_target_linear:
        return "all-linear"  # peft: every nn.Linear except the output head
    return list(options.lora_target_modules or ("q_proj", "v_proj"))


def add_adapter(model: torch.nn.Module, options: ModelOptions) -> torch.nn.Module:
    from peft import LoraConfig, PeftModel, get_peft_model

    if options.lora_model_dir:
        if not Path(options.lora_model_dir).is_dir():
            raise ModelLoadError(f"lora_model_dir {options.lora_model_dir}: not a directory")
        log.info("continuing training of the adapter in %s", options.lora_model_dir)
        return PeftModel.from_pretrained(model, options.lora_model_dir, is_trainable=True)
    config = LoraConfig(
        r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
        target_modules=lora_target_modules(options),
        modules_to_save=list(options.lora_modules_to_save) if options.lora_modules_to_save else None,
        bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def enable_gradient_checkpointing(model: torch.nn.Module, options: ModelOptions) -> None:
    # Non-reentrant checkpointing works with frozen inputs and under FSDP/DDP; the reentrant kind
    # needs an input that requires grad, which frozen embeddings (adapters) do not provide.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if options.uses_adapter:
        model.enable_input_require_grads()


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters. Under ZeRO-3 the weights are partitioned as they load: a parameter's
    local numel() is then 0 and its full size is DeepSpeed's ds_numel."""
    def size(p: torch.nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", 0) or p.numel())

    params = list(model.parameters())
    return sum(size(p) for p in params if p.requires_grad), sum(size(p) for p in params)


def load_model(options: ModelOptions, *, vocab_size: int, device_index: int | None = None) -> torch.nn.Module:
    """The trainable model, not yet placed or wrapped (accelerator.prepare does that)."""
    model = load_base_model(options, device_index=device_index)
    match_vocabulary(model, vocab_size, shrink=options.shrink_embeddings)
    if options.quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=options.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif options.gradient_checkpointing:
        enable_gradient_checkpointing(model, options)
    if options.uses_adapter or options.quantized:
        model = add_adapter(model, options)
    trainable, total = parameter_counts(model)
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}",
             100 * trainable / max(total, 1))
    return model
