"""The training loss as a SUM over label tokens, never a per-batch mean.

The loop divides the sum by the number of label tokens in the whole optimizer step (all micro-batches,
all ranks), so packing, padding and gradient accumulation change nothing about what is optimised:
every trained token weighs the same. A per-micro-batch mean would weigh a token in a short batch more.
"""

from __future__ import annotations

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
