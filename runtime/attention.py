"""Attention isolation between packed samples.

A packed row holds several samples end to end; `position_ids` restart at 0 where each sample starts
(the data side's collate guarantees it). Causal attention alone would let a sample see the ones
packed before it, so every path here keeps attention inside a sample:

- ``block_mask``: a 4D block-diagonal causal mask, passed as ``attention_mask``. transformers returns
  a 4D mask unchanged (``masking_utils._preprocess_mask_arguments``), so SDPA and eager use it as is.
  Works everywhere, costs O(L²) memory per row.
- ``torch_varlen``: PyTorch's own varlen kernel (``torch.nn.attention.varlen.varlen_attn``, CUDA only),
  registered as an attention function and fed ``cu_seq_lens``; no mask at all.
- ``flash_varlen``: transformers' ``flash_attention_2`` fed the same ``cu_seq_lens`` kwargs
  (``_flash_attention_forward`` takes them as given instead of re-deriving them in every layer).

The kwargs are computed once per batch, in `packing_forward_kwargs`, and flow through the model's
``**kwargs`` down to every attention call.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

TORCH_VARLEN = "tunefile_torch_varlen"  # the name our varlen function is registered under


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] ids, equal within one packed sample: a sample starts wherever the position does not
    continue the previous one (position 0 after anything, or the row's first token)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(dim=-1)


def block_causal_mask(position_ids: torch.Tensor, *, additive_dtype: torch.dtype | None = None,
                      sliding_window: int | None = None) -> torch.Tensor:
    """[B, 1, L, L] mask letting token q see token k only when both are in the same sample and k <= q.

    Boolean (True = attend) for SDPA; additive (0 or dtype-min) when ``additive_dtype`` is given,
    because eager attention adds the mask to the scores. Every row keeps its diagonal, so no
    softmax row is empty (padding forms its own segments)."""
    seg = segment_ids(position_ids)
    length = position_ids.shape[-1]
    idx = torch.arange(length, device=position_ids.device)
    causal = idx[None, :] <= idx[:, None]  # [q, k]
    if sliding_window is not None:
        causal = causal & (idx[:, None] - idx[None, :] < sliding_window)
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal[None]
    allowed = allowed[:, None]  # head dimension, broadcast
    if additive_dtype is None:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=additive_dtype, device=position_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(additive_dtype).min)


def varlen_metadata(position_ids: torch.Tensor) -> dict[str, Any]:
    """cu_seq_lens / max_length over the batch flattened to one stream of B*L tokens; each row start
    is a sample start too, so rows never run into each other."""
    seg = segment_ids(position_ids)
    # Make segment ids unique across rows, then count the run lengths of the flattened stream.
    seg = seg + torch.arange(seg.shape[0], device=seg.device)[:, None] * (seg.shape[1] + 1)
    _, lengths = torch.unique_consecutive(seg.flatten(), return_counts=True)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=position_ids.device)
    cu[1:] = lengths.cumsum(0)
    max_len = int(lengths.max())  # one host sync per batch, not per layer
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}


def torch_varlen_available(device_type: str) -> bool:
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def torch_varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature: query/key/value [B, H, L, D] → output [B, L, H, D]."""
    from torch.nn.attention.varlen import varlen_attn

    if cu_seq_lens_q is None or max_length_q is None:
        raise RuntimeError("torch_varlen attention needs cu_seq_lens_q/max_length_q; "
                           "call the model with attention.packing_forward_kwargs(...)")
    if dropout and module.training:
        raise RuntimeError("torch_varlen attention does not support attention dropout")
    batch, heads, length, head_dim = query.shape
    out_dtype = query.dtype
    # The kernel runs in half precision only; under autocast q/k/v already are.
    run_dtype = out_dtype if out_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], head_dim).to(run_dtype)
               for t in (query, key, value))
    window = getattr(module, "sliding_window", None)
    options: dict[str, Any] = {"window_size": (window - 1 if window else -1, 0)}
    supported = _varlen_parameters()
    if k.shape[1] != heads:  # grouped-query attention: fewer key/value heads than query heads
        if "enable_gqa" in supported:
            options["enable_gqa"] = True
        else:  # older PyTorch: give every query head its own copy
            k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    if scaling is not None:
        if "scale" in supported:
            options["scale"] = scaling
        else:  # the kernel's default is 1/sqrt(head_dim); fold any other scale into the queries
            q = q * (scaling * head_dim**0.5)
    out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q,
                      max_length_q, max_length_q if max_length_k is None else max_length_k, **options)
    return out.reshape(batch, length, heads, head_dim).to(out_dtype), None


@functools.cache
def _varlen_parameters() -> frozenset[str]:
    """Keyword arguments this PyTorch's varlen_attn takes (`scale` and `enable_gqa` came after 2.10)."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def register_torch_varlen() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(TORCH_VARLEN, torch_varlen_attention_forward)
    return TORCH_VARLEN


@dataclass(frozen=True)
class AttentionDecision:
    """What this machine runs: the packing isolation, the attn_implementation the model loads with, and why
    it differs from the plan when it does (recorded in metrics.jsonl and train_summary.json)."""

    packing: str | None  # torch_varlen | flash_varlen | block_mask; None without sample packing
    attn_implementation: str
    fallback: str | None  # None: the compiler's choice runs as planned


def decide_attention(planned_packing: str | None, *, attn_implementation: str,
                     device_type: str) -> AttentionDecision:
    """The compiler chose ``planned_packing`` (None: no packing) and ``attn_implementation`` for the target;
    here we check the machine we landed on and fall back, saying why, when a kernel is missing: to PyTorch's
    kernels for a missing flash-attn, to the block mask (always correct, only slower) for a missing varlen."""
    fallback = None
    if attn_implementation.startswith("flash_attention") and not flash_attn_installed():
        # The bundle was compiled for flash-attn but this machine lacks the package: train on with PyTorch's
        # own kernels rather than stop a job that waited in a queue.
        if planned_packing is not None and torch_varlen_available(device_type):
            return AttentionDecision("torch_varlen", register_torch_varlen(),
                                     "flash-attn is not installed: packed samples use PyTorch's varlen kernel")
        fallback = "flash-attn is not installed: PyTorch SDPA (pip install 'tunefile[flash]' for it)"
        attn_implementation = "sdpa"
        planned_packing = "block_mask" if planned_packing is not None else None
    if planned_packing is None:
        return AttentionDecision(None, attn_implementation, fallback)
    if planned_packing == "torch_varlen":
        if torch_varlen_available(device_type):
            return AttentionDecision("torch_varlen", register_torch_varlen(), fallback)
        return AttentionDecision("block_mask", "sdpa", f"torch_varlen needs CUDA and torch.nn.attention.varlen "
                                                       f"({device_type} here): a block-diagonal mask with sdpa")
    if planned_packing == "flash_varlen" and not attn_implementation.startswith("flash_attention"):
        return AttentionDecision("block_mask", attn_implementation,
                                 f"flash_varlen without flash attention ({attn_implementation}): a block-diagonal mask")
    if attn_implementation.startswith("flash_attention") or attn_implementation == TORCH_VARLEN:
        # Flash kernels take no dense mask: isolation has to come from cu_seq_lens.
        return AttentionDecision("flash_varlen", attn_implementation, fallback)
    return AttentionDecision("block_mask", attn_implementation, fallback)


def choose_packing_attention(requested: str | None, *, sample_packing: bool, attn_implementation: str,
                             device_type: str) -> tuple[str | None, str]:
    """(packing mode, attn_implementation) as ``decide_attention`` decides them, logging any fallback."""
    planned = None
    if sample_packing:
        planned = "block_mask" if requested is None else requested
    decision = decide_attention(planned, attn_implementation=attn_implementation, device_type=device_type)
    if decision.fallback:
        log.warning("attention: %s", decision.fallback)
    return decision.packing, decision.attn_implementation


def packing_forward_kwargs(mode: str | None, position_ids: torch.Tensor | None, *, attn_implementation: str,
                           dtype: torch.dtype, sliding_window: int | None = None) -> dict[str, Any]:
    """Extra keyword arguments for ``model(...)`` that isolate the packed samples of this batch."""
    if mode is None or position_ids is None:
        return {}
    if mode == "block_mask":
        additive = dtype if attn_implementation == "eager" else None
        return {"attention_mask": block_causal_mask(position_ids, additive_dtype=additive,
                                                    sliding_window=sliding_window)}
    return varlen_metadata(position_ids)
