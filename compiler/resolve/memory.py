"""A per-GPU memory estimate for a strategy: weights, gradients, optimizer state, activations.

Deliberately simple and explained, not exact: it decides between DDP and FSDP2 (with or without
offload) and warns before a job is queued for hours only to run out of memory. Figures:
- weights: 4 bytes/param for full fine-tuning (fp32 master weights under autocast); 2 for a
  frozen 16-bit base; 1 for 8-bit; 0.55 for NF4 with double quantisation;
- trainable params: 4 bytes of gradient and 8 of AdamW state (2 for 8-bit optimizers);
- activations per layer, 16-bit: 16·h + 6·i bytes per token without checkpointing (after Korthikanti et
  al., with fused attention so no s² term: attention and the norms 16·h, a gated MLP of width i its input
  and three i-wide tensors), 2·h with it plus one layer recomputed (with every n-th layer checkpointed, the
  rest keep everything); Liger's RMSNorm keeps 4·h less and its SwiGLU 2·i less; logits 10 bytes per
  token per vocabulary entry (16-bit logits, fp32 upcast and its gradient), none with a fused loss
  (cut-cross-entropy, Liger's fused linear cross-entropy);
- LoRA, in each layer that keeps its activations: the adapted layers' inputs, for the adapters' weight
  gradients. peft's dropout keeps a 16-bit copy and a 1-byte mask per adapted layer (q, k and v each their
  own); replayed dropout (lora_dropout_recompute) and no dropout keep each distinct input once, and
  o_proj's input not at all (attention keeps it already);
- 1.5 GiB for the CUDA context and allocator.

Checked against the GPU (tests/test_memory_estimate.py, within 10 %): bench/results/vs_hf_B*.json (8B,
4096 tokens) measured 53.3, 42.5, 30.2 and 33.5 GiB allocated where this gives 53.8, 43.5, 31.2 and 34.7;
vs_hf_A.json (1B, packed 2048-token rows, micro batch 8 and 12) measured 24.2 and 34.7 for 23.1 and 33.1.
"""

from __future__ import annotations

from collections.abc import Collection
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
    adapter_bytes_per_token: float = 0.0,
    fused_loss: bool = False,
    liger_saved_per_token: float = 0.0,
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
    # A layer that keeps its activations: 34·h, less what Liger's kernels do not keep, plus LoRA's inputs.
    layer = 16 * shape.hidden_size + 6 * shape.intermediate_size
    full_layer = (layer - liger_saved_per_token) * activation_scale + adapter_bytes_per_token
    if gradient_checkpointing:
        # Layers 0, n, 2n, … keep only their input (2·h per token) plus one layer recomputed at a time; the
        # others keep everything.
        checkpointed = -(-shape.num_layers // checkpoint_every_n_layers)
        kept = shape.num_layers - checkpointed
        per_token = checkpointed * 2 * shape.hidden_size * activation_scale + (kept + 1) * full_layer
    else:
        per_token = shape.num_layers * full_layer
    activations = per_token * tokens + (0 if fused_loss else 10 * tokens * shape.vocab_size)

    return MemoryEstimate(
        weights=round(weights / GIB, 2),
        gradients=round(gradients / GIB, 2),
        optimizer=round(optimizer / GIB, 2),
        activations=round(activations / GIB, 2),
        overhead=_CONTEXT_GIB,
        available=gpu_memory_gib,
    )


# The linear layers of a Llama-style decoder layer, grouped by the input they read.
_SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",), ("down_proj",))


def lora_input_bytes(shape: ModelShape, *, targets: Collection[str] | None, dropout: float, replayed: bool,
                     precision: str) -> float:
    """Bytes per token and layer that LoRA keeps for its adapters' weight gradients: the adapted layers' inputs.
    ``targets``: the adapted module names (None: every linear layer). Names outside a Llama-style layer count
    nothing (the estimate knows their shapes no better)."""
    width = {"q_proj": shape.hidden_size, "k_proj": shape.hidden_size, "v_proj": shape.hidden_size,
             "o_proj": shape.num_heads * (shape.head_dim or shape.hidden_size // shape.num_heads),
             "gate_proj": shape.hidden_size, "up_proj": shape.hidden_size, "down_proj": shape.intermediate_size}
    element = 4 if precision == "fp32" else 2
    total = 0.0
    for group in _SHARED_INPUTS:
        adapted = [name for name in group if targets is None or name in targets]
        if not adapted:
            continue
        if dropout > 0 and not replayed:  # peft: a dropped copy and its mask per adapted layer
            total += len(adapted) * width[group[0]] * (element + 1)
        elif group != ("o_proj",):  # one input, kept once; attention keeps o_proj's already
            total += width[group[0]] * element
    return total


def liger_bytes_saved(shape: ModelShape, kernels: dict[str, bool]) -> float:
    """Bytes per token and layer (16-bit) Liger's kernels keep less than PyTorch's modules: its RMSNorm keeps no
    fp32 copy of the input (4·h for the two norms of a layer), its SwiGLU no activation output (2·i). Together
    11·h on the 8B shape, where bench/results/vs_hf_B_first.json measured about 12·h."""
    saved = 0.0
    if kernels.get("liger_rms_norm"):
        saved += 4 * shape.hidden_size
    if kernels.get("liger_glu_activation"):
        saved += 2 * shape.intermediate_size
    return saved
