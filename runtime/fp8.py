"""FP8 training: the run plan's ``model.fp8`` (Axolotl's ``fp8: true``, ``fp8_config.recipe``,
``fp8_enable_fsdp_float8_all_gather``).

torchao's ``Float8Linear`` replaces the model's linear layers: each matmul casts its operands to float8 with
dynamic scales (per tensor, or per row with the rowwise recipes) and runs ``torch._scaled_mm``; the weights, the
optimizer and everything else stay as they were, in bf16 autocast. The speed needs a GPU of compute capability 8.9
or newer (Ada, Hopper): where the run lands on anything else (no CUDA, an older GPU, no torchao) it trains in bf16
as planned otherwise, and says why in the runtime decisions.

How, and why through accelerate: as in Axolotl, accelerate converts the model inside ``Accelerator.prepare``
(``AORecipeKwargs`` and mixed precision "fp8", which is bf16 autocast plus the conversion). Its FSDP2 path is the
reason: ``fp8_enable_fsdp_float8_all_gather`` makes each weight a torchao tensor subclass whose ``data_ptr()`` is 0,
and only accelerate's own float8 backend knows to look inside it when it moves the optimizer onto the sharded
parameters (by data pointer); it also registers torchao's per-step scale precomputation for the float8
all-gather. Converting the model ourselves before ``prepare`` leaves the optimizer pointing at the wrong tensors
under FSDP2 with the all-gather on. Under DeepSpeed the handler alone converts the model (the precision is
DeepSpeed's config's).

Which layers (``Float8LayerFilter``): Axolotl's, that is accelerate's default filter with Axolotl's router patch:
every ``nn.Linear`` but the first and the last one of the model (the output head; for stability), MoE routers (a
path segment ``gate`` or ``router``: float8 router logits flip routing decisions) and layers whose dimensions are
not multiples of 16 (``torch._scaled_mm`` needs them). tunefile also keeps in high precision the output head under
any wrapper (peft's modules_to_save copies), a LoRA adapter's own low-rank matrices (tiny matmuls float8 cannot
speed up, whose gradients are the whole training signal) and quantised layers.

``fsdp_float8_all_gather`` applies to FSDP2 only and, as in Axolotl, to the tensorwise recipe only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from ..schemas.run_plan import DistributionPlan, Fp8Plan
from .errors import RuntimeUserError
from .kernels import transformers_model

log = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 9)  # torch._scaled_mm's float8 matmuls: Ada, Hopper and newer
DIMENSION_MULTIPLE = 16
ROUTER_SEGMENTS = frozenset({"gate", "router"})  # Axolotl's: exact path segments (gate_proj is not one)
ADAPTER_SEGMENTS = frozenset({"lora_A", "lora_B"})
INSTALL = "pip install 'tunefile[torchao]'"

# Why a linear layer stays in high precision (the filter's tally, recorded in the runtime decisions).
FIRST_OR_LAST = "first or last linear layer"
OUTPUT_HEAD = "output head"
ROUTER = "MoE router"
NOT_MULTIPLE = f"a dimension not a multiple of {DIMENSION_MULTIPLE}"
ADAPTER = "LoRA adapter matrix"
QUANTIZED = "quantised weight"


class Fp8Error(RuntimeUserError):
    """The plan's fp8 section cannot be carried out as written; the message says what to change."""


# --- what runs here -----------------------------------------------------------------------------------------

def machine_reason(device_type: str, capability: tuple[int, int] | None, torchao_problem: str | None) -> str | None:
    """Why float8 training cannot run on this machine, or None. ``capability``: this process's GPU's."""
    if device_type != "cuda" or capability is None:
        return f"FP8 training needs a CUDA GPU and this run is on the {device_type}; training in bf16"
    if capability < MIN_CAPABILITY:
        return (f"FP8 training needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, "
                f"Hopper) and this GPU is {capability[0]}.{capability[1]}; training in bf16")
    if torchao_problem is not None:
        return f"FP8 training needs torchao, which {torchao_problem} ({INSTALL}); training in bf16"
    return None


def torchao_problem() -> str | None:
    """None when torchao's float8 training and accelerate's support for it import; otherwise what fails."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # noqa: F401
    except Exception as exc:  # not installed, or built for another torch
        return f"cannot be imported ({type(exc).__name__}: {exc})"
    from accelerate.utils import is_torchao_available

    if not is_torchao_available():
        return "is older than accelerate accepts"
    return None


def this_machine(distribution: DistributionPlan) -> tuple[str, tuple[int, int] | None]:
    """(device type, compute capability of this process's GPU) before accelerate picks the device."""
    if distribution.device != "cuda" or not torch.cuda.is_available():
        return "cpu", None
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    return "cuda", torch.cuda.get_device_capability(index)


def check_plan(plan: Fp8Plan, distribution: DistributionPlan) -> None:
    """Fp8Error for combinations that cannot run anywhere (the compiler refuses them; a hand-edited plan may not)."""
    if plan.fsdp_float8_all_gather and plan.recipe != "tensorwise":
        raise Fp8Error(f"fp8_enable_fsdp_float8_all_gather works with fp8_config.recipe tensorwise only (torchao "
                       f"gathers float8 weights with one scale per tensor), not {plan.recipe}; drop one of the two")
    fsdp = distribution.fsdp
    if fsdp is not None and fsdp.cpu_ram_efficient_loading:
        raise Fp8Error("fp8 under FSDP cannot load with fsdp_config.cpu_ram_efficient_loading (accelerate refuses "
                       "torchao's float8 layers with it); set cpu_ram_efficient_loading: false")


def float8_config(recipe: str, *, all_gather: bool) -> Any:
    """torchao's Float8LinearConfig for the recipe (Axolotl's build_fp8_linear_config, without the
    force_recompute_fp8_weight_in_bwd flag it also sets: torchao 0.18 deprecated it and ignores it)."""
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, enable_fsdp_float8_all_gather=True) if all_gather else config


# --- which layers -------------------------------------------------------------------------------------------

def linear_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


class Float8LayerFilter:
    """torchao's ``module_filter_fn`` for ``model``: ``(module, fully qualified name) → convert to float8?``,
    with a tally of why layers stay in high precision. Names are relative to the model it was made for."""

    def __init__(self, model: torch.nn.Module) -> None:
        names = linear_names(model)
        self.first_and_last = {names[0], names[-1]} if names else set()
        head = transformers_model(model).get_output_embeddings()
        self.head_modules = {id(m) for m in head.modules()} if isinstance(head, torch.nn.Module) else set()
        self.converted: list[str] = []
        self.kept: Counter[str] = Counter()

    def reason_to_keep(self, module: torch.nn.Module, fqn: str) -> str | None:
        segments = set(fqn.split("."))
        if id(module) in self.head_modules:
            return OUTPUT_HEAD
        if fqn in self.first_and_last:
            return FIRST_OR_LAST
        if segments & ADAPTER_SEGMENTS:
            return ADAPTER
        if segments & ROUTER_SEGMENTS:
            return ROUTER
        if not module.weight.is_floating_point() or type(module).__module__.startswith("bitsandbytes"):
            return QUANTIZED
        if module.in_features % DIMENSION_MULTIPLE or module.out_features % DIMENSION_MULTIPLE:
            return NOT_MULTIPLE
        return None

    def __call__(self, module: torch.nn.Module, fqn: str) -> bool:
        if not isinstance(module, torch.nn.Linear):
            return False
        reason = self.reason_to_keep(module, fqn)
        if reason is None:
            self.converted.append(fqn)
            return True
        self.kept[reason] += 1
        return False


# --- the run's choice ---------------------------------------------------------------------------------------

@dataclass
class Fp8Choice:
    """What this machine does with the plan's fp8: the accelerate settings that convert the model, and the record."""

    plan: Fp8Plan | None
    enabled: bool = False
    all_gather: bool = False
    fallback: str | None = None  # why the run trains without float8 here
    notes: list[str] = field(default_factory=list)
    handler: Any = None  # accelerate's AORecipeKwargs
    layer_filter: Float8LayerFilter | None = None

    def accelerator_settings(self, *, deepspeed: bool) -> dict[str, Any]:
        """What Accelerator(...) takes on top of the run's own settings: the handler, and mixed precision "fp8"
        (bf16 autocast with the conversion) except under DeepSpeed, whose config holds the precision."""
        if not self.enabled:
            return {}
        return {"kwargs_handlers": [self.handler]} | ({} if deepspeed else {"mixed_precision": "fp8"})

    def use_filter_for(self, model: torch.nn.Module) -> None:
        """Give accelerate the layer filter for ``model`` (the model as it goes into prepare: adapters added)."""
        if self.enabled:
            self.layer_filter = self.handler.module_filter_func = Float8LayerFilter(model)

    def record(self, model: torch.nn.Module | None = None) -> dict[str, Any]:
        """For the runtime decisions: the recipe and the layers ``model`` (prepared) computes in float8."""
        if self.plan is None:
            return {}
        record: dict[str, Any] = {"enabled": self.enabled, "recipe": self.plan.recipe,
                                  "fsdp_float8_all_gather": self.all_gather}
        if self.fallback is not None:
            record["fallback"] = self.fallback
        if self.notes:
            record["notes"] = list(self.notes)
        if self.enabled and model is not None:
            record["float8_layers"] = float8_layer_count(model)
        if self.layer_filter is not None:
            record["high_precision_layers"] = dict(sorted(self.layer_filter.kept.items()))
        return {"fp8": record}


def float8_layer_count(model: torch.nn.Module) -> int:
    from torchao.float8.float8_linear import Float8Linear

    return sum(isinstance(module, Float8Linear) for module in model.modules())


def decide_fp8(plan: Fp8Plan | None, *, precision: str, distribution: DistributionPlan,
               machine: tuple[str, tuple[int, int] | None] | None = None,
               torchao: str | None | bool = True) -> Fp8Choice:
    """What this machine does with ``plan`` (checked before accelerate starts); ``precision``: the run's.
    ``machine`` and ``torchao`` (a problem string, None for none, True to look) stand in for this machine's in
    tests."""
    if plan is None:
        return Fp8Choice(None)
    check_plan(plan, distribution)
    device_type, capability = machine if machine is not None else this_machine(distribution)
    problem = torchao_problem() if torchao is True else torchao
    fallback = machine_reason(device_type, capability, problem)
    if fallback is not None:
        log.warning("fp8: %s", fallback)
        return Fp8Choice(plan, fallback=fallback)
    notes = []
    fsdp2 = distribution.fsdp is not None and distribution.fsdp.version == 2
    all_gather = plan.fsdp_float8_all_gather and fsdp2
    if plan.fsdp_float8_all_gather and not fsdp2:
        notes.append("fsdp_float8_all_gather has no effect: it changes FSDP2's weight all-gather, and this run "
                     "does not use FSDP2")
    if precision != "bf16" and distribution.deepspeed is None:
        notes.append(f"what is not float8 computes in bf16 autocast (accelerate's fp8 mode), not {precision}")
    from accelerate.utils import AORecipeKwargs

    handler = AORecipeKwargs(config=float8_config(plan.recipe, all_gather=all_gather))
    log.info("fp8: torchao float8 linear layers, %s scaling%s", plan.recipe,
             ", float8 all-gather" if all_gather else "")
    return Fp8Choice(plan, enabled=True, all_gather=all_gather, notes=notes, handler=handler)
