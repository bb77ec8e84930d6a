"""A per-GPU memory estimate for a strategy: weights, gradients, optimizer state, activations.

Deliberately simple and explained, not exact: it decides between DDP and FSDP2 (with or without
offload) and warns before a job is queued for hours only to run out of memory. Figures:
- weights: 4 bytes/param for full fine-tuning (fp32 master weights under autocast); 2 for a
  frozen 16-bit base; 1 for 8-bit; 0.55 for NF4 with double quantisation;
- trainable params: 4 bytes of gradient and 8 of AdamW state (2 for 8-bit optimizers);
- activations per layer: 34·h bytes per token without checkpointing (Korthikanti et al., with
  fused attention so no s² term), 2·h with it plus one layer recomputed (with every n-th layer checkpointed,
  the rest keep 34·h); logits 10 bytes per
  token per vocabulary entry (16-bit logits, fp32 upcast and its gradient);
- 1.5 GiB for the CUDA context and allocator.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models import ModelShape
from ..plan import MemoryEstimate

GIB = 1024**3
_CONTEXT_GIB = 1.5


@dataclass(frozen=True)
class Sharding:
    """Which states are divided across ranks, and which live in CPU memory."""

    weights: bool = False
    gradients: bool = False
    optimizer: bool = False
    offload_weights: bool = False
    offload_optimizer: bool = False


SHARDING = {
    "single": Sharding(),
    "ddp": Sharding(),
    "fsdp": Sharding(True, True, True),
    "fsdp_offload": Sharding(True, True, True, offload_weights=True, offload_optimizer=True),
    "zero1": Sharding(optimizer=True),
    "zero2": Sharding(gradients=True, optimizer=True),
    "zero2_offload": Sharding(gradients=True, optimizer=True, offload_optimizer=True),
    "zero3": Sharding(True, True, True),
    "zero3_offload": Sharding(True, True, True, offload_weights=True, offload_optimizer=True),
}


def estimate_memory(
    *,
    parameters: int,
    trainable: int,
    shape: ModelShape,
    full_finetune: bool,
    quantization_bits: int | None,
    precision: str,
    eight_bit_optimizer: bool,
    micro_batch_size: int,
    sequence_len: int,
    gradient_checkpointing: bool,
    checkpoint_every_n_layers: int = 1,
    sharding: Sharding,
    world_size: int,
    gpu_memory_gib: float | None,
) -> MemoryEstimate:
    if full_finetune:
        weights = parameters * 4.0  # fp32 master weights, whatever the autocast precision
    else:
        frozen_bytes = {4: 0.55, 8: 1.0}.get(quantization_bits or 0, 4.0 if precision == "fp32" else 2.0)
        weights = parameters * frozen_bytes + trainable * 4.0
    gradients = trainable * 4
    optimizer = trainable * (2 if eight_bit_optimizer else 8)

    divide = max(world_size, 1)
    if sharding.offload_weights:
        # Only the layer being computed is gathered on the GPU.
        weights = weights / max(shape.num_layers, 1) * 2
        gradients = gradients / max(shape.num_layers, 1) * 2
    elif sharding.weights:
        weights /= divide
    if sharding.gradients and not sharding.offload_weights:
        gradients /= divide
    if sharding.offload_optimizer:
        optimizer = 0.0
    elif sharding.optimizer:
        optimizer /= divide

    tokens = micro_batch_size * sequence_len
    activation_scale = 2 if precision == "fp32" else 1
    if gradient_checkpointing:
        # Layers 0, n, 2n, … keep only their input (2·h per token) plus one layer recomputed at a time; the
        # others keep everything (34·h).
        checkpointed = -(-shape.num_layers // checkpoint_every_n_layers)
        kept = shape.num_layers - checkpointed
        activations = (checkpointed * 2 + kept * 34) * shape.hidden_size * tokens + 34 * shape.hidden_size * tokens
    else:
        activations = shape.num_layers * 34 * shape.hidden_size * tokens
    activations = activations * activation_scale + 10 * tokens * shape.vocab_size

    return MemoryEstimate(
        weights=round(weights / GIB, 2),
        gradients=round(gradients / GIB, 2),
        optimizer=round(optimizer / GIB, 2),
        activations=round(activations / GIB, 2),
        overhead=_CONTEXT_GIB,
        available=gpu_memory_gib,
    )
