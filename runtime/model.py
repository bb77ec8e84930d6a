"""The model to train: base weights (local directory or hub id), quantisation, adapters, checkpointing.

Everything comes from the run plan's ``model`` section (``ModelPlan``) plus the attention kernel the trainer
chose for this machine; nothing here has a default of its own.

Precision policy (the "why" behind the dtypes):
- full fine-tuning keeps fp32 master weights; bf16/fp16 compute comes from autocast (accelerate's
  mixed precision), so the optimizer never updates half-precision weights;
- adapters (LoRA) load the frozen base in the compute dtype (half the memory) while peft keeps the
  small trainable adapter weights in fp32;
- QLoRA stores the base in 4-bit nf4 with double quantisation and computes in bf16 (in fp16 when the run's
  precision is fp16; an fp32 run still computes the 4-bit layers in bf16, as bitsandbytes expects).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..schemas.run_plan import LoraPlan, ModelPlan
from .errors import RuntimeUserError

log = logging.getLogger(__name__)

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZED_COMPUTE_DTYPE = torch.bfloat16  # bitsandbytes' 4-bit matmuls when the run's precision is fp32


class ModelLoadError(RuntimeUserError):
    """The base model or adapter cannot be loaded; the message names it and says what to do."""


def uses_adapter(model: ModelPlan) -> bool:
    """Whether the run trains a LoRA adapter (lora or qlora) rather than the whole model."""
    return model.adapter is not None


def is_quantized(model: ModelPlan) -> bool:
    """Whether the frozen base is loaded in 4 or 8 bits (QLoRA, or LoRA on an 8-bit base)."""
    return model.load_in_4bit or model.load_in_8bit or model.adapter == "qlora"


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


def compute_dtype(model: ModelPlan) -> torch.dtype:
    """The dtype quantised layers compute in: the run's half precision, bf16 for an fp32 run."""
    return HALF.get(model.precision, QUANTIZED_COMPUTE_DTYPE)


def weights_dtype(model: ModelPlan) -> torch.dtype:
    if is_quantized(model):
        return compute_dtype(model)
    if uses_adapter(model) and model.precision in HALF:
        return HALF[model.precision]
    return torch.float32


def quantization_config(model: ModelPlan) -> Any:
    if not is_quantized(model):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError("load_in_4bit / load_in_8bit need bitsandbytes (and a CUDA GPU): "
                             "pip install 'tunefile[qlora]'") from None
    from transformers import BitsAndBytesConfig

    if model.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype(model))


def from_pretrained(base_model: str, **kwargs: Any) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` of a plan's base_model (offline-aware), with a missing or
    unreadable model reported as one line."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(resolve_model_source(base_model), **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"base_model {base_model}: cannot load: {exc}") from None


def load_base_model(model: ModelPlan, *, attn_implementation: str,
                    device_index: int | None = None) -> torch.nn.Module:
    kwargs: dict[str, Any] = {
        "dtype": weights_dtype(model),
        "attn_implementation": attn_implementation,
        "trust_remote_code": model.trust_remote_code,
    }
    quant = quantization_config(model)
    if quant is not None:
        # bitsandbytes quantises while loading, straight onto this process's GPU.
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": 0 if device_index is None else device_index}
    module = from_pretrained(model.base_model, **kwargs)
    module.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    return module


def match_vocabulary(module: torch.nn.Module, vocab_size: int, *, shrink: bool) -> None:
    """Grow the embeddings when the tokenizer gained tokens (pad, special tokens); shrink only on request."""
    current = module.get_input_embeddings().num_embeddings
    if vocab_size > current or (shrink and vocab_size < current):
        log.info("resizing token embeddings %d → %d", current, vocab_size)
        module.resize_token_embeddings(vocab_size)


def lora_target_modules(lora: LoraPlan) -> str | list[str]:
    if lora.target_linear:
        return "all-linear"  # peft: every nn.Linear except the output head
    if not lora.target_modules:
        raise ModelLoadError("model.lora: neither target_linear nor target_modules is set; recompile the config "
                             "with `tunefile compile`")
    return list(lora.target_modules)


def add_adapter(module: torch.nn.Module, lora: LoraPlan) -> torch.nn.Module:
    """A fresh LoRA adapter on ``module`` as ``lora`` describes it, or the one in lora.model_dir to continue."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if lora.model_dir is not None:
        if not Path(lora.model_dir).is_dir():
            raise ModelLoadError(f"lora_model_dir {lora.model_dir}: not a directory")
        log.info("continuing training of the adapter in %s", lora.model_dir)
        return PeftModel.from_pretrained(module, lora.model_dir, is_trainable=True)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora_target_modules(lora),
        modules_to_save=list(lora.modules_to_save) if lora.modules_to_save else None,
        bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(module, config)


def enable_gradient_checkpointing(module: torch.nn.Module, *, adapter: bool) -> None:
    # Non-reentrant checkpointing works with frozen inputs and under FSDP/DDP; the reentrant kind
    # needs an input that requires grad, which frozen embeddings (adapters) do not provide.
    module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapter:
        module.enable_input_require_grads()


def parameter_counts(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters. Under ZeRO-3 the weights are partitioned as they load: a parameter's
    local numel() is then 0 and its full size is DeepSpeed's ds_numel."""
    def size(p: torch.nn.Parameter) -> int:
        return int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel()

    params = list(module.parameters())
    return sum(size(p) for p in params if p.requires_grad), sum(size(p) for p in params)


def load_model(model: ModelPlan, *, attn_implementation: str, vocab_size: int,
               device_index: int | None = None) -> torch.nn.Module:
    """The trainable model, not yet placed or wrapped (accelerator.prepare does that). ``attn_implementation``
    is the kernel this machine runs (the plan's, or the fallback the trainer chose); ``vocab_size`` the
    tokenizer's length."""
    quantized = is_quantized(model)
    if quantized and model.lora is None:
        raise ModelLoadError("model: a quantised base (load_in_4bit / load_in_8bit) needs an adapter, and the plan "
                             "has none; recompile the config with `tunefile compile`")
    module = load_base_model(model, attn_implementation=attn_implementation, device_index=device_index)
    match_vocabulary(module, vocab_size, shrink=model.shrink_embeddings)
    if quantized:
        from peft import prepare_model_for_kbit_training

        module = prepare_model_for_kbit_training(
            module, use_gradient_checkpointing=model.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif model.gradient_checkpointing:
        enable_gradient_checkpointing(module, adapter=uses_adapter(model))
    if model.lora is not None:
        module = add_adapter(module, model.lora)
    trainable, total = parameter_counts(module)
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}",
             100 * trainable / max(total, 1))
    return module
