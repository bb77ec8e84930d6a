"""Parameters kept in host memory: the run plan's ``model.ple_cpu_offload`` (Axolotl's ``ple_cpu_offload: true``).

Some models declare parameters that should never be placed on the GPU, in the class attribute
``_no_placement_params`` (transformers 5: Qwen's n-gram per-layer-embedding table, ~95 GiB, whose forward gathers
the few rows a batch needs on whatever device the table is on and moves only those). With ple_cpu_offload those
parameters stay in host RAM for the whole run, on one GPU under a 4/8-bit base with a LoRA adapter (the compiler
allows nothing else, as Axolotl: FSDP and DeepSpeed place every parameter themselves).

Two things would otherwise put them on the GPU, and this module stops both:
- loading: the quantised base loads with a device map for this process's GPU. Here that map names every module,
  parameter and buffer except the declared ones, which transformers then loads to the CPU (a name the map does not
  cover goes there); with one device in the map it dispatches nothing, so nothing moves them afterwards.
- ``accelerator.prepare``: it moves a model to the GPU, except a 4/8-bit model carrying a one-device
  ``hf_device_map`` (accelerate 1.15's check for a bitsandbytes model already placed). transformers sets none for
  a one-device map, so the model gets ``{"": gpu}``, as Axolotl does.
Under DDP (allowed; Axolotl warns that every rank then holds its own copy in host RAM) DDP ignores them: they are
frozen, identical on every rank, and DDP could neither broadcast nor check a CPU tensor among GPU ones.
peft's k-bit preparation casts every 16-bit parameter to fp32; the host parameters keep their dtype instead (for a
frozen table that only doubles host memory).

Axolotl keeps the declared parameters on the CPU only when transformers happened to load them there; tunefile
loads them there. A model that declares none (every architecture in transformers 5.x but the Qwen one) trains as
if the key were off, and the runtime decisions say so.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..schemas.run_plan import ModelPlan
from .errors import RuntimeUserError

log = logging.getLogger(__name__)

ATTRIBUTE = "_no_placement_params"


class PleOffloadError(RuntimeUserError):
    """ple_cpu_offload cannot be carried out; the message says why."""


def declared(model: Any) -> list[str]:
    """The parameter names ``model`` (a module or its class) keeps off the GPU: suffixes of full names."""
    return list(getattr(model, ATTRIBUTE, None) or [])


def is_declared(name: str, suffixes: list[str]) -> bool:
    return any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)


def host_parameter_names(model: torch.nn.Module, suffixes: list[str]) -> list[str]:
    return [name for name, _ in model.named_parameters() if is_declared(name, suffixes)]


def placement_map(model: torch.nn.Module, host: set[str], device: Any) -> dict[str, Any]:
    """A device map putting all of ``model`` on ``device`` but the parameters named in ``host``, which it leaves
    out: modules holding none of them whole, the modules on the way to them split into their own parameters,
    buffers and children."""
    device_map: dict[str, Any] = {}

    def visit(prefix: str, module: torch.nn.Module) -> None:
        if not any(prefix + name in host for name, _ in module.named_parameters()):
            device_map[prefix.rstrip(".")] = device
            return
        for name, _ in module.named_parameters(recurse=False):
            if prefix + name not in host:
                device_map[prefix + name] = device
        for name, _ in module.named_buffers(recurse=False):
            device_map[prefix + name] = device
        for name, child in module.named_children():
            visit(f"{prefix}{name}.", child)

    visit("", model)
    return device_map


def check_placement(model: torch.nn.Module, device_map: dict[str, Any], host: set[str], device: Any) -> None:
    """The map places every parameter and buffer where intended, as transformers reads it (a name matches the
    longest key it starts with; a name no key matches goes to the CPU)."""
    from transformers.integrations.accelerate import expand_device_map

    names = [name for name, _ in model.named_parameters(remove_duplicate=False)] + \
        [name for name, _ in model.named_buffers(remove_duplicate=False)]
    placed = expand_device_map(device_map, names)
    wrong = [name for name in names if placed[name] != ("cpu" if name in host else device)]
    if wrong:
        raise PleOffloadError(f"ple_cpu_offload: cannot build a device map that keeps {', '.join(sorted(host))} in "
                              f"host memory and the rest on the GPU (misplaced: {', '.join(wrong[:5])})")


def skeleton(model: ModelPlan, source: str, revision: dict[str, Any]) -> torch.nn.Module:
    """The base model's architecture with no weights (on the meta device), to read its names from."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .pretrained import overridden_config

    config = overridden_config(model, source, revision=revision) or AutoConfig.from_pretrained(
        source, trust_remote_code=model.trust_remote_code, **revision)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)


@dataclass
class HostPlacement:
    """The plan's ple_cpu_offload on one load of the base: the device map to load with, then ``keep``."""

    device: Any
    suffixes: list[str]
    names: list[str]  # the declared parameters, as the base model names them
    device_map: dict[str, Any]
    reason: str | None  # why nothing is kept in host memory (then device_map is the plain one-device map)

    @classmethod
    def plan(cls, architecture: torch.nn.Module, device: Any) -> HostPlacement:
        """For a base whose architecture (any device, meta included) is ``architecture``, loading onto ``device``."""
        suffixes = declared(architecture)
        plain = {"": device}
        if not suffixes:
            return cls(device, [], [], plain, f"{type(architecture).__name__} declares no {ATTRIBUTE} (no "
                                              "parameters it keeps off the GPU): nothing to keep in host memory")
        names = host_parameter_names(architecture, suffixes)
        if not names:
            return cls(device, suffixes, [], plain, f"none of {type(architecture).__name__}'s {ATTRIBUTE} "
                                                    f"({', '.join(suffixes)}) names one of its parameters")
        device_map = placement_map(architecture, set(names), device)
        check_placement(architecture, device_map, set(names), device)
        return cls(device, suffixes, names, device_map, None)

    def keep(self, module: torch.nn.Module) -> dict[str, Any]:
        """After loading: check where the declared parameters are, mark the model so that accelerate's prepare
        leaves it where it is; the record for the runtime decisions."""
        if self.reason is not None:
            log.warning("ple_cpu_offload: %s", self.reason)
            return {"ple_cpu_offload": self.reason}
        params = dict(module.named_parameters())
        misplaced = [name for name in self.names if params[name].device.type != "cpu"]
        if misplaced:
            raise PleOffloadError(f"ple_cpu_offload: {', '.join(misplaced)} loaded onto "
                                  f"{params[misplaced[0]].device} instead of host memory")
        # accelerate's prepare moves a model to its device unless a 4/8-bit model carries a one-device map.
        module.hf_device_map = {"": self.device}
        size = sum(params[name].numel() * params[name].element_size() for name in self.names)
        log.info("ple_cpu_offload: %s in host memory (%.2f GiB)", ", ".join(self.names), size / 2**30)
        return {"ple_cpu_offload": {"in_host_memory": list(self.names), "gib": round(size / 2**30, 3)}}


def plan_host_placement(model: ModelPlan, *, source: str, quantized: bool, device: Any) -> HostPlacement:
    """The load of the plan's base (from ``source``, where it resolved) onto ``device`` with its declared
    parameters in host memory. ``quantized``: the base loads in 4 or 8 bits."""
    from .pretrained import revision_kwargs

    if not quantized:
        raise PleOffloadError("model: ple_cpu_offload keeps parameters off the GPU only for a 4/8-bit base (qlora, "
                              "or lora with load_in_8bit), as in Axolotl; recompile the config with `tunefile compile`")
    return HostPlacement.plan(skeleton(model, source, revision_kwargs(source, model.revision)), device)


def host_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The declared parameters still in host memory, named as ``module`` (peft-wrapped or not) names them."""
    suffixes = declared(module.get_base_model() if hasattr(type(module), "get_base_model") else module)
    return [(name, param) for name, param in module.named_parameters()
            if is_declared(name, suffixes) and param.device.type == "cpu"]


@contextlib.contextmanager
def host_parameters_keep_their_dtype(module: torch.nn.Module, planned: bool = True) -> Iterator[None]:
    """Within the block (peft's prepare_model_for_kbit_training, which casts 16-bit parameters to fp32), the host
    parameters hold an empty stand-in; they get their own tensor back after it. Nothing without ``planned``."""
    kept = [(param, param.data) for _, param in host_parameters(module)] if planned else []
    for param, data in kept:
        param.data = data.new_empty(0)
    try:
        yield
    finally:
        for param, data in kept:
            param.data = data


def ignore_in_ddp(module: torch.nn.Module) -> list[str]:
    """Tell DDP to leave the host parameters alone (frozen and the same on every rank); the names it ignores."""
    names = [name for name, _ in host_parameters(module)]
    if names:
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    return names
