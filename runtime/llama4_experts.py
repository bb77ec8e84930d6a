"""Llama 4's routed experts as one nn.Linear per expert and projection: the plan's
``model.llama4_linearized_experts`` (Axolotl's ``llama4_linearized_experts: true``).

transformers keeps a Llama 4 MoE layer's routed experts (``Llama4TextExperts``) as two stacked tensors:
``gate_up_proj`` of shape [experts, hidden, 2·intermediate] (the gate's columns first, then the up
projection's) and ``down_proj`` of shape [experts, intermediate, hidden], multiplied with ``torch.bmm``. LoRA's
target_linear and bitsandbytes' 4-bit loading only reach nn.Linear layers, so those tensors (most of the
model) would stay unadapted and in 16 bits. ``LinearizedLlama4Experts`` holds the same weights as
``gate_projs[e]``, ``up_projs[e]`` and ``down_projs[e]`` (Axolotl's names, so checkpoints and adapters
trained either way line up) and computes the same function.

Two checkpoint layouts reach the loader, and each needs its own order:
- a *linearized* checkpoint (what Axolotl's Llama 4 examples load, e.g. its pre-quantised nf4 ones), whose
  tensors are already named ``…experts.gate_projs.<e>.weight``: the model must be built with the linear
  experts before transformers reads the weights, so they load straight into the linear layers (and
  bitsandbytes quantises them, or reads their 4-bit form, as it loads); ``linearized_construction`` does that
  for the duration of one load, as Axolotl's class patch does for the whole process;
- a *fused* checkpoint (Meta's and Hugging Face's): transformers 5 loads it into its own module, and each one is
  replaced afterwards by ``linearize_experts``, its tensors sliced and transposed into the linear layers
  (exact, no arithmetic). With load_in_4bit / load_in_8bit those new layers are then quantised the way
  bitsandbytes' loading would have (``quantize_linearized_experts``), before k-bit preparation and the adapter.
Registering a weight conversion with transformers' loader instead would tie this to an internal API that
changes between releases, and could not read a pre-quantised linearized checkpoint anyway.

Memory: a fused checkpoint's experts are read in 16 bits before they are split (and quantised), one layer held
twice at a time, so the GPU must hold them in 16 bits once; a linearized checkpoint quantises as it loads.
A model trained this way is saved linearized (Axolotl's layout): load it again with the option on.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import nn

from .errors import RuntimeUserError

log = logging.getLogger(__name__)

LINEARIZED_MARK = ".experts.gate_projs."  # in a linearized checkpoint's tensor names
FUSED_MARK = ".experts.gate_up_proj"  # in a fused one's
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
Layout = Literal["fused", "linearized"]


class Llama4ExpertsError(RuntimeUserError):
    """llama4_linearized_experts cannot be applied to this model or on this machine; the message says why."""


class LinearizedLlama4Experts(nn.Module):
    """Llama4TextExperts' function with a separate bias-free nn.Linear for each expert's gate, up and down
    projection. Input and output are as transformers' module has them: the rows of all experts one after the
    other, [experts × rows, hidden], each expert's block already scaled by its router score."""

    def __init__(self, *, num_experts: int, hidden_size: int, expert_dim: int, act_fn: Callable[..., Any]) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.expert_dim = num_experts, hidden_size, expert_dim
        self.gate_projs = nn.ModuleList(nn.Linear(hidden_size, expert_dim, bias=False) for _ in range(num_experts))
        self.up_projs = nn.ModuleList(nn.Linear(hidden_size, expert_dim, bias=False) for _ in range(num_experts))
        self.down_projs = nn.ModuleList(nn.Linear(expert_dim, hidden_size, bias=False) for _ in range(num_experts))
        self.act_fn = act_fn

    @classmethod
    def from_config(cls, config: Any) -> LinearizedLlama4Experts:
        """Fresh layers for a Llama4TextConfig, on the current default device and dtype (transformers sets
        both while it builds a model, e.g. the meta device before loading weights)."""
        from transformers.activations import ACT2FN

        return cls(num_experts=config.num_local_experts, hidden_size=config.hidden_size,
                   expert_dim=config.intermediate_size, act_fn=ACT2FN[config.hidden_act])

    @classmethod
    @torch.no_grad()
    def from_fused(cls, fused: nn.Module) -> LinearizedLlama4Experts:
        """The same weights as ``fused`` (a transformers Llama4TextExperts), copied into linear layers of the
        fused tensors' dtype and device. nn.Linear computes x @ weight.T, so each weight is the transposed
        slice of the stacked tensor that bmm multiplies x with."""
        gate_up, down = fused.gate_up_proj, fused.down_proj
        if hasattr(gate_up, "ds_numel"):
            raise Llama4ExpertsError(
                "llama4_linearized_experts: DeepSpeed ZeRO-3 partitions the fused Llama 4 expert tensors as they "
                "load, so they cannot be split into linear layers; use a checkpoint saved with linearized experts "
                "(e.g. one trained with llama4_linearized_experts), or another strategy")
        experts, dim = fused.num_experts, fused.expert_dim
        with torch.device("meta"):
            linear = cls(num_experts=experts, hidden_size=fused.hidden_size, expert_dim=dim, act_fn=fused.act_fn)
        for e in range(experts):
            slices = ((linear.gate_projs[e], gate_up[e, :, :dim]), (linear.up_projs[e], gate_up[e, :, dim:]),
                      (linear.down_projs[e], down[e]))
            for layer, weight in slices:
                layer.weight = nn.Parameter(weight.t().contiguous(), requires_grad=gate_up.requires_grad)
        return linear

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        by_expert = hidden_states.view(self.num_experts, -1, self.hidden_size)
        outputs = [down(up(rows) * self.act_fn(gate(rows)))
                   for rows, gate, up, down in zip(by_expert, self.gate_projs, self.up_projs, self.down_projs,
                                                   strict=True)]
        return torch.stack(outputs).view(-1, self.hidden_size)


def fused_experts_class() -> type[nn.Module]:
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    return Llama4TextExperts


def linearize_experts(model: nn.Module) -> int:
    """Replace every fused Llama4TextExperts in ``model`` with its LinearizedLlama4Experts, one at a time so
    that only one layer's experts are held twice; the number replaced."""
    fused_class = fused_experts_class()
    names = [name for name, module in model.named_modules() if isinstance(module, fused_class)]
    for name in names:
        fused = model.get_submodule(name)
        model.set_submodule(name, LinearizedLlama4Experts.from_fused(fused))
        del fused
    return len(names)


def linearized_count(model: nn.Module) -> int:
    return sum(isinstance(module, LinearizedLlama4Experts) for module in model.modules())


@contextlib.contextmanager
def linearized_construction() -> Iterator[None]:
    """While inside, every Llama 4 MoE layer transformers builds gets LinearizedLlama4Experts for its experts,
    so a linearized checkpoint's tensors load straight into them.

    The MoE layer's constructor is wrapped rather than the experts class replaced (as Axolotl does): transformers'
    weight initialiser recognises the experts by that class and would look for the fused tensors on the
    replacement. The fused module the original constructor builds is dropped at once; while transformers
    builds a model to load into, it lives on the meta device and costs nothing."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    original = Llama4TextMoe.__init__

    def build_with_linear_experts(self: nn.Module, config: Any) -> None:
        original(self, config)
        self.experts = LinearizedLlama4Experts.from_config(config)

    Llama4TextMoe.__init__ = build_with_linear_experts
    try:
        yield
    finally:
        Llama4TextMoe.__init__ = original


def checkpoint_tensor_names(source: str, *, revision: dict[str, Any]) -> list[str] | None:
    """The tensor names of the checkpoint in ``source`` (a folder or a hub id, at ``revision``), read from its
    index or from its single file's header; None when it has neither (another format)."""
    from transformers.utils import cached_file

    def find(filename: str) -> str | None:
        return cached_file(source, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **revision)

    for filename in INDEX_FILES:
        path = find(filename)
        if path is not None:
            with open(path, encoding="utf-8") as handle:
                return list(json.load(handle)["weight_map"])
    path = find(SINGLE_FILES[0])
    if path is not None:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            return list(handle.keys())
    path = find(SINGLE_FILES[1])
    if path is not None:
        return list(torch.load(path, map_location="meta", weights_only=True))
    return None


def checkpoint_layout(names: list[str] | None) -> Layout | None:
    """How a checkpoint with these tensor names stores Llama 4's experts; None: neither way (not Llama 4,
    or names unknown)."""
    if names is None:
        return None
    if any(LINEARIZED_MARK in name for name in names):
        return "linearized"
    if any(FUSED_MARK in name for name in names):
        return "fused"
    return None


def finish_linearizing(model: nn.Module, *, source: str) -> None:
    """After loading (straight into linear experts or not): convert what is still fused, and refuse a model
    that has no Llama 4 experts at all, where the option would silently do nothing."""
    converted = linearize_experts(model)
    total = linearized_count(model)
    if total == 0:
        raise Llama4ExpertsError(f"llama4_linearized_experts: {source} has no Llama 4 MoE experts "
                                 "(Llama4TextExperts) to linearize; the option is for Llama 4 models only")
    if converted:
        log.info("llama4_linearized_experts: %d fused expert layers of %s split into per-expert linear layers",
                 converted, source)
    else:
        log.info("llama4_linearized_experts: %s stores linearized experts; %d layers loaded straight into "
                 "linear layers", source, total)


def quantize_linearized_experts(model: nn.Module, quantization_config: Any) -> int:
    """Replace each expert nn.Linear still in 16 bits (converted from a fused checkpoint after loading) with the
    bitsandbytes layer load_in_4bit / load_in_8bit would have loaded it into, built by transformers' own
    replacement from the same BitsAndBytesConfig and quantised the way its loader does; the number replaced.
    Layers bitsandbytes already loaded (a linearized checkpoint) are left as they are. Needs the weights on a
    CUDA GPU, as bitsandbytes does."""
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    replaced = 0
    for experts in [m for m in model.modules() if isinstance(m, LinearizedLlama4Experts)]:
        plain = {name: layer.weight.data for name, layer in experts.named_modules() if type(layer) is nn.Linear}
        if not plain:
            continue
        device = next(iter(plain.values())).device
        if device.type != "cuda":
            raise Llama4ExpertsError("llama4_linearized_experts with load_in_4bit / load_in_8bit: bitsandbytes "
                                     f"quantises on a CUDA GPU and the experts are on {device.type}")
        replace_with_bnb_linear(experts, quantization_config=quantization_config)  # meta layers, same settings
        for name, weight in plain.items():
            layer = experts.get_submodule(name)
            if quantization_config.load_in_8bit:
                settings = {k: v for k, v in layer.weight.__dict__.items() if k != "SCB"}
                layer.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, **settings).to(device)
            else:
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, **layer.weight.__dict__).to(device)
            replaced += 1
        del plain
        torch.cuda.empty_cache()
    if replaced:
        log.info("llama4_linearized_experts: %d expert linear layers quantised with bitsandbytes", replaced)
    return replaced
