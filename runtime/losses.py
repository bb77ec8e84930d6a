"""The training loss as a SUM over label tokens, never a per-batch mean.

The loop divides the sum by the number of label tokens in the whole optimizer step (all micro-batches,
all ranks), so packing, padding and gradient accumulation change nothing about what is optimised:
every trained token weighs the same. A per-micro-batch mean would weigh a token in a short batch more.

With a fused loss kernel (runtime/kernels.py) the same sum comes from the final hidden states and the output
head's weight, in chunks, so the (tokens × vocabulary) logits never exist at once: linear_token_loss_sum.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def label_token_count(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that carry loss after the causal shift (label t+1 is predicted at position t)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies over label tokens, their count), computed in fp32."""
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    loss_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (shift_labels != IGNORE_INDEX).sum()


# A fused linear cross-entropy (Liger's or cut-cross-entropy's kernel, or a reference): (hidden [N, H],
# weight [V, H], bias [V] or None, targets [N], softcap or None) → the SUM of the cross-entropies of the
# targets that are not IGNORE_INDEX, as an fp32 scalar, with logits softcap·tanh(z / softcap) when a
# softcap is given, and without ever holding all N × V logits.
LinearCrossEntropySum = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, float | None],
                                 torch.Tensor]


def linear_token_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          labels: torch.Tensor, *, dtype: torch.dtype, softcap: float | None,
                          linear_cross_entropy: LinearCrossEntropySum) -> tuple[torch.Tensor, torch.Tensor]:
    """token_loss_sum's (sum, count) from the final hidden states [B, L, H] and the output head instead of
    the logits: the same causal shift, the same ignored labels, the SUM the loop normalises.

    The shift moves the labels rather than the hidden states (the label of position t is labels[t + 1], the
    last position has none), so the [B·L, H] hidden states are a view, not a copy. ``dtype`` is the dtype the
    head's matmul runs in on the plain path (autocast's, which accelerate applies inside the model's forward
    only, so it is off here and the cast is explicit)."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1).to(hidden.device)
    count = (targets != IGNORE_INDEX).sum()
    flat = hidden.reshape(-1, hidden.shape[-1])
    if count.item() == 0:
        # Nothing to learn from this micro-batch: a zero that still reaches the hidden states and the head, so
        # every parameter gets its (zero) gradient, as data parallelism expects.
        zero = flat[:0].sum().float() + weight[:0].sum().float()
        return (zero if bias is None else zero + bias[:0].sum().float()), count
    with torch.autocast(hidden.device.type, enabled=False):
        loss_sum = linear_cross_entropy(flat.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                                        targets, softcap)
    return loss_sum.float(), count
