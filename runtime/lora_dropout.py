"""LoRA dropout that stores nothing for the backward pass: the mask is drawn again from the same random state.

peft computes an adapter as ``lora_B(lora_A(dropout(x))) * scaling``, after casting x to the adapter's dtype
(fp32 under bf16 autocast). The dropout makes a new tensor the size of the layer's input, and autograd keeps it
(for lora_A's weight gradient) together with the dropout's mask. q, k and v read the same input and each keeps
its own copy, and down_proj's input is 3.5 times wider than the others: on a Llama-3-8B layer at 4096 tokens that
is about 0.45 GB per layer, some 14 GB over 32 layers.

Here lora_A takes the undropped input, uncast (the same tensor object for q, k and v, so autograd keeps it
once; autocast casts it for the matmul, as it casts the dropped copy under peft), and the state of the random
generator the dropout draws from. The backward sets that state again, draws the same mask with the same kernel
(torch.native_dropout, as nn.Dropout), and puts the generator back where it was. The masks come from the same
stream in the same order as peft's. Where x already has the adapter's dtype (fp32 runs, 16-bit adapters) they are
peft's masks exactly, and the run computes what peft computes (tests/test_lora_dropout.py). Under autocast peft
draws on its fp32 copy and tunefile on the 16-bit input: the same distribution, though the kernel may map the
random numbers to other elements. Gradient checkpointing recomputes
a layer's forward with the generator's state restored (torch.utils.checkpoint's preserve_rng_state): the
recomputed masks are the original ones too.

Applied where the adapter's weights are ordinary tensors for the whole step, or at least for the whole of the
decoder layer's forward and backward: single-process and DDP runs, DeepSpeed ZeRO-1 and ZeRO-2 (which partition
only gradients and optimizer state), and ZeRO-3 when it gathers each decoder layer whole (zero3_gathering.py:
lora_A is inside the layer, gathered before the layer's forward and again before its backward, as DeepSpeed's own
linear function keeps its weight). Under FSDP, and ZeRO-3 gathering module by module, hooks around each module
gather and release the weights, and a weight kept by a custom function is not one they manage: peft's own dropout
runs there, and the reason is recorded.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.nn import functional

log = logging.getLogger(__name__)

# The strategies under which the adapter's weights are plain tensors for the whole step (DeepSpeed: see below).
SUPPORTED_STRATEGIES = frozenset({"single", "ddp"})


def unsupported_reason(strategy: str, *, zero_stage: int | None = None,
                       layers_gathered_whole: bool = False) -> str | None:
    """Why the dropout cannot be replayed under this distribution (the module docstring), or None."""
    if strategy in SUPPORTED_STRATEGIES:
        return None
    if strategy == "deepspeed" and zero_stage is not None and (zero_stage < 3 or layers_gathered_whole):
        return None
    how = f"{strategy} ZeRO-{zero_stage} gathering module by module" if strategy == "deepspeed" else strategy
    return (f"lora_dropout_recompute: peft's own dropout under {how}, whose hooks gather and release the weights a "
            "custom function would keep")


def generator_of(device: torch.device) -> torch.Generator:
    """The default generator native_dropout draws from on DEVICE."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None
                                             else torch.cuda.current_device()]
    return torch.default_generator


def replay_dropout(x: torch.Tensor, p: float, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """native_dropout(x) with the generator set to STATE, which is then put back: the dropped tensor and the mask
    that the draw from STATE gave."""
    generator = generator_of(x.device)
    now = generator.get_state()
    generator.set_state(state)
    try:
        return torch.native_dropout(x, p, True)
    finally:
        generator.set_state(now)


class _DroppedInputLinear(torch.autograd.Function):
    """``linear(dropout(x), weight)`` that keeps x and the generator's state, not the dropped copy and its mask."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        device_type = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type), device_type)
        ctx.p = p
        ctx.rng_state = generator_of(x.device).get_state()
        dropped, _mask = torch.native_dropout(x, p, True)
        ctx.save_for_backward(x, weight)
        if not ctx.autocast[0] and dropped.dtype != weight.dtype:  # peft would have cast x; autocast does not
            dropped = dropped.to(weight.dtype)
        return functional.linear(dropped, weight)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors
        dropped, mask = replay_dropout(x, ctx.p, ctx.rng_state)
        enabled, dtype, device_type = ctx.autocast
        grad_x = grad_w = None
        # The forward's matmul ran under autocast (or not): the backward's do the same.
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            if ctx.needs_input_grad[0]:
                grad_dropped = grad_output @ weight.to(grad_output.dtype)
                grad_x = torch.ops.aten.native_dropout_backward(grad_dropped, mask, 1.0 / (1.0 - ctx.p)).to(x.dtype)
            if ctx.needs_input_grad[1]:
                flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
                flat_dropped = dropped.reshape(-1, dropped.shape[-1]).to(flat_grad.dtype)
                grad_w = (flat_grad.t() @ flat_dropped).to(weight.dtype)
        return grad_x, grad_w, None


class ReplayedDropoutLinear(torch.nn.Linear):
    """An adapter's lora_A with its dropout inside: the class a patched lora_A module takes (its weight, its name
    in the state dict and its optimizer state stay what they were)."""

    dropout_p: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not torch.is_grad_enabled():
            return functional.linear(x.to(self.weight.dtype) if not torch.is_autocast_enabled(x.device.type)
                                     else x, self.weight, self.bias)  # evaluation: no dropout, as nn.Dropout
        out = _DroppedInputLinear.apply(x, self.weight, self.dropout_p)
        return out if self.bias is None else out + self.bias


def recompute_lora_dropout(model: torch.nn.Module, *, strategy: str, zero_stage: int | None = None,
                           layers_gathered_whole: bool = False) -> dict[str, Any]:
    """Move each vanilla LoRA layer's dropout into its lora_A (ReplayedDropoutLinear). Returns the decision for the
    run's records: how many adapters, or why none. ``zero_stage`` and ``layers_gathered_whole``: DeepSpeed's."""
    reason = unsupported_reason(strategy, zero_stage=zero_stage, layers_gathered_whole=layers_gathered_whole)
    if reason is not None:
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
            first.__class__ = ReplayedDropoutLinear
            first.dropout_p = float(dropout.p)
            dropouts[name] = torch.nn.Identity()
            # x reaches lora_A uncast, shared by the layers that read it: autocast casts it for the matmul.
            module.cast_input_dtype_enabled = False
            patched += 1
    log.info("lora dropout: %d adapters draw their masks again in the backward instead of keeping them", patched)
    return {"lora_dropout_recompute": patched}
