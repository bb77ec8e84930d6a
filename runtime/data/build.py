"""Build the prepared-data cache: the key over everything that changes tokens, and the streaming build.

The folder is ``<data.prepared_path>/<key>``. It is built under a temporary name and renamed into place
after its ``COMPLETE`` file is written, so a reader sees either nothing or a whole cache, even when a build is
killed or two processes race (the loser's copy is discarded). With ``skip_prepare`` the same tokenisation runs
into memory (``build_in_memory``) and nothing is written.
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

from ...schemas.run_plan import DataPlan, DatasetPlan, plan_to_dict
from . import chat, dedup, examples, formats, instruction
from .cache import COMPLETE, SHARD_ROWS, ShardWriter, SourceFiles, TokenizedDataset
from .dedup import ExactDuplicates
from .errors import DataError
from .examples import RowError, examples_to_keep, leading_padding_id
from .formats import make_formatter
from .sources import Source, count_rows, fingerprint, iter_rows, resolve_source
from .tokenizer import is_offline, tokenizer_fingerprint

log = logging.getLogger(__name__)
# 2: every example records its dataset and row (origins); leading padding is stripped.
CACHE_VERSION = 2
# Run-wide options that change tokens or the split; dataset entries are hashed whole. The tokenizer (with the
# plan's special_tokens and tokens already added) is hashed by tokenizer_fingerprint.
TOKEN_OPTIONS = ("sequence_len", "train_on_inputs", "val_set_size", "chat_template", "chat_template_jinja",
                 "chat_template_kwargs", "eot_tokens", "exact_deduplication", "min_sample_len")
# The modules that turn rows into tokens and pick the examples kept: a change to any of them invalidates old caches.
TOKENISING_CODE = (examples, formats, chat, instruction, dedup)
MAX_PROBLEMS = 5
TOKENISE_BATCH = 512  # rows tokenised per call: enough to keep every core busy, little memory


def _chunks(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    while chunk := list(islice(rows, size)):
        yield chunk


def resolve_sources(datasets: tuple[DatasetPlan, ...], *, offline: bool) -> list[Source]:
    if not datasets:
        raise DataError("no datasets: the run plan's data.datasets is empty")
    offline = is_offline(offline)
    return [resolve_source(entry, offline=offline) for entry in datasets]


def cache_key(data: DataPlan, tokenizer: Any, sources: list[Source], *, seed: int) -> str:
    """sha256 over: the data (local file bytes, Hub coordinates), each dataset entry, the run options that
    change tokens or the split (``seed`` picks the eval rows), the tokenizer (its full serialisation, special
    tokens, chat template) and the code that turns rows into tokens (so a fix to a format invalidates old
    caches)."""
    code = hashlib.sha256()
    for module in TOKENISING_CODE:
        # Through the module's loader, not open(__file__): inside the bundle's runtime archive (zipimport)
        # __file__ names a member of the zip, not a file. The bytes, and so the key, are the same either way.
        code.update(module.__spec__.loader.get_data(module.__file__))
    material = {
        "version": CACHE_VERSION,
        "datasets": [{"entry": plan_to_dict(source.entry), "data": fingerprint(source)} for source in sources],
        "options": {**{key: getattr(data, key) for key in TOKEN_OPTIONS}, "seed": seed},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "code": code.hexdigest(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE).is_file()


def eval_rows(total: int, val_set_size: float, seed: int) -> np.ndarray:
    """Sorted global row numbers held out for evaluation: a fraction (< 1) or a count (>= 1) of the rows,
    chosen by ``seed`` alone so every process and every rebuild picks the same ones."""
    if not (val_set_size > 0 and total >= 2):
        return np.zeros(0, dtype=np.int64)
    count = int(val_set_size) if val_set_size >= 1 else round(total * val_set_size)
    count = min(max(count, 1), total - 1)
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False)).astype(np.int64)


def build(data: DataPlan, tokenizer: Any, sources: list[Source], directory: Path, *, seed: int,
          shard_rows: int = SHARD_ROWS) -> None:
    """Tokenise every source into ``directory`` (train/ and, with val_set_size, eval/), atomically."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        stats, _, _ = _tokenise(data, tokenizer, sources, staging, seed=seed, shard_rows=shard_rows)
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


def build_in_memory(data: DataPlan, tokenizer: Any, sources: list[Source], *, seed: int,
                    shard_rows: int = SHARD_ROWS) -> tuple[dict[str, Any], TokenizedDataset, TokenizedDataset | None]:
    """(stats, train, eval or None): the same tokenisation as ``build``, held in memory; nothing is written."""
    stats, train, evaluation = _tokenise(data, tokenizer, sources, None, seed=seed, shard_rows=shard_rows)
    return (stats, TokenizedDataset.from_writer(train),
            TokenizedDataset.from_writer(evaluation) if evaluation is not None else None)


def _tokenise(data: DataPlan, tokenizer: Any, sources: list[Source], staging: Path | None, *, seed: int,
              shard_rows: int) -> tuple[dict[str, Any], ShardWriter, ShardWriter | None]:
    """(stats, train writer, eval writer or None), closed; ``staging`` None keeps the shards in memory."""
    sequence_len = data.sequence_len
    total_rows = sum(count_rows(s) for s in sources) if data.val_set_size > 0 else 0
    held_out = eval_rows(total_rows, data.val_set_size, seed)
    train = ShardWriter(None if staging is None else staging / "train", shard_rows=shard_rows)
    evaluation = ShardWriter(None if staging is None else staging / "eval", shard_rows=shard_rows) \
        if len(held_out) else None
    pad_id = leading_padding_id(tokenizer)
    # One record of what was seen across every dataset and both splits: the held-out rows are picked by row
    # number from the seed alone, so keeping only each example's first occurrence, wherever it falls, leaves
    # what deduplicating before the split leaves: no repeat within train or eval, and no eval example that is
    # also a training example (Axolotl deduplicates the merged rows once, before its split).
    duplicates = ExactDuplicates() if data.exact_deduplication else None
    dropped: Counter[str] = Counter()
    problems: list[str] = []
    rows = split_rows = split_chunks = padding_stripped = repeats = 0
    per_dataset = []
    files_of_sources: list[SourceFiles] = []  # per dataset: (file label, rows) for provenance
    next_held = 0  # index into held_out: rows stream in order, so one pointer walks the sorted list
    for number, source in enumerate(sources):
        fmt = make_formatter(source.entry, data, tokenizer)
        source_rows = 0
        files: SourceFiles = []
        for label, part in source.parts():
            first_row = source_rows
            for chunk in _chunks(iter_rows(part), TOKENISE_BATCH):
                for result in fmt.batch(chunk):
                    row_number, global_row = source_rows, rows
                    source_rows, rows = source_rows + 1, rows + 1
                    is_eval = next_held < len(held_out) and held_out[next_held] == global_row
                    next_held += is_eval
                    if isinstance(result, RowError):
                        dropped["malformed"] += 1
                        if len(problems) < MAX_PROBLEMS:
                            problems.append(f"{label} row {row_number - first_row}: {result}")
                        continue
                    if len(result) > 1:
                        split_rows, split_chunks = split_rows + 1, split_chunks + len(result)
                    kept, reason, changed = examples_to_keep(result, pad_id=pad_id, sequence_len=sequence_len,
                                                             min_sample_len=data.min_sample_len)
                    padding_stripped += changed
                    if reason is None and duplicates is not None:  # after the length rule, as in Axolotl
                        unique = [example for example in kept if not duplicates.is_repeat(example)]
                        repeats += len(kept) - len(unique)
                        kept, reason = unique, (None if unique else "duplicate")
                    if reason is not None:
                        dropped[reason] += 1
                        continue
                    writer = evaluation if is_eval and evaluation is not None else train
                    for example in kept:
                        writer.add(example.input_ids, example.labels, source=number, row=row_number)
            files.append((label, source_rows - first_row))
        files_of_sources.append(files)
        per_dataset.append({"dataset": source.label, "type": source.entry.type, "rows": source_rows})
    if padding_stripped:
        log.info("stripped leading padding (token id %d) from %d example(s): a sample that starts with a pad "
                 "token makes non-finite gradients", pad_id, padding_stripped)
    if duplicates is not None:
        log.info("exact deduplication: dropped %d example(s) that repeat an earlier one exactly (%d row(s) "
                 "dropped whole)", repeats, dropped["duplicate"])
    train_stats = train.close(files_of_sources)
    eval_stats = evaluation.close(files_of_sources) if evaluation is not None else None
    if not train_stats["examples"]:
        first = f" (first problem: {problems[0]})" if problems else ""
        raise DataError(f"no training examples: all {rows} rows were dropped{first}")
    stats = {
        "rows": rows, "dropped_rows": sum(dropped.values()), "dropped": dict(dropped), "problems": problems,
        "split_rows": split_rows, "split_chunks": split_chunks, "leading_padding_stripped": padding_stripped,
        "duplicate_examples": repeats,
        "tokens": train_stats["tokens"] + (eval_stats["tokens"] if eval_stats else 0),
        "trained_tokens": train_stats["trained_tokens"] + (eval_stats["trained_tokens"] if eval_stats else 0),
        "train": train_stats, "eval": eval_stats, "datasets": per_dataset, "sequence_len": sequence_len,
    }
    return stats, train, evaluation
