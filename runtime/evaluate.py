"""Loss on the validation split: token-weighted over all ranks, like the training loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .losses import token_loss_sum


@torch.no_grad()
def evaluate(model: torch.nn.Module, accelerator: Any, micro_batches: list[list[list[int]]],
             batch_of: Callable[[list[list[int]]], dict[str, torch.Tensor]],
             forward_kwargs: Callable[[torch.Tensor | None], dict[str, Any]]) -> float:
    """Every rank evaluates its share (`micro_batches`, planned for this rank); collective."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for micro_batch in micro_batches:
        batch = {k: v.to(accelerator.device) for k, v in batch_of(micro_batch).items()}
        inputs = {k: v for k, v in batch.items() if k != "labels"} | forward_kwargs(batch["position_ids"])
        logits = model(**inputs, use_cache=False).logits
        loss_sum, count = token_loss_sum(logits, batch["labels"])
        totals += torch.stack([loss_sum.double(), count.double()])
    model.train()
    loss_sum, count = accelerator.reduce(totals, reduction="sum").tolist()
    return loss_sum / max(1.0, count)
