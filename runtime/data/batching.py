"""Batches: which examples go together (``plan_batches``) and how they become tensors (``collate``).

The plan is a pure function of (lengths, seed, epoch, rank, world size): resuming a run recomputes the same
plan and skips the micro-batches already done, and every rank gets the same number of micro-batches, so
data-parallel ranks stay in step.

Packing: examples are shuffled, then binned best-fit-decreasing within windows of ``PACKING_WINDOW`` examples
into rows of at most ``sequence_len`` tokens (windows keep each epoch's bins different; best-fit-decreasing
within a window packs nearly as tightly as over the whole set), and the bins are shuffled again.

Length grouping (without packing; Axolotl's group_by_length, which is Hugging Face's ``LengthGroupedSampler``):
the shuffled examples are cut into megabatches of ``min(50, examples // (4 × batch)) × batch`` examples, where
batch is the micro-batch size times the gradient accumulation steps (the batch size the Trainer gives the
sampler), each megabatch is sorted longest first, and the longest example of all is moved to the very front,
so a batch too large for memory fails on the first step rather than hours in. Rows of a micro-batch then have
similar lengths, so little of it is padding; the order is still a function of (seed, epoch) alone.

Evaluation is planned apart (``plan_eval_batches``): every example is evaluated exactly once whatever the
packing and the number of ranks, so packed and padded evaluation average the same tokens.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

IGNORE = -100
PACKING_WINDOW = 4096


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch)])


def pack(lengths: np.ndarray, order: np.ndarray, sequence_len: int) -> list[list[int]]:
    """Bins of example indices (taken in ``order``) whose lengths sum to at most ``sequence_len``:
    best-fit decreasing per window, a bin's examples in the order they were placed."""
    bins: list[list[int]] = []
    for start in range(0, len(order), PACKING_WINDOW):
        window = order[start:start + PACKING_WINDOW]
        # Stable sort by decreasing length: ties keep the shuffled order.
        window = window[np.argsort(-lengths[window], kind="stable")]
        window_bins: list[list[int]] = []
        free: list[tuple[int, int]] = []  # (space left, bin number), sorted: bisect finds the tightest fit
        for index in window.tolist():
            size = int(lengths[index])
            at = bisect_left(free, (size, -1))
            if at < len(free):
                space, number = free.pop(at)
                window_bins[number].append(index)
                if space - size > 0:
                    insort(free, (space - size, number))
            else:
                window_bins.append([index])
                if sequence_len - size > 0:
                    insort(free, (sequence_len - size, len(window_bins) - 1))
        bins.extend(window_bins)
    return bins


def length_grouped(order: np.ndarray, lengths: np.ndarray, batch_size: int) -> np.ndarray:
    """``order`` (already shuffled) regrouped as Hugging Face's ``get_length_grouped_indices`` does: megabatches
    of up to 50 batches, each sorted by decreasing length (ties keep the shuffled order), the longest example
    of all swapped to the front."""
    if not len(order):
        return order
    megabatch = max(min(len(order) // (batch_size * 4), 50), 1) * batch_size
    groups = [order[start:start + megabatch] for start in range(0, len(order), megabatch)]
    groups = [group[np.argsort(-lengths[group], kind="stable")] for group in groups]
    longest = int(np.argmax([lengths[group[0]] for group in groups]))
    groups[0][0], groups[longest][0] = groups[longest][0], groups[0][0]
    return np.concatenate(groups)


def plan_batches(lengths: Sequence[int] | np.ndarray, *, micro_batch_size: int, sequence_len: int,
                 sample_packing: bool, seed: int, epoch: int, world_size: int = 1,
                 rank: int = 0, group_by_length: bool = False, accumulation: int = 1) -> list[list[list[int]]]:
    """This rank's micro-batches for one epoch, in order: micro-batch → rows → example indices (one per row
    without packing; a bin of several with packing). ``group_by_length`` (without packing; packing ignores it,
    as in Axolotl) orders the rows by ``length_grouped`` over batches of micro_batch_size × ``accumulation``.

    Rows are dealt round-robin to ranks (rank r takes rows r, r + world, …) after dropping the last
    ``len(rows) % world_size`` rows, so every rank has as many rows, hence as many micro-batches; only a rank's
    final micro-batch may be smaller than ``micro_batch_size``, and then on every rank alike."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not (micro_batch_size >= 1 and world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"bad batch geometry: micro_batch_size={micro_batch_size}, rank {rank} of {world_size}")
    if len(lengths) and int(lengths.max()) > sequence_len:
        raise ValueError(f"an example has {int(lengths.max())} tokens, more than sequence_len={sequence_len}")
    rng = _rng(seed, epoch)
    order = rng.permutation(len(lengths))
    order = order[lengths[order] > 0]
    if sample_packing:
        rows = pack(lengths, order, sequence_len)
        rows = [rows[i] for i in rng.permutation(len(rows))]
    else:
        if group_by_length:
            order = length_grouped(order, lengths, micro_batch_size * accumulation)
        rows = [[index] for index in order.tolist()]
    per_rank = len(rows) // world_size
    mine = rows[rank:per_rank * world_size:world_size]
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


@dataclass(frozen=True)
class EvalPlan:
    """This rank's evaluation micro-batches, and ``idle`` more micro-batches to run without counting their loss:
    ranks whose share is smaller still run as many forward passes as the busiest rank (sharded strategies
    gather weights in every forward, so every rank must take part in each one)."""

    micro_batches: list[list[list[int]]]
    idle: list[list[list[int]]]


def plan_eval_batches(lengths: Sequence[int] | np.ndarray, *, micro_batch_size: int, sequence_len: int,
                      packed: bool, world_size: int = 1, rank: int = 0) -> EvalPlan:
    """Example i goes to rank i % world_size (none is dropped, unlike training's equal shares); each rank packs
    its examples best-fit-decreasing (``packed``) or puts one per row, in micro-batches of ``micro_batch_size``
    rows. No shuffling: the loss is a sum over every example, so order does not matter, and a fixed plan makes
    successive evaluations comparable."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not (micro_batch_size >= 1 and world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"bad batch geometry: micro_batch_size={micro_batch_size}, rank {rank} of {world_size}")
    if len(lengths) and int(lengths.max()) > sequence_len:
        raise ValueError(f"an example has {int(lengths.max())} tokens, more than sequence_len={sequence_len}")

    def share(of_rank: int) -> list[list[list[int]]]:
        order = np.arange(of_rank, len(lengths), world_size)
        order = order[lengths[order] > 0]
        rows = pack(lengths, order, sequence_len) if packed else [[index] for index in order.tolist()]
        return [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]

    mine = share(rank)
    busiest = max(len(share(r)) if r != rank else len(mine) for r in range(world_size))
    # Any one real example will do for an idle pass; its loss is never counted.
    stand_in = [[int(np.flatnonzero(lengths > 0)[0])]] if (lengths > 0).any() else []
    idle = [stand_in] * (busiest - len(mine)) if stand_in else []
    return EvalPlan(micro_batches=mine, idle=idle)


def packing_efficiency(lengths: Sequence[int] | np.ndarray, micro_batches: list[list[list[int]]],
                       sequence_len: int) -> float:
    """Real tokens over row capacity (rows × sequence_len) across the given micro-batches."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rows = [row for micro_batch in micro_batches for row in micro_batch]
    if not rows:
        return 0.0
    return float(sum(int(lengths[row].sum()) for row in rows)) / (len(rows) * sequence_len)


def collate(dataset: Any, micro_batch: list[list[int]], *, pad_token_id: int, sequence_len: int,
            pad_to_sequence_len: bool, packed: bool | None = None) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch, every one ``[B, L]`` and ``torch.long``, right-padded:

    - ``input_ids``: the row's examples back to back, then ``pad_token_id``;
    - ``labels``: the examples' labels (-100 = no loss); padding is -100, and in a packed row the first token
      of every example is -100, so no example is predicted from the end of its neighbour;
    - ``position_ids``: restart at 0 at each example's start; padding positions continue counting from the
      last example (so padding reads as part of the last sequence, which causal attention makes harmless);
    - ``attention_mask`` (1 real, 0 padding): only when not packed. ``packed`` defaults to "some row holds
      more than one example"; pass the run's sample_packing to make the batch keys fixed per run.

    ``L`` is ``sequence_len`` with ``pad_to_sequence_len``, else the longest row rounded up to a multiple of 8
    (never beyond ``sequence_len`` unless a row itself is longer)."""
    if packed is None:
        packed = any(len(row) > 1 for row in micro_batch)
    examples = [[dataset[index] for index in row] for row in micro_batch]
    row_lengths = [sum(len(example["input_ids"]) for example in row) for row in examples]
    longest = max(row_lengths, default=0)
    if pad_to_sequence_len:
        width = max(sequence_len, longest)
    else:
        width = min(-(-max(longest, 1) // 8) * 8, max(sequence_len, longest))
    input_ids = np.full((len(examples), width), pad_token_id, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE, dtype=np.int64)
    position_ids = np.tile(np.arange(width, dtype=np.int64), (len(examples), 1))
    attention_mask = np.zeros((len(examples), width), dtype=np.int64)
    for b, row in enumerate(examples):
        cursor = 0
        for example in row:
            n = len(example["input_ids"])
            input_ids[b, cursor:cursor + n] = example["input_ids"]
            labels[b, cursor:cursor + n] = example["labels"]
            position_ids[b, cursor:cursor + n] = np.arange(n)
            if packed and n:
                labels[b, cursor] = IGNORE
            cursor += n
        attention_mask[b, :cursor] = 1
        if cursor < width:  # padding continues the last example's positions
            last = len(row[-1]["input_ids"]) if row else 0
            position_ids[b, cursor:] = np.arange(last, last + width - cursor)
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
             "position_ids": torch.from_numpy(position_ids)}
    if not packed:
        batch["attention_mask"] = torch.from_numpy(attention_mask)
    return batch
