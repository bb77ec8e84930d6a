"""Full fine-tuning of part of a model: the plan's ``model.unfrozen_parameters`` (Axolotl's key of that name).

Each entry is a regular expression matched with ``re.match`` against the names of ``named_parameters()``:
anchored at the start of the name, not at its end (add ``$`` for that). As in Axolotl, a ``.`` is a literal
dot, except in ``.+``, because dots separate the parts of a parameter name; so ``model.layers.1`` also
matches ``model.layers.10``. An entry may end in a row range of the parameter's first dimension,
``name[start:end]``, ``name[:end]``, ``name[start:]`` or ``name[index]`` (e.g. only the embedding rows of
newly added tokens): the parameter trains, and the gradients of the rows outside the ranges are zeroed.

Every parameter that no entry matches is frozen. Where Axolotl would warn and train nothing, this is an
error: a run that cannot learn is not worth its queue time.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import RuntimeUserError

log = logging.getLogger(__name__)

# `name[3]`, `name[2:5]`, `name[:5]`, `name[2:]`, `name[]`; no group for the end means a single index.
_ROWS_SUFFIX = re.compile(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$")
# A dot not followed by `+`: Axolotl reads it as the separator in a parameter name, not "any character".
_SEPARATOR_DOT = re.compile(r"\.(?!\+)")

Rows = tuple[int, int | None]  # [start, end) of the first dimension; None: to the end


class UnfrozenParametersError(RuntimeUserError):
    """unfrozen_parameters cannot be applied to this model as written."""


@dataclass(frozen=True)
class UnfreezePattern:
    text: str  # as the config wrote it, for messages
    name: re.Pattern[str]
    rows: Rows | None  # None: the whole parameter

    def matches(self, parameter_name: str) -> bool:
        return self.name.match(parameter_name) is not None


def parse_pattern(text: str) -> UnfreezePattern:
    """One unfrozen_parameters entry, read the way Axolotl reads it."""
    rows: Rows | None = None
    name = text
    suffix = _ROWS_SUFFIX.match(text)
    if suffix:
        name, start, end = suffix.groups()
        if end is None and start.isdecimal():
            rows = (int(start), int(start) + 1)
        else:
            rows = (int(start) if start else 0, int(end) if end else None)
            if rows[1] is not None and rows[0] >= rows[1]:
                raise UnfrozenParametersError(f"unfrozen_parameters: {text}: the range ends before it starts")
    try:
        compiled = re.compile(_SEPARATOR_DOT.sub(r"\\.", name))
    except re.error as exc:
        raise UnfrozenParametersError(f"unfrozen_parameters: {text}: not a regular expression ({exc})") from None
    return UnfreezePattern(text, compiled, rows)


def has_row_ranges(patterns: tuple[str, ...] | None) -> bool:
    if patterns is None:
        return False
    return any(parse_pattern(text).rows is not None for text in patterns)


def first_dimension(param: torch.nn.Parameter) -> int:
    # Under ZeRO-3 a parameter is partitioned while it loads: its full shape is DeepSpeed's ds_shape.
    shape = param.ds_shape if hasattr(param, "ds_shape") else param.shape
    return int(shape[0]) if len(shape) else 1


def merge_rows(ranges: list[Rows], size: int, *, where: str) -> list[tuple[int, int]]:
    """The trained rows as sorted, non-overlapping [start, end) ranges within ``size`` rows."""
    closed = sorted((start, size if end is None else end) for start, end in ranges)
    beyond = max(end for _, end in closed)
    if beyond > size:
        raise UnfrozenParametersError(f"unfrozen_parameters: {where}: rows up to {beyond}, but the parameter has "
                                      f"{size}")
    merged: list[tuple[int, int]] = []
    for start, end in closed:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def frozen_rows(trained: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The complement of ``trained`` within ``size`` rows."""
    gaps, position = [], 0
    for start, end in trained:
        if start > position:
            gaps.append((position, start))
        position = end
    if position < size:
        gaps.append((position, size))
    return gaps


def zero_rows_hook(rows: list[tuple[int, int]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook that keeps the frozen rows' gradient at zero, so AdamW's moments stay zero there.
    (AdamW's decoupled weight decay still shrinks those rows when weight_decay > 0, as in Axolotl.)"""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()  # a hook must not modify the gradient it was handed in place
        for start, end in rows:
            grad[start:end] = 0
        return grad

    return hook


@dataclass(frozen=True)
class FreezeSummary:
    trained: tuple[str, ...]  # names of the parameters that train (some of them only in part)
    partly_trained: tuple[str, ...]  # … of which only some rows train
    unmatched_patterns: tuple[str, ...]  # entries that matched no parameter


def freeze_all_but(module: torch.nn.Module, patterns: tuple[str, ...]) -> FreezeSummary:
    """Freeze every parameter of ``module`` whose name no pattern matches; the matched ones train (in the rows
    their patterns name, when they name rows). Logs what trains; raises when nothing does."""
    parsed = [parse_pattern(text) for text in patterns]
    used: set[str] = set()
    trained, partly = [], []
    for name, param in module.named_parameters():
        hits = [p for p in parsed if p.matches(name)]
        used.update(p.text for p in hits)
        param.requires_grad_(bool(hits))
        if not hits:
            continue
        trained.append(name)
        if any(p.rows is None for p in hits):
            continue  # one entry names the whole parameter: every row trains
        size = first_dimension(param)
        rows = merge_rows([p.rows for p in hits if p.rows is not None], size, where=name)
        gaps = frozen_rows(rows, size)
        if gaps:
            param.register_hook(zero_rows_hook(gaps))
            partly.append(name)
    unmatched = tuple(p.text for p in parsed if p.text not in used)
    for text in unmatched:
        log.warning("unfrozen_parameters: %s matches no parameter of the model", text)
    if not trained:
        raise UnfrozenParametersError(
            f"unfrozen_parameters: none of {', '.join(patterns)} matches a parameter of the model, so nothing "
            "would train; names look like " + ", ".join(name for name, _ in list(module.named_parameters())[:3]))
    total = sum(1 for _ in module.parameters())
    log.info("unfrozen_parameters: %d of %d parameter tensors train%s", len(trained), total,
             f" ({len(partly)} of them in some rows only)" if partly else "")
    return FreezeSummary(tuple(trained), tuple(partly), unmatched)


def check_row_ranges_supported(patterns: tuple[str, ...] | None, *, fsdp: bool) -> None:
    """FSDP replaces every parameter with its shard, dropping the gradient hooks that freeze rows: the rows
    would silently train. Refuse rather than do that."""
    if fsdp and has_row_ranges(patterns):
        raise UnfrozenParametersError("unfrozen_parameters: row ranges (name[start:end]) do not work under FSDP, "
                                      "which replaces the parameters the ranges are attached to; unfreeze whole "
                                      "parameters or use DDP / DeepSpeed")
