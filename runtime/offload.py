"""Activation offloading: the plan's ``model.activation_offloading`` (Axolotl's ``activation_offloading: true``
and ``gradient_checkpointing: offload``).

While a micro-batch runs forward, every tensor autograd saves for the backward pass is copied to (pinned) CPU
memory and its GPU copy released; the backward pass copies each one back when it needs it. With gradient
checkpointing the saved tensors are mostly the checkpointed layers' inputs (the layers themselves are
recomputed), so the GPU keeps almost no activations at all.

This is ``torch.autograd.graph.save_on_cpu`` with one difference: parameters (and anything already on the CPU)
stay where they are. A weight saved for backward is alive on the GPU anyway, so copying it out would free
nothing and cost a transfer of the whole model per micro-batch; under LoRA most saved tensors are such weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

Packed = torch.Tensor | tuple[torch.device, torch.Tensor]


class SavedActivationsOnCpu(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep activations in CPU memory between forward and backward."""

    def __init__(self, *, pin_memory: bool) -> None:
        def pack(tensor: torch.Tensor) -> Packed:
            if isinstance(tensor, torch.nn.Parameter) or tensor.device.type == "cpu":
                return tensor
            # Pinned host memory lets the copy run asynchronously on the current stream, which orders it
            # before any later kernel reuses the GPU block.
            host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin_memory)
            host.copy_(tensor, non_blocking=pin_memory)
            return tensor.device, host

        def unpack(packed: Packed) -> torch.Tensor:
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            return host.to(device, non_blocking=pin_memory)

        super().__init__(pack, unpack)


@dataclass(frozen=True)
class ActivationOffloading:
    """What this machine does with the plan's activation_offloading, and why when it differs."""

    enabled: bool
    pin_memory: bool
    fallback: str | None  # None: as planned

    def context(self) -> contextlib.AbstractContextManager[Any]:
        """Wraps a micro-batch's forward pass. Only the forward: with reentrant checkpointing the backward
        recomputes each layer, and under these hooks it would copy that layer's activations out and back."""
        return SavedActivationsOnCpu(pin_memory=self.pin_memory) if self.enabled else contextlib.nullcontext()

    def record(self) -> dict[str, Any]:
        """For the runtime decisions; empty when the plan does not ask for offloading."""
        if not self.enabled and self.fallback is None:
            return {}
        return {"activation_offloading": self.enabled, "activation_offloading_fallback": self.fallback}


def decide_activation_offloading(planned: bool, *, device_type: str) -> ActivationOffloading:
    if not planned:
        return ActivationOffloading(False, False, None)
    if device_type != "cuda":
        return ActivationOffloading(False, False, f"activation_offloading: the run is on the {device_type}, where "
                                                  "activations already live in CPU memory; nothing to offload")
    return ActivationOffloading(True, True, None)
