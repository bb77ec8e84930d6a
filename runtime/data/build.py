"""Build the prepared-data cache: the key over everything that changes tokens, and the streaming build.

The folder is ``<dataset_prepared_path>/<key>``. It is built under a temporary name and renamed into place
after its ``COMPLETE`` file is written, so a reader sees either nothing or a whole cache, even when a build is
killed or two processes race (the loser's copy is discarded).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from . import chat, formats
from .cache import COMPLETE, SHARD_ROWS, ShardWriter
from .errors import DataError
from .formats import RowError, make_formatter
from .sources import Source, count_rows, fingerprint, iter_rows, resolve_source
from .tokenizer import is_offline, tokenizer_fingerprint

log = logging.getLogger(__name__)
CACHE_VERSION = 1
# Run-wide options that change tokens or the split; dataset entries are hashed whole.
KEY_OPTIONS = ("sequence_len", "special_tokens", "tokens", "train_on_inputs", "val_set_size", "seed",
               "chat_template", "chat_template_jinja")
MAX_PROBLEMS = 5
TOKENISE_BATCH = 512  # rows tokenised per call: enough to keep every core busy, little memory


def _chunks(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    while chunk := list(islice(rows, size)):
        yield chunk


def resolve_sources(cfg: Any) -> list[Source]:
    entries = cfg.get("datasets") or []
    if not entries:
        raise DataError("no datasets: the config's `datasets:` list is empty")
    offline = is_offline(cfg)
    return [resolve_source(dict(entry), offline=offline) for entry in entries]


def cache_key(cfg: Any, tokenizer: Any, sources: list[Source]) -> str:
    """sha256 over: the data (local file bytes, Hub coordinates), each dataset entry, the run options that
    change tokens, the tokenizer (its full serialisation, special tokens, chat template) and the code that
    turns rows into tokens (so a fix to a format invalidates old caches)."""
    code = hashlib.sha256()
    for module in (formats, chat):
        code.update(Path(module.__file__).read_bytes())
    material = {
        "version": CACHE_VERSION,
        "datasets": [{"entry": source.entry, "data": fingerprint(source)} for source in sources],
        "options": {key: cfg.get(key) for key in KEY_OPTIONS},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "code": code.hexdigest(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE).is_file()


def eval_rows(total: int, val_set_size: float, seed: int) -> np.ndarray:
    """Sorted global row numbers held out for evaluation: a fraction (< 1) or a count (>= 1) of the rows,
    chosen by ``seed`` alone so every process and every rebuild picks the same ones."""
    if not val_set_size or total < 2:
        return np.zeros(0, dtype=np.int64)
    count = int(val_set_size) if val_set_size >= 1 else round(total * val_set_size)
    count = min(max(count, 1), total - 1)
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False)).astype(np.int64)


def build(cfg: Any, tokenizer: Any, sources: list[Source], directory: Path, *, shard_rows: int = SHARD_ROWS) -> None:
    """Tokenise every source into ``directory`` (train/ and, with val_set_size, eval/), atomically."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        stats = _tokenise(cfg, tokenizer, sources, staging, shard_rows=shard_rows)
        (staging / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        marker = staging / COMPLETE
        marker.write_text(directory.name + "\n", encoding="utf-8")
        with marker.open("rb") as handle:
            os.fsync(handle.fileno())
        if directory.exists() and not is_complete(directory):
            shutil.rmtree(directory)  # a leftover without its marker: never trusted
        try:
            os.rename(staging, directory)
        except OSError:
            if not is_complete(directory):  # another process won the race with a complete copy: keep theirs
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _tokenise(cfg: Any, tokenizer: Any, sources: list[Source], staging: Path, *, shard_rows: int) -> dict[str, Any]:
    sequence_len = int(cfg["sequence_len"])
    val_set_size = float(cfg.get("val_set_size") or 0)
    held_out = eval_rows(sum(count_rows(s) for s in sources) if val_set_size else 0, val_set_size,
                         int(cfg.get("seed") or 42))
    train = ShardWriter(staging / "train", shard_rows=shard_rows)
    evaluation = ShardWriter(staging / "eval", shard_rows=shard_rows) if len(held_out) else None
    dropped: Counter[str] = Counter()
    problems: list[str] = []
    rows = split_rows = split_chunks = 0
    per_dataset = []
    next_held = 0  # index into held_out: rows stream in order, so one pointer walks the sorted list
    for source in sources:
        fmt = make_formatter(source.entry, cfg, tokenizer)
        source_rows = 0
        for chunk in _chunks(iter_rows(source), TOKENISE_BATCH):
            for result in fmt.batch(chunk):
                row_number, global_row = source_rows, rows
                source_rows, rows = source_rows + 1, rows + 1
                is_eval = next_held < len(held_out) and held_out[next_held] == global_row
                next_held += is_eval
                if isinstance(result, RowError):
                    dropped["malformed"] += 1
                    if len(problems) < MAX_PROBLEMS:
                        problems.append(f"{source.label} row {row_number}: {result}")
                    continue
                if len(result) > 1:
                    split_rows, split_chunks = split_rows + 1, split_chunks + len(result)
                if any(len(example.input_ids) > sequence_len for example in result):
                    dropped["too_long"] += 1
                    continue
                examples = [example for example in result if example.trained_tokens]
                if not examples:
                    dropped["nothing_to_train"] += 1
                    continue
                writer = evaluation if is_eval and evaluation is not None else train
                for example in examples:
                    writer.add(example.input_ids, example.labels)
        per_dataset.append({"dataset": source.label, "type": source.entry.get("type"), "rows": source_rows})
    train_stats = train.close()
    eval_stats = evaluation.close() if evaluation is not None else None
    if not train_stats["examples"]:
        first = f" (first problem: {problems[0]})" if problems else ""
        raise DataError(f"no training examples: all {rows} rows were dropped{first}")
    return {
        "rows": rows, "dropped_rows": sum(dropped.values()), "dropped": dict(dropped), "problems": problems,
        "split_rows": split_rows, "split_chunks": split_chunks,
        "tokens": train_stats["tokens"] + (eval_stats["tokens"] if eval_stats else 0),
        "trained_tokens": train_stats["trained_tokens"] + (eval_stats["trained_tokens"] if eval_stats else 0),
        "train": train_stats, "eval": eval_stats, "datasets": per_dataset, "sequence_len": sequence_len,
    }
