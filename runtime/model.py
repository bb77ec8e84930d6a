"""The model to train: base weights (local directory or hub id), quantisation, adapters, checkpointing.

Everything comes from the run plan's ``model`` section (``ModelPlan``) plus the attention kernel the trainer
chose for this machine; nothing here has a default of its own.

Precision policy (the "why" behind the dtypes):
- full fine-tuning keeps fp32 master weights; bf16/fp16 compute comes from autocast (accelerate's
  mixed precision), so the optimizer never updates half-precision weights;
- half_precision_weights (Axolotl's bfloat16: true / float16: true) loads every weight, the trained ones too,
  in the run's half precision: no fp32 master copy, half the weight and optimizer memory. As in Axolotl, peft
  still upcasts a LoRA adapter's own weights to fp32 (its autocast_adapter_dtype, which Axolotl leaves on);
- adapters (LoRA) load the frozen base in the compute dtype (half the memory) while peft keeps the
  small trainable adapter weights in fp32;
- QLoRA stores the base in 4-bit nf4 with double quantisation and computes in bf16 (in fp16 when the run's
  precision is fp16; an fp32 run still computes the 4-bit layers in bf16, as bitsandbytes expects).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..schemas.run_plan import LoraPlan, ModelPlan
from .checkpoint_integrity import safetensors_problem
from .errors import RuntimeUserError
from .freeze import freeze_all_but
from .pretrained import (
    build_quantization_config,
    embedding_rows,
    overridden_config,
    quantization_change,
    revision_decision,
    revision_kwargs,
)

log = logging.getLogger(__name__)

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
LOFTQ_BITS = (4, 8)  # what peft's LoftQ quantises to: nf4 or int8
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


def resolve_model_source(name: str, revision: str | None = None) -> str:
    """A local directory as is; a hub id (at ``revision``) checked against the cache when offline, so the
    error names the model instead of surfacing as a connection failure deep inside transformers."""
    local = os.path.expanduser(name)  # `~` is expanded wherever a path is read, for every key
    if Path(local).is_dir():
        return local
    if Path(local).exists() or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"base_model {name}: not a model directory")
    if is_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
            at = f" at revision {revision}" if revision else ""
            raise ModelLoadError(f"base_model {name}{at}: not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                                 f"run `huggingface-cli download {name}` where there is network, or point "
                                 "base_model at a local directory")
    return name


def compute_dtype(model: ModelPlan) -> torch.dtype:
    """The dtype quantised layers compute in: the run's half precision, bf16 for an fp32 run."""
    return HALF.get(model.precision, QUANTIZED_COMPUTE_DTYPE)


def weights_dtype(model: ModelPlan) -> torch.dtype:
    if model.half_precision_weights:
        if model.precision not in HALF:
            raise ModelLoadError("model: half_precision_weights keeps the weights in the run's half precision, and "
                                 f"the precision is {model.precision}; recompile the config with `tunefile compile`")
        return HALF[model.precision]
    if is_quantized(model):
        return compute_dtype(model)
    if uses_adapter(model) and model.precision in HALF:
        return HALF[model.precision]
    return torch.float32


def quantization_config(model: ModelPlan) -> Any:
    """The quantisation config the base loads with: bitsandbytes' for load_in_4bit / load_in_8bit, or the plan's
    quantization_config (e.g. Mxfp4Config); None for neither. transformers takes one, so both is an error."""
    if model.quantization_config is not None:
        if is_quantized(model):
            raise ModelLoadError("model: load_in_4bit / load_in_8bit and model_quantization_config cannot both be "
                                 "set (transformers loads with one quantisation config); keep one and recompile "
                                 "the config with `tunefile compile`")
        return build_quantization_config(model.quantization_config)
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
    """``AutoModelForCausalLM.from_pretrained`` of a plan's base_model (offline-aware, at ``kwargs``' revision),
    with a missing or unreadable model reported as one line."""
    from transformers import AutoModelForCausalLM

    source: str | Path = base_model
    try:
        source = resolve_model_source(base_model, kwargs.get("revision"))
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"base_model {base_model}: cannot load: {exc}") from None
    except Exception as exc:
        damaged = damaged_weights(exc, source)
        if damaged is None:
            raise
        raise ModelLoadError(f"base_model {base_model}: {damaged}") from None


def damaged_weights(exc: BaseException, folder: str | Path) -> str | None:
    """The one line for weights that do not read (a truncated download, a disk error): safetensors raises its own
    SafetensorError, not an OSError. Names the first .safetensors file in FOLDER whose header does not read, when
    FOLDER is local. None when EXC is something else."""
    if type(exc).__name__ != "SafetensorError":
        return None
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    culprit = next((file for file in files if safetensors_problem(file) is not None), None)
    where = f"{culprit} does not read" if culprit is not None else "its weights do not read"
    return f"{where} ({reason}): a truncated or damaged file; download or copy it again"


def load_pretrained(model: ModelPlan, source: str, **kwargs: Any) -> torch.nn.Module:
    """from_pretrained of ``source`` (the plan's base_model, or a folder holding a fine-tuned copy) with what the
    plan says about every load of the base: its revision (hub ids only), its configuration overrides (set on the
    configuration before the model is built from it), trust_remote_code."""
    revision = revision_kwargs(source, model.revision)
    try:
        config = overridden_config(model, resolve_model_source(source, model.revision), revision=revision)
    except OSError as exc:
        raise ModelLoadError(f"base_model {source}: cannot read its configuration: {exc}") from None
    if config is not None:
        kwargs["config"] = config
    scratch = model.from_scratch and source == model.base_model
    with experts_construction(model, source, revision=revision, scratch=scratch):
        if scratch:
            module = from_scratch(model, source, revision=revision, **kwargs)
        else:
            module = from_pretrained(source, trust_remote_code=model.trust_remote_code, **revision, **kwargs)
    if model.llama4_linearized_experts:
        from .llama4_experts import finish_linearizing

        finish_linearizing(module, source=source)
    return module


def experts_construction(model: ModelPlan, source: str, *, revision: dict[str, Any],
                         scratch: bool) -> contextlib.AbstractContextManager[Any]:
    """With llama4_linearized_experts and a checkpoint that already stores the experts linearized: build the
    model with linear experts, so its tensors load straight into them (llama4_experts.py); otherwise nothing,
    and a fused checkpoint is converted after loading."""
    if not model.llama4_linearized_experts or scratch:
        return contextlib.nullcontext()
    from .llama4_experts import checkpoint_layout, checkpoint_tensor_names, linearized_construction

    names = checkpoint_tensor_names(resolve_model_source(source, model.revision), revision=revision)
    return linearized_construction() if checkpoint_layout(names) == "linearized" else contextlib.nullcontext()


def from_scratch(model: ModelPlan, source: str, *, revision: dict[str, Any], **kwargs: Any) -> torch.nn.Module:
    """The base model's architecture with fresh weights (Axolotl's reinit_weights), initialised by the model's
    own scheme from the seeded RNG; only its configuration is read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = kwargs.pop("config", None)
    if config is None:
        try:
            config = AutoConfig.from_pretrained(resolve_model_source(source, model.revision),
                                                trust_remote_code=model.trust_remote_code, **revision)
        except OSError as exc:
            raise ModelLoadError(f"base_model {source}: cannot read its configuration: {exc}") from None
    log.info("reinit_weights: %s's architecture with fresh random weights", source)
    return AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code, **kwargs)


def load_base_model(model: ModelPlan, *, attn_implementation: str, device_index: int | None = None,
                    decisions: dict[str, Any] | None = None) -> torch.nn.Module:
    """The base weights as training uses them. ``decisions`` receives what this machine decided about loading
    them (where the revision applied, a quantisation transformers changed), for the run's runtime decisions."""
    kwargs: dict[str, Any] = {"dtype": weights_dtype(model), "attn_implementation": attn_implementation}
    quant = quantization_config(model)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if is_quantized(model):  # bitsandbytes quantises while loading, straight onto this process's GPU
            kwargs["device_map"] = {"": 0 if device_index is None else device_index}
    placement = None
    if model.ple_cpu_offload:  # the parameters the model keeps off the GPU stay out of the map (ple_offload.py)
        from .ple_offload import plan_host_placement

        placement = plan_host_placement(model, source=resolve_model_source(model.base_model, model.revision),
                                        quantized=is_quantized(model), device=device_index or 0)
        kwargs["device_map"] = placement.device_map
    built = dict(vars(quant)) if quant is not None else {}
    module = load_pretrained(model, model.base_model, **kwargs)
    host_memory = placement.keep(module) if placement is not None else {}
    if model.llama4_linearized_experts and is_quantized(model):
        # Experts converted from a fused checkpoint after loading are still 16-bit nn.Linear layers.
        from .llama4_experts import quantize_linearized_experts

        quantize_linearized_experts(module, quant)
    module.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    revision = revision_decision(model)
    if revision is not None and revision.startswith("ignored"):
        log.warning("revision_of_model %s: %s", model.revision, revision)
    change = quantization_change(quant, built, module)
    if change is not None:
        log.warning("model_quantization_config: %s", change)
    if decisions is not None:
        decisions.update({key: value for key, value in (("revision", revision), ("quantization", change))
                          if value is not None} | host_memory)
    return module


def match_vocabulary(module: torch.nn.Module, vocab_size: int, *, shrink: bool,
                     pad_to_multiple_of: int | None = None) -> None:
    """Grow the embeddings when the tokenizer gained tokens (pad, special tokens); shrink only on request.

    With ``pad_to_multiple_of`` (Axolotl's resize_token_embeddings_to_32x) the size aimed at is the tokenizer's
    length rounded up to that multiple, so, as in Axolotl, a matrix that already covers every token still grows
    to the next multiple, and a shrink stops at it."""
    current = module.get_input_embeddings().num_embeddings
    rows = embedding_rows(vocab_size, pad_to_multiple_of)
    if rows > current or (shrink and rows < current):
        log.info("resizing token embeddings %d → %d", current, rows)
        module.resize_token_embeddings(vocab_size, pad_to_multiple_of=pad_to_multiple_of)


def lora_target_modules(lora: LoraPlan) -> str | list[str]:
    """peft's target_modules: a list of module names, or one string, which peft reads as "all-linear" or as a
    regular expression a module's full name must match entirely (re.fullmatch)."""
    if lora.target_linear:
        return "all-linear"  # peft: every nn.Linear except the output head
    if lora.target_modules_regex is not None:
        return lora.target_modules_regex
    if not lora.target_modules:
        raise ModelLoadError("model.lora: none of target_linear, target_modules and target_modules_regex is set; "
                             "recompile the config with `tunefile compile`")
    return list(lora.target_modules)


def lora_parameter_options(lora: LoraPlan, config_fields: Any) -> dict[str, Any]:
    """target_parameters for LoraConfig, when the plan names any: LoRA on bare nn.Parameters (MoE experts kept
    as one 3-D tensor), which peft supports since 0.17."""
    if not lora.target_parameters:
        return {}
    if "target_parameters" not in config_fields:
        import peft

        raise ModelLoadError(f"lora_target_parameters needs peft>=0.17 (this is peft {peft.__version__}): "
                             "pip install -U peft")
    return {"target_parameters": list(lora.target_parameters)}


def check_loftq(lora: LoraPlan | None, *, quantized: bool) -> None:
    """Refuse LoftQ where peft cannot run it, before any weight loads. peft (0.21) quantises each target weight
    with bitsandbytes on a CUDA (or XPU) device to compute the initialisation, and has no CPU path, so no
    fallback would keep LoftQ's meaning: the base then trains on its quantised-and-restored weights."""
    if lora is None or lora.loftq_bits is None or lora.model_dir is not None:
        return
    if quantized:
        raise ModelLoadError("peft.loftq_config: LoftQ initialises an adapter on the unquantised base, and the plan "
                             "loads it in 4 or 8 bits (qlora / load_in_*bit); recompile the config with "
                             "`tunefile compile`")
    if lora.loftq_bits not in LOFTQ_BITS:
        raise ModelLoadError(f"peft.loftq_config.loftq_bits: peft's LoftQ quantises to 4 (nf4) or 8 (int8) bits, "
                             f"not {lora.loftq_bits}")
    require_loftq_machine(lora.loftq_bits)


def require_loftq_machine(bits: int) -> None:
    """What peft's LoftQ needs of the machine. Loading a saved LoftQ adapter (merge, inference) runs LoftQ again:
    peft rebuilds the quantised base the adapter was trained against, so those commands need the same."""
    import importlib.util

    from peft.import_utils import is_bnb_4bit_available, is_bnb_available, is_xpu_available

    if not (is_bnb_available() and (bits == 8 or is_bnb_4bit_available())):
        raise ModelLoadError("peft.loftq_config: LoftQ quantises with bitsandbytes, which is not installed: "
                             "pip install 'tunefile[qlora]'")
    if not (torch.cuda.is_available() or is_xpu_available()):
        raise ModelLoadError("peft.loftq_config: peft's LoftQ runs on a CUDA GPU only (it quantises with "
                             "bitsandbytes there); this machine has none")
    if importlib.util.find_spec("scipy") is None:
        raise ModelLoadError("peft.loftq_config: peft's LoftQ needs scipy: pip install scipy")


def lora_init_options(lora: LoraPlan) -> dict[str, Any]:
    """LoraConfig's initialisation: peft's default (A random, B zero), or LoftQ (Axolotl's peft.loftq_config):
    each target weight W is replaced by its loftq_bits quantisation Q and the adapter starts from the
    rank-r SVD of W - Q. peft does not scale that start by lora_alpha / r (peft issue #1982), nor does Axolotl:
    base plus adapter then approximates W only when lora_alpha equals r."""
    if lora.loftq_bits is None:
        return {}
    from peft import LoftQConfig

    return {"init_lora_weights": "loftq", "loftq_config": LoftQConfig(loftq_bits=lora.loftq_bits)}


def lora_config(lora: LoraPlan) -> Any:
    """peft's LoraConfig for a fresh adapter as ``lora`` describes it."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora_target_modules(lora),
        fan_in_fan_out=lora.fan_in_fan_out, use_rslora=lora.use_rslora,
        modules_to_save=list(lora.modules_to_save) if lora.modules_to_save else None,
        bias="none", task_type="CAUSAL_LM", **lora_parameter_options(lora, LoraConfig.__dataclass_fields__),
        **lora_init_options(lora),
    )


def add_adapter(module: torch.nn.Module, lora: LoraPlan) -> torch.nn.Module:
    """A fresh LoRA adapter on ``module`` as ``lora`` describes it, or the one in lora.model_dir to continue."""
    from peft import PeftModel, get_peft_model

    if lora.model_dir is not None:
        adapter_dir = Path(lora.model_dir).expanduser()
        if not adapter_dir.is_dir():
            raise ModelLoadError(f"lora_model_dir {lora.model_dir}: not a directory")
        log.info("continuing training of the adapter in %s", lora.model_dir)
        try:
            return PeftModel.from_pretrained(module, str(adapter_dir), is_trainable=True)
        except Exception as exc:
            damaged = damaged_weights(exc, adapter_dir)
            if damaged is None:
                raise
            raise ModelLoadError(f"lora_model_dir {lora.model_dir}: {damaged}") from None
    check_loftq(lora, quantized=False)
    if lora.loftq_bits is not None:
        log.info("LoftQ: quantising each LoRA target to %d bits and starting the adapter from the residual",
                 lora.loftq_bits)
    return get_peft_model(module, lora_config(lora))


def enable_gradient_checkpointing(module: torch.nn.Module, kwargs: dict[str, Any], *, frozen_inputs: bool,
                                  every_n_layers: int = 1) -> None:
    """Checkpoint decoder layers 0, n, 2n, … (every one for n = 1) with ``kwargs`` (torch.utils.checkpoint's,
    e.g. use_reentrant). ``frozen_inputs``: the input embeddings do not train (an adapter, or
    unfrozen_parameters without them)."""
    if hasattr(module, "activation_checkpointing_enable"):  # transformers 5 renamed it; the old name warns
        module.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(kwargs))
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(kwargs))
    checkpoint_every_nth_layer(module, every_n_layers)
    if frozen_inputs:
        # Reentrant checkpointing computes no gradient for a layer whose input does not require one, and frozen
        # embeddings produce such an input: every layer would silently stop training. A hook that marks the
        # embeddings' output as requiring grad fixes that (and costs nothing without reentrancy).
        module.enable_input_require_grads()


def checkpoint_every_nth_layer(module: torch.nn.Module, every_n: int) -> None:
    """Keep checkpointing on for decoder layers 0, n, 2n, … and turn it off for the others, which then keep their
    activations: full checkpointing recomputes every layer's forward (about a third more compute), and where it
    frees more memory than the run needs, recomputing fewer layers buys the speed back. Each layer checks its own
    ``gradient_checkpointing`` flag at every call (transformers' GradientCheckpointingLayer)."""
    if every_n <= 1:
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [layer for layer in module.modules()
              if isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing]
    for index, layer in enumerate(layers):
        if index % every_n:
            layer.gradient_checkpointing = False
    log.info("gradient checkpointing: %d of %d decoder layers (every %d-th, from the first)",
             -(-len(layers) // every_n), len(layers), every_n)


def input_embeddings_train(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.get_input_embeddings().parameters())


def parameter_counts(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters. Under ZeRO-3 the weights are partitioned as they load: a parameter's
    local numel() is then 0 and its full size is DeepSpeed's ds_numel."""
    def size(p: torch.nn.Parameter) -> int:
        return int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel()

    params = list(module.parameters())
    return sum(size(p) for p in params if p.requires_grad), sum(size(p) for p in params)


def quantize_experts(module: torch.nn.Module, model: ModelPlan) -> Any:
    """The plan's quantize_moe_experts on the loaded base: its 3-D expert weights to the bits of load_in_4bit /
    load_in_8bit (moe_quantization.py); None when the plan does not ask."""
    if not model.quantize_moe_experts:
        return None
    if not is_quantized(model):
        raise ModelLoadError("model: quantize_moe_experts quantises expert weights to the bits of load_in_4bit or "
                             "load_in_8bit, and the plan sets neither; recompile the config with `tunefile compile`")
    from .moe_quantization import quantize_moe_experts

    return quantize_moe_experts(module, bits=8 if model.load_in_8bit else 4)


def load_model(model: ModelPlan, *, attn_implementation: str, vocab_size: int,
               device_index: int | None = None, decisions: dict[str, Any] | None = None) -> torch.nn.Module:
    """The trainable model, not yet placed or wrapped (accelerator.prepare does that). ``attn_implementation``
    is the kernel this machine runs (the plan's, or the fallback the trainer chose); ``vocab_size`` the
    tokenizer's length; ``decisions`` receives what loading decided on this machine (load_base_model)."""
    quantized = is_quantized(model)
    if quantized and model.lora is None:
        raise ModelLoadError("model: a quantised base (load_in_4bit / load_in_8bit) needs an adapter, and the plan "
                             "has none; recompile the config with `tunefile compile`")
    check_loftq(model.lora, quantized=quantized)  # before loading: LoftQ needs what peft runs it with
    if quantized and model.qat is not None:
        raise ModelLoadError("model: qat fake-quantises full-precision weights and cannot train a quantised base "
                             "(load_in_4bit / load_in_8bit / qlora); recompile the config with `tunefile compile`")
    module = load_base_model(model, attn_implementation=attn_implementation, device_index=device_index,
                             decisions=decisions)
    # MoE experts kept as 3-D tensors: quantised now, before k-bit preparation would upcast them; their
    # dequantisation goes in after the adapter (moe_quantization.py says why).
    experts = quantize_experts(module, model)
    match_vocabulary(module, vocab_size, shrink=model.shrink_embeddings,
                     pad_to_multiple_of=model.pad_embeddings_to_multiple_of)
    if model.qat is not None:  # after the resize (a new embedding), before the hooks and adapter on the layers
        from .qat import prepare_qat

        prepare_qat(module, model.qat, decisions=decisions)
    if model.unfrozen_parameters is not None:  # before checkpointing, which needs to know what is frozen
        freeze_all_but(module, model.unfrozen_parameters)
    if quantized:
        from peft import prepare_model_for_kbit_training

        from .ple_offload import host_parameters_keep_their_dtype

        with host_parameters_keep_their_dtype(module, model.ple_cpu_offload):  # no fp32 copy of a host table
            module = prepare_model_for_kbit_training(
                module, use_gradient_checkpointing=model.gradient_checkpointing,
                gradient_checkpointing_kwargs=dict(model.gradient_checkpointing_kwargs))
        if model.gradient_checkpointing:
            checkpoint_every_nth_layer(module, model.gradient_checkpointing_every_n_layers)
    elif model.gradient_checkpointing:
        enable_gradient_checkpointing(module, model.gradient_checkpointing_kwargs,
                                      frozen_inputs=uses_adapter(model) or not input_embeddings_train(module),
                                      every_n_layers=model.gradient_checkpointing_every_n_layers)
    if model.lora is not None:
        module = add_adapter(module, model.lora)
    if model.ple_cpu_offload:  # DDP leaves the parameters kept in host memory alone (ple_offload.py)
        from .ple_offload import ignore_in_ddp

        ignore_in_ddp(module)
    if experts is not None:
        experts.dequantize_on_access(module)
    trainable, total = parameter_counts(module)
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}",
             100 * trainable / max(total, 1))
    return module
