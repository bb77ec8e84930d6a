"""Data for the training loop: rows → formatted, tokenised, label-masked examples in a prepared-data cache.

``prepare_data`` is the one entry point: the main process builds the cache when it is missing or stale (its
key covers everything that changes tokens), every process then opens it memory-mapped; with ``skip_prepare``
every process tokenises into memory and nothing is written. It reads the run plan's ``data`` section only.
Streaming plans prepare nothing: ``streaming.py`` reads, tokenises and packs as training goes. Batching
(packing, padding, per-rank order) lives in ``batching.py``; where an example came from (file and row, for the
watchdog's report) in ``cache.py`` (``TokenizedDataset.origin``, ``describe_examples``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...schemas.run_plan import DataPlan
from . import build as builder
from .cache import SHARD_ROWS, TokenizedDataset, describe_examples
from .errors import DataError

__all__ = ["DataError", "PreparedData", "TokenizedDataset", "describe_examples", "prepare_data",
           "prepared_cache_dir"]
log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: TokenizedDataset
    eval: TokenizedDataset | None
    # rows, tokens, trained_tokens, dropped_rows, dropped, split_rows, leading_padding_stripped, train, eval,
    # reused, …
    stats: dict[str, Any]
    cache_dir: Path | None  # None: tokenised in memory (skip_prepare), nothing on disk


def _no_barrier() -> None:
    """A single process has nobody to wait for."""


def prepared_cache_dir(data: DataPlan, tokenizer: Any, *, seed: int, offline: bool) -> Path:
    """Where this plan's prepared data lives: ``<data.prepared_path>/<key>``."""
    sources = builder.resolve_sources(data.datasets, offline=offline)
    return Path(data.prepared_path).expanduser() / builder.cache_key(data, tokenizer, sources, seed=seed)


def prepare_data(data: DataPlan, tokenizer: Any, *, seed: int, offline: bool, is_main_process: bool = True,
                 barrier: Callable[[], None] = _no_barrier, shard_rows: int = SHARD_ROWS) -> PreparedData:
    """Build (main process, when needed) or reuse the prepared data, wait at ``barrier``, then open it.

    ``seed`` is the run's (it picks the eval rows; 0 is a seed like any other); ``offline`` the plan's flag
    (the HF_* offline environment counts too). With ``data.skip_prepare`` every process tokenises for itself
    into memory and nothing is written (no shared cache, so no barrier either)."""
    if data.streaming:
        raise DataError("streaming data is read, tokenised and packed as training goes: there is nothing to "
                        "prepare (see runtime/data/streaming.py)")
    sources = builder.resolve_sources(data.datasets, offline=offline)
    if data.skip_prepare:
        log.info("skip_prepare: tokenising %d dataset(s) in memory; nothing is written to %s", len(sources),
                 data.prepared_path)
        stats, train, evaluation = builder.build_in_memory(data, tokenizer, sources, seed=seed, shard_rows=shard_rows)
        return PreparedData(train=train, eval=evaluation, stats={**stats, "reused": False}, cache_dir=None)
    directory = Path(data.prepared_path).expanduser() / builder.cache_key(data, tokenizer, sources, seed=seed)
    reused = builder.is_complete(directory)
    failure: Exception | None = None
    if is_main_process and not reused:
        log.info("tokenising %d dataset(s) into %s", len(sources), directory)
        try:
            builder.build(data, tokenizer, sources, directory, seed=seed, shard_rows=shard_rows)
        except Exception as exc:  # noqa: BLE001 - reach the barrier first so the other ranks are not left waiting
            failure = exc
    barrier()
    if failure is not None:
        raise failure
    if not builder.is_complete(directory):
        # Not visible after the barrier: prepared path on node-local disk of another node. Build our own copy
        # (deterministic, and the atomic rename settles races between this node's processes).
        log.info("prepared data not found at %s after the main process built it; building a local copy", directory)
        builder.build(data, tokenizer, sources, directory, seed=seed, shard_rows=shard_rows)
    elif reused and is_main_process:
        log.info("reusing prepared data in %s", directory)
    stats = json.loads((directory / "stats.json").read_text(encoding="utf-8"))
    stats["reused"] = reused
    evaluation = TokenizedDataset(directory / "eval") if (directory / "eval" / "index.json").is_file() else None
    return PreparedData(train=TokenizedDataset(directory / "train"), eval=evaluation, stats=stats,
                        cache_dir=directory)
