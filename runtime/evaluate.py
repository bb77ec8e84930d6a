"""Loss on the validation split: token-weighted over all ranks, like the training loss.

The loss is the sum of token losses over every evaluated example divided by their label tokens, so it does
not depend on how examples are grouped: packed rows (``data.eval_packing``) and padded rows give the same
number, up to float rounding. The plan comes from ``batching.plan_eval_batches``, which evaluates each example
exactly once on some rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .losses import token_loss_sum

MicroBatch = list[list[int]]


@torch.no_grad()
def evaluate(model: torch.nn.Module, accelerator: Any, micro_batches: list[MicroBatch],
             batch_of: Callable[[MicroBatch], dict[str, torch.Tensor]],
             forward_kwargs: Callable[[torch.Tensor | None], dict[str, Any]], *,
             idle: Sequence[MicroBatch] = ()) -> float:
    """Every rank evaluates its share (``micro_batches``, planned for this rank), then runs the ``idle``
    micro-batches without counting them, so all ranks make as many forward passes; collective."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for micro_batch in micro_batches:
        loss_sum, count = _loss(model, accelerator, batch_of(micro_batch), forward_kwargs)
        totals += torch.stack([loss_sum.double(), count.double()])
    for micro_batch in idle:
        _loss(model, accelerator, batch_of(micro_batch), forward_kwargs)
    model.train()
    loss_sum, count = accelerator.reduce(totals, reduction="sum").tolist()
    return loss_sum / max(1.0, count)


def _loss(model: torch.nn.Module, accelerator: Any, batch: dict[str, torch.Tensor],
          forward_kwargs: Callable[[torch.Tensor | None], dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    inputs = {k: v for k, v in batch.items() if k != "labels"} | forward_kwargs(batch["position_ids"])
    logits = model(**inputs, use_cache=False).logits
    return token_loss_sum(logits, batch["labels"])


def decide_eval_packing(planned: bool, *, packing: bool, has_eval: bool) -> tuple[bool, str | None]:
    """(pack evaluation batches?, why that differs from the plan, or None). Packing needs the packing attention
    the compiler chose for training; a plan that packs evaluation but not training has none, so evaluation is
    padded (the same loss) and the reason is a runtime decision."""
    if planned and not packing and has_eval:
        return False, "padded: the plan packs evaluation but chose no packing attention (sample packing is off)"
    return planned and packing, None
