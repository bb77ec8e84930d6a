"""LoRA dropout that stores nothing for the backward pass: the mask is regenerated from a seed.

peft computes an adapter as ``lora_B(lora_A(dropout(x))) * scaling``. The dropout makes a new tensor the size of
the layer's input, and autograd keeps it (for lora_A's weight gradient) together with the dropout's mask. q, k
and v read the same input and each keeps its own copy, and down_proj's input is 3.5 times wider than the others:
on a Llama-3-8B layer at 4096 tokens that is about 0.45 GB per layer, some 14 GB over 32 layers, a third of the
activation memory of a LoRA run.

Here the adapter's first matmul takes the undropped input (the same tensor object for q, k and v, so autograd keeps
it once) and a seed drawn from torch's CPU generator; the mask is drawn from that seed in the forward and drawn
again, identically, in the backward. The computed function and its gradients are those of peft's vanilla LoRA;
the masks are drawn from another random stream, so individual masks differ from peft's (their distribution does
not). Gradient checkpointing recomputes a layer's forward with the CPU generator's state restored
(torch.utils.checkpoint's preserve_rng_state), so the recomputed masks are the original ones.

Applied to single-process and DDP runs, whose weights are ordinary tensors during the step. Under FSDP and
DeepSpeed the weights are gathered and released by hooks around each module, and a weight kept by a custom
function is not one their hooks manage: peft's own dropout runs there, and the reason is recorded.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.nn import functional

log = logging.getLogger(__name__)

# The strategies under which the adapter's weights are plain tensors for the whole step.
SUPPORTED_STRATEGIES = frozenset({"single", "ddp"})


def dropout_scale(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """0 or 1/(1-p) for each element of LIKE, drawn from SEED alone (the same seed, the same mask)."""
    generator = torch.Generator(device=like.device)
    generator.manual_seed(seed)
    keep = torch.empty_like(like).bernoulli_(1.0 - p, generator=generator)
    return keep.mul_(1.0 / (1.0 - p))


class _DroppedInputLinear(torch.autograd.Function):
    """``linear(x · mask, weight)`` that keeps x (not the dropped copy) and the seed, and redraws the mask."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        device_type = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type), device_type)
        ctx.p, ctx.seed = p, seed
        ctx.save_for_backward(x, weight)
        return functional.linear(x * dropout_scale(x, p, seed), weight)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, weight = ctx.saved_tensors
        enabled, dtype, device_type = ctx.autocast
        # The forward's matmul ran under autocast (or not): the backward's do the same.
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            scale = dropout_scale(x, ctx.p, ctx.seed)
            grad_x = grad_w = None
            if ctx.needs_input_grad[0]:
                grad_x = (grad_output @ weight.to(grad_output.dtype)).mul_(scale).to(x.dtype)
            if ctx.needs_input_grad[1]:
                flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
                dropped = (x * scale).reshape(-1, x.shape[-1]).to(flat_grad.dtype)
                grad_w = (flat_grad.t() @ dropped).to(weight.dtype)
        return grad_x, grad_w, None, None


class SeededDropoutLinear(torch.nn.Linear):
    """An adapter's lora_A with its dropout inside: the class a patched lora_A module takes (its weight, its name
    in the state dict and its optimizer state stay what they were)."""

    dropout_p: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not torch.is_grad_enabled():
            return functional.linear(x, self.weight, self.bias)  # evaluation: no dropout, as nn.Dropout
        seed = int(torch.randint(0, 2**62, (1,)).item())  # the CPU generator: no device synchronisation
        out = _DroppedInputLinear.apply(x, self.weight, self.dropout_p, seed)
        return out if self.bias is None else out + self.bias


def recompute_lora_dropout(model: torch.nn.Module, *, strategy: str) -> dict[str, Any]:
    """Move each vanilla LoRA layer's dropout into its lora_A (SeededDropoutLinear). Returns the decision for the
    run's records: how many adapters, or why none."""
    if strategy not in SUPPORTED_STRATEGIES:
        reason = (f"lora_dropout_recompute: peft's own dropout under {strategy}, whose hooks gather and release the "
                  f"weights a custom function would keep")
        log.info("%s", reason)
        return {"lora_dropout_recompute": False, "lora_dropout_recompute_fallback": reason}
    patched = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(dropouts, torch.nn.ModuleDict) or not isinstance(lora_a, torch.nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {})  # DoRA and the like compute otherwise: left alone
        for name, dropout in list(dropouts.items()):
            first = lora_a[name] if name in lora_a else None
            if (not isinstance(dropout, torch.nn.Dropout) or dropout.p <= 0 or name in variants
                    or type(first) is not torch.nn.Linear):
                continue
            first.__class__ = SeededDropoutLinear
            first.dropout_p = float(dropout.p)
            dropouts[name] = torch.nn.Identity()
            patched += 1
    log.info("lora dropout: %d adapters draw their masks again in the backward instead of storing them", patched)
    return {"lora_dropout_recompute": patched}
