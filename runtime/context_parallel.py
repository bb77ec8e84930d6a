"""Context parallelism (Axolotl's context_parallel_size): the ranks of a context-parallel group share every row,
each holding one contiguous slice of its tokens, so a long sequence's activations are divided between them.

Everything in a decoder but attention works token by token, so it runs on the slice unchanged. Attention gathers
the keys and values of the whole row from the group (a differentiable all-gather: its backward sums the gradients
back onto the slice they came from) and lets the slice's queries attend to them through a mask that says which
key each query may see: causal, within one packed sample, within the sliding window. That is what ring-flash-attn's
"llama3" variant does (Axolotl's default under sample packing), here on PyTorch's scaled_dot_product_attention, so
it runs wherever PyTorch does (the CPU's gloo too). Keys after the slice's last token are never visible, so a rank
gathers the whole row but attends only to the part up to its own end. The result is the attention of the whole row.

The mask is dense: [rows, 1, slice, visible keys] booleans, one per micro-batch, shared by every layer. That is
fine for the sequence lengths PyTorch's SDPA itself handles; far longer contexts need a flash kernel with
log-sum-exp merging, which this module does not have.

The loss: labels are shifted (token t is trained to predict label t + 1) BEFORE the row is sliced, so the token at
the end of one slice still predicts the first label of the next. Axolotl slices the unshifted labels and shifts
inside each slice, losing one label per slice boundary; here the CP loss is the loss of the whole row, exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .attention import segment_ids
from .errors import RuntimeUserError
from .losses import IGNORE_INDEX

log = logging.getLogger(__name__)

ATTENTION_NAME = "tunefile_context_parallel"  # the attn_implementation the model loads with under CP


class ContextParallelError(RuntimeUserError):
    """The model cannot be trained with context parallelism; the message says why."""


@dataclass(frozen=True)
class ContextGroup:
    """This rank's context-parallel group: ``size`` ranks holding slices ``0 … size-1`` of the same rows."""

    group: Any  # torch.distributed ProcessGroup
    size: int
    rank: int  # this rank's slice


class _Registration:
    """The group the attention function gathers over (one per process, like the process group itself) and how
    many times it ran, which checks that every layer of the model is an attention layer (``check_layers``)."""

    group: ContextGroup | None = None
    calls = 0


_REGISTERED = _Registration()


def register(group: ContextGroup) -> str:
    """Make ``group`` the one attention gathers over and register the attention function with transformers;
    returns the attn_implementation name to load the model with."""
    from transformers import AttentionInterface

    _REGISTERED.group = group
    AttentionInterface.register(ATTENTION_NAME, context_parallel_attention)
    return ATTENTION_NAME


class _GatherSequence(torch.autograd.Function):
    """[B, H, slice, D] on each rank → [B, H, size × slice, D], the slices in rank order. Backward: each rank's
    slice receives the sum of every rank's gradient for it (a reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: ContextGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(group.size)]
        dist.all_gather(parts, local, group=group.group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        group: ContextGroup = ctx.group
        grad = grad.contiguous()
        batch, heads, length, dim = grad.shape
        piece = length // group.size
        if dist.get_backend(group.group) == "nccl":
            stacked = grad.view(batch, heads, group.size, piece, dim).permute(2, 0, 1, 3, 4).contiguous()
            out = torch.empty((batch, heads, piece, dim), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, stacked, group=group.group)
            return out, None
        # gloo has no reduce-scatter: the sum of the whole gradient, then this rank's slice of it.
        dist.all_reduce(grad, group=group.group)
        return grad.narrow(2, group.rank * piece, piece).contiguous(), None


def gather_sequence(local: torch.Tensor, group: ContextGroup) -> torch.Tensor:
    return _GatherSequence.apply(local, group)


def context_parallel_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0,
                               scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (query/key/value [B, H, slice, D] → output [B, slice, H, D]).
    ``attention_mask`` is ContextSplit's [B, 1, slice, visible] mask: which gathered keys each query sees."""
    group = _REGISTERED.group
    if group is None or attention_mask is None or attention_mask.dim() != 4:
        raise RuntimeError("context-parallel attention runs only on batches split by ContextSplit.split")
    if kwargs.get("s_aux") is not None or kwargs.get("softcap") is not None:
        raise ContextParallelError("context parallelism: this model's attention has sinks or a logit softcap, "
                                   "which tunefile's context-parallel attention does not compute")
    _REGISTERED.calls += 1
    visible = attention_mask.shape[-1]
    keys = gather_sequence(key, group)[:, :, :visible]
    values = gather_sequence(value, group)[:, :, :visible]
    if keys.shape[1] != query.shape[1]:  # grouped-query attention: give every query head its key/value head
        repeat = query.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(repeat, dim=1), values.repeat_interleave(repeat, dim=1)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=attention_mask,
                                         dropout_p=dropout if module.training else 0.0, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def check_model(config: Any) -> None:
    """Refuse models whose attention the gathered SDPA does not reproduce (before any weight loads)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "attn_logit_softcapping", None):
        raise ContextParallelError(f"context parallelism: {text.model_type} caps its attention logits "
                                   "(attn_logit_softcapping), which tunefile's context-parallel attention does not do")
    if getattr(text, "attention_chunk_size", None):
        raise ContextParallelError(f"context parallelism: {text.model_type} attends within chunks "
                                   "(attention_chunk_size), which tunefile's context-parallel attention does not mask")
    layer_types = set(getattr(text, "layer_types", None) or ())
    if "sliding_attention" in layer_types and layer_types != {"sliding_attention"}:
        raise ContextParallelError(f"context parallelism: {text.model_type} mixes sliding-window and full attention "
                                   "layers; tunefile's context-parallel attention gives every layer one mask")


def check_layers(model_config: Any) -> None:
    """After a model's first context-parallel forward: every decoder layer must have gone through the gathered
    attention. A layer that mixes tokens some other way (a Mamba or convolution layer of a hybrid model) would see
    only its own slice of the row, and train on something else than the whole sequence."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    layers = getattr(text, "num_hidden_layers", None)
    calls, _REGISTERED.calls = _REGISTERED.calls, 0
    if layers is not None and calls != layers:
        raise ContextParallelError(f"context parallelism: {text.model_type} ran attention in {calls} of its "
                                   f"{layers} layers; the others (state-space or convolution layers) would mix only "
                                   "the tokens of their own slice. Train it without context_parallel_size")


@dataclass(frozen=True)
class ContextSplit:
    """Cuts a collated micro-batch (batching.collate's [B, L] input_ids, labels, position_ids) into this rank's
    slice, with the shifted labels (``targets``) and the attention mask of the slice."""

    group: ContextGroup
    pad_token_id: int
    sliding_window: int | None

    def split(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        size, rank = self.group.size, self.group.rank
        input_ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # targets[t] = labels[t + 1]
        extra = -input_ids.shape[1] % size  # the row is padded to a whole number of slices
        if extra:
            input_ids = F.pad(input_ids, (0, extra), value=self.pad_token_id)
            targets = F.pad(targets, (0, extra), value=IGNORE_INDEX)
            # Padding continues the last sample's positions, as collate's own padding does.
            positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, extra + 1, device=positions.device)],
                                  dim=1)
        piece = input_ids.shape[1] // size
        start, end = rank * piece, (rank + 1) * piece
        return {"input_ids": input_ids[:, start:end], "position_ids": positions[:, start:end],
                "attention_mask": self.mask(positions, start=start, end=end), "targets": targets[:, start:end]}

    def mask(self, positions: torch.Tensor, *, start: int, end: int) -> torch.Tensor:
        """[B, 1, end - start, end] booleans: query start + i sees key j when j ≤ start + i, both are in the same
        packed sample, and j is inside the sliding window."""
        segments = segment_ids(positions[:, :end])
        queries = torch.arange(start, end, device=positions.device)
        keys = torch.arange(end, device=positions.device)
        allowed = keys[None, :] <= queries[:, None]
        if self.sliding_window is not None:
            allowed = allowed & (queries[:, None] - keys[None, :] < self.sliding_window)
        same_sample = segments[:, start:end, None] == segments[:, None, :]
        return (same_sample & allowed[None])[:, None]


def slice_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the slice's token losses, its label tokens), in fp32: token t against its shifted label."""
    flat = targets.reshape(-1).to(logits.device)
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return loss_sum, (flat != IGNORE_INDEX).sum()


def forward_loss(model: torch.nn.Module, split: ContextSplit,
                 batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (loss sum, label tokens) of a micro-batch (already on the device): collective, every rank of
    the group runs it for the same micro-batch."""
    local = split.split(batch)
    targets = local.pop("targets")
    logits = model(**local, use_cache=False).logits
    return slice_loss(logits, targets)
