"""Data for the training loop: rows → formatted, tokenised, label-masked examples in a prepared-data cache.

``prepare_data`` is the one entry point: the main process builds the cache when it is missing or stale (its
key covers everything that changes tokens), every process then opens it memory-mapped. Batching (packing,
padding, per-rank order) lives in ``batching.py``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import build as builder
from .cache import SHARD_ROWS, TokenizedDataset
from .errors import DataError

__all__ = ["DataError", "PreparedData", "TokenizedDataset", "prepare_data", "prepared_cache_dir"]
log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: TokenizedDataset
    eval: TokenizedDataset | None
    stats: dict[str, Any]  # rows, tokens, trained_tokens, dropped_rows, dropped, split_rows, train, eval, reused, …
    cache_dir: Path


def prepared_cache_dir(cfg: Any, tokenizer: Any) -> Path:
    """Where this config's prepared data lives: ``<dataset_prepared_path>/<key>``."""
    root = Path(cfg.get("dataset_prepared_path") or "last_run_prepared").expanduser()
    return root / builder.cache_key(cfg, tokenizer, builder.resolve_sources(cfg))


def prepare_data(cfg: Any, tokenizer: Any, *, is_main_process: bool = True,
                 barrier: Callable[[], None] = lambda: None, shard_rows: int = SHARD_ROWS) -> PreparedData:
    """Build (main process, when needed) or reuse the prepared data, wait at ``barrier``, then open it."""
    sources = builder.resolve_sources(cfg)
    root = Path(cfg.get("dataset_prepared_path") or "last_run_prepared").expanduser()
    directory = root / builder.cache_key(cfg, tokenizer, sources)
    reused = builder.is_complete(directory)
    failure: Exception | None = None
    if is_main_process and not reused:
        log.info("tokenising %d dataset(s) into %s", len(sources), directory)
        try:
            builder.build(cfg, tokenizer, sources, directory, shard_rows=shard_rows)
        except Exception as exc:  # noqa: BLE001 - reach the barrier first so the other ranks are not left waiting
            failure = exc
    barrier()
    if failure is not None:
        raise failure
    if not builder.is_complete(directory):
        # Not visible after the barrier: prepared path on node-local disk of another node. Build our own copy
        # (deterministic, and the atomic rename settles races between this node's processes).
        log.info("prepared data not found at %s after the main process built it; building a local copy", directory)
        builder.build(cfg, tokenizer, sources, directory, shard_rows=shard_rows)
    elif reused and is_main_process:
        log.info("reusing prepared data in %s", directory)
    stats = json.loads((directory / "stats.json").read_text(encoding="utf-8"))
    stats["reused"] = reused
    evaluation = TokenizedDataset(directory / "eval") if (directory / "eval" / "index.json").is_file() else None
    return PreparedData(train=TokenizedDataset(directory / "train"), eval=evaluation, stats=stats,
                        cache_dir=directory)
