"""Quantise MoE expert weights kept as 3-D parameters, which load_in_4bit / load_in_8bit do not reach.

transformers 5 keeps a MoE layer's experts as one module holding stacked weights (``experts.gate_up_proj`` of
shape [experts, 2·intermediate, hidden], ``experts.down_proj``) that its forward indexes expert by expert.
bitsandbytes' loading replaces nn.Linear layers only, so these tensors, most of the model's weights, would stay
in bf16. Here each one is quantised with bitsandbytes and put back behind a torch parametrization that
dequantises it whenever the module reads the attribute: the model's expert code runs unchanged, the weight stays
frozen, and peft's LoRA on parameters (lora_target_parameters) adds its update on top of the dequantised value.

What the order of the steps and the parametrization cache must get right:
1. peft's k-bit preparation upcasts every bf16/fp16 parameter to fp32, which would double the expert stacks
   before they are quantised. So quantisation comes first, right after loading (``quantize_expert_weights``),
   and leaves in each parameter's place a placeholder of the same shape that holds no memory.
2. peft treats a parametrized module differently from a plain one: it matches target_parameters there by full
   name only, and nests the wrappers of one module in sorted name order rather than the parameters' definition
   order, so that adapter would not load on the unquantised model (merging, vLLM). With placeholders the
   adapter goes on as on any model; the parametrizations are attached after it (``dequantize_on_access``).
3. Expert code reads a stacked tensor once per expert; without a cache each read would dequantise all experts.
   Each quantised module's forward runs inside ``parametrize.cached()``, a context manager, so the cache is
   also closed when non-reentrant checkpointing ends a recomputation early by raising (a pair of forward hooks
   would miss that exit and leave the cache on for good). Values cached before peft registered its LoRA update
   (peft reads the parameter while registering) are dropped as the forward starts.
4. peft (0.21) removes its per-forward LoRA update from a parameter only when it recognises the update's class,
   and misses the factored one it uses for experts once another parametrization (ours) is present: the
   updates would pile up, one per forward. After each LoRA wrapper's forward its parameter is brought back to
   the dequantisation alone.

bitsandbytes quantises on CUDA only: an expert weight on another device is an error, never a fallback.

Memory: loading still reads the experts in bf16 first (quantisation follows it; Axolotl instead patches
transformers' loader to quantise tensor by tensor), so the GPU must hold them once. In training, the expert
matmuls keep slices of the dequantised stack for backward: with gradient checkpointing that is one layer's
worth at a time, without it every layer's, as if unquantised.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import RuntimeUserError

log = logging.getLogger(__name__)

EXPERT_MARKER = "expert"  # in the parameter's full name: 3-D weights elsewhere (convolutions) are not experts
NF4_BLOCKSIZE = 64  # as BitsAndBytesConfig's default, which model.py's load_in_4bit uses for nn.Linear
PEFT_UNREMOVED_UPDATE = "Could not find any LoRA parametrization"  # peft's warning for what point 4 cleans up


class ExpertQuantizationError(RuntimeUserError):
    """quantize_moe_experts cannot run here (no bitsandbytes, weights not on a CUDA GPU)."""


class WeightQuantizer(Protocol):
    """Turns a weight into stored data plus what dequantising needs, and back."""

    name: str

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, Any]: ...

    def dequantize(self, stored: torch.Tensor, state: Any) -> torch.Tensor: ...


class Nf4Quantizer:
    """4-bit NormalFloat in blocks of 64 with double quantisation of the block scales: what load_in_4bit gives
    the model's nn.Linear layers (model.py)."""

    name = "nf4"

    def __init__(self, functional: Any) -> None:
        self.functional = functional  # bitsandbytes.functional

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, Any]:
        require_cuda(weight)
        return self.functional.quantize_4bit(weight, blocksize=NF4_BLOCKSIZE, compress_statistics=True,
                                             quant_type="nf4")

    def dequantize(self, stored: torch.Tensor, state: Any) -> torch.Tensor:
        return self.functional.dequantize_4bit(stored, state)


class Int8Quantizer:
    """int8 with one absmax scale per row of the last dimension (bitsandbytes' vectorwise quantisation, the
    way LLM.int8 stores weights). Its kernel reads fp16, hence the range check."""

    name = "int8"

    def __init__(self, functional: Any) -> None:
        self.functional = functional

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, Any]:
        require_cuda(weight)
        if weight.abs().max() > torch.finfo(torch.float16).max:
            raise ExpertQuantizationError("quantize_moe_experts with load_in_8bit: an expert weight exceeds the "
                                          "float16 range that bitsandbytes' int8 quantisation reads")
        rows = weight.reshape(-1, weight.shape[-1]).to(torch.float16)
        stored, row_scales, _ = self.functional.int8_vectorwise_quant(rows)
        return stored, row_scales

    def dequantize(self, stored: torch.Tensor, state: Any) -> torch.Tensor:
        return self.functional.int8_vectorwise_dequant(stored, state)


def require_cuda(weight: torch.Tensor) -> None:
    if weight.device.type != "cuda":
        raise ExpertQuantizationError(f"quantize_moe_experts: bitsandbytes quantises on a CUDA GPU only, and the "
                                      f"expert weights are on {weight.device.type}")


def bitsandbytes_quantizer(*, bits: int) -> WeightQuantizer:
    """NF4 for 4 bits, row-wise int8 for 8, from bitsandbytes (imported here: CUDA machines only)."""
    try:
        import bitsandbytes.functional as functional
    except ImportError:
        raise ExpertQuantizationError("quantize_moe_experts needs bitsandbytes (and a CUDA GPU): "
                                      "pip install 'tunefile[qlora]'") from None
    return Nf4Quantizer(functional) if bits == 4 else Int8Quantizer(functional)


class DequantizedWeight(nn.Module):
    """The parametrization: stored data → the weight in its original shape and dtype, on every read (cached
    for the length of one forward of its module)."""

    def __init__(self, quantizer: WeightQuantizer, state: Any, shape: torch.Size, dtype: torch.dtype) -> None:
        super().__init__()
        # ``state`` may hold tensors (bitsandbytes' QuantState); they stay where quantisation put them, like the
        # rest of a bitsandbytes model, which is never moved after loading.
        self.quantizer, self.state, self.shape, self.weight_dtype = quantizer, state, shape, dtype

    @torch.no_grad()
    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return self.quantizer.dequantize(stored, self.state).reshape(self.shape).to(self.weight_dtype)

    def extra_repr(self) -> str:
        return f"{self.quantizer.name}, shape={tuple(self.shape)}, dtype={self.weight_dtype}"


@dataclass
class StoredWeight:
    """One quantised expert weight waiting behind its placeholder."""

    module: nn.Module
    name: str
    stored: torch.Tensor
    state: Any
    shape: torch.Size
    dtype: torch.dtype


def find_expert_weights(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(full name, module, parameter name) of every floating-point parameter of 3 or more dimensions whose
    name says expert, registered directly on its module, in module order and then definition order."""
    found = []
    for module_name, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue  # already quantised: the stored data lives here as `original`
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if param.ndim >= 3 and param.is_floating_point() and EXPERT_MARKER in full.lower():
                found.append((full, module, name))
    return found


def placeholder(like: torch.Tensor) -> nn.Parameter:
    """A frozen parameter of ``like``'s shape and device that holds one number: one fp32 zero, expanded.
    fp32 because peft's k-bit preparation copies bf16/fp16 parameters to fp32, which would materialise it."""
    return nn.Parameter(torch.zeros((), dtype=torch.float32, device=like.device).expand(like.shape),
                        requires_grad=False)


class QuantizedExperts:
    """Expert weights quantised by ``quantize_expert_weights``; ``dequantize_on_access`` puts them in use."""

    def __init__(self, quantizer: WeightQuantizer, weights: list[StoredWeight]) -> None:
        self.quantizer, self.weights = quantizer, weights
        self.attached = False

    @property
    def count(self) -> int:
        return len(self.weights)

    def dequantize_on_access(self, model: nn.Module) -> None:
        """Swap each placeholder for the stored data behind a dequantising parametrization. ``model``: the
        model as it is now (peft-wrapped or not), searched for the LoRA wrappers of these weights."""
        if self.attached:
            return
        modules: dict[int, tuple[nn.Module, list[str]]] = {}
        for weight in self.weights:
            setattr(weight.module, weight.name, nn.Parameter(weight.stored, requires_grad=False))
            parametrize.register_parametrization(
                weight.module, weight.name, DequantizedWeight(self.quantizer, weight.state, weight.shape, weight.dtype),
                unsafe=True)  # unsafe: the stored data has another dtype and shape than the weight it stands for
            modules.setdefault(id(weight.module), (weight.module, []))[1].append(weight.name)
        for module, names in modules.values():
            read_once_per_forward(module, tuple(names))
        for wrapper in lora_parameter_wrappers(model, {id(module) for module, _ in modules.values()}):
            restore_after_forward(wrapper)
        self.attached = True


def quantize_expert_weights(model: nn.Module, quantizer: WeightQuantizer) -> QuantizedExperts:
    """Quantise every expert weight of ``model`` now, freeing its original memory as it goes, and leave a
    placeholder in its place until ``dequantize_on_access``."""
    stored = []
    for full_name, module, name in find_expert_weights(model):
        weight = getattr(module, name)
        data, state = quantizer.quantize(weight.data)
        stored.append(StoredWeight(module, name, data, state, weight.shape, weight.dtype))
        setattr(module, name, placeholder(weight))
        del weight  # the last reference: its memory goes back before the next one is quantised
        log.debug("quantised %s to %s", full_name, quantizer.name)
    if stored and stored[0].stored.is_cuda:
        torch.cuda.empty_cache()
    return QuantizedExperts(quantizer, stored)


def read_once_per_forward(module: nn.Module, names: tuple[str, ...]) -> None:
    """Run ``module``'s forward with the parametrization cache on, so each weight is dequantised once per forward
    however many times the expert code indexes it."""
    forward = module.forward

    @functools.wraps(forward)
    def forward_reading_once(*args: Any, **kwargs: Any) -> Any:
        # torch keys its cache by (id(module), name) and has no public way to drop one entry. A value cached
        # while an outer LoRA wrapper had the cache on was read before an inner wrapper registered its update
        # (see point 3 of the module docstring): drop it so the first read below sees every update.
        for name in names:
            parametrize._cache.pop((id(module), name), None)
        with parametrize.cached():
            return forward(*args, **kwargs)

    module.forward = forward_reading_once


def lora_parameter_wrappers(model: nn.Module, module_ids: set[int]) -> list[nn.Module]:
    """peft's LoRA wrappers (lora.ParamWrapper, recognised by their parameter_name and base layer) around the
    modules in ``module_ids``."""
    return [module for module in model.modules() if isinstance(getattr(module, "parameter_name", None), str)
            and callable(getattr(module, "get_base_layer", None)) and id(module.get_base_layer()) in module_ids]


def restore_after_forward(wrapper: nn.Module) -> None:
    """After each forward of a LoRA wrapper, leave its parameter with the dequantisation alone (point 4), and
    keep peft's warning about the update it could not remove out of the log: this removes it."""
    forward = wrapper.forward
    base, name = wrapper.get_base_layer(), wrapper.parameter_name

    @functools.wraps(forward)
    def forward_then_restore(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=PEFT_UNREMOVED_UPDATE)
                return forward(*args, **kwargs)
        finally:
            remove_updates(base, name)

    wrapper.forward = forward_then_restore


def remove_updates(module: nn.Module, name: str) -> None:
    """Drop every parametrization of ``module.name`` stacked after the dequantisation."""
    if not parametrize.is_parametrized(module, name):
        return
    stack = module.parametrizations[name]
    for index in reversed(range(len(stack))):
        if not isinstance(stack[index], DequantizedWeight):
            del stack[index]


def quantize_moe_experts(model: nn.Module, *, bits: int,
                         make_quantizer: Callable[..., WeightQuantizer] = bitsandbytes_quantizer) -> QuantizedExperts:
    """The plan's quantize_moe_experts: every expert weight of ``model`` to ``bits`` bits, logged in one line."""
    experts = quantize_expert_weights(model, make_quantizer(bits=bits))
    if experts.count:
        log.info("quantize_moe_experts: %d expert weight tensors quantised to %s", experts.count,
                 experts.quantizer.name)
    else:
        log.warning("quantize_moe_experts: the model has no 3-D expert weights (its experts, if any, are "
                    "nn.Linear layers, which load_in_4bit / load_in_8bit quantise already)")
    return experts
