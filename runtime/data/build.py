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
import sys
import tempfile
from array import array
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from ...schemas.run_plan import DataPlan, DatasetPlan, plan_to_dict
from . import chat, dedup, examples, formats, instruction
from .cache import COMPLETE, SHARD_ROWS, ShardWriter, SourceFiles, TokenizedDataset
from .dedup import ExactDuplicates
from .errors import DataError
from .examples import Example, RowError, examples_to_keep, leading_padding_id
from .fast_tokenizer import EngineSelector
from .formats import Format, make_formatter
from .sources import RowPlace, Source, count_rows, fingerprint, iter_rows, located_rows, resolve_source
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
WORKER_BATCH = 2048  # rows per task of a worker process: large enough that passing them costs little
WORKER_TASKS_AHEAD = 2  # tasks queued per worker: workers never wait, and few rows sit in memory
ENGINE_SAMPLE_ROWS = 1000  # rows of each dataset whose ids tiktoken must reproduce before it is used


def _chunks(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    while chunk := list(islice(rows, size)):
        yield chunk


def available_cores() -> int:
    """The cores this process may run on (its affinity, which a SLURM allocation or taskset narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class KeepRules:
    """What ``examples_to_keep`` needs besides the examples."""

    pad_id: int | None
    sequence_len: int
    min_sample_len: int


@dataclass
class RowsDone:
    """What the format and the keep rules made of a batch of rows, in a compact form that crosses a process
    boundary cheaply: per row (malformed message or None, examples formatted, examples that lost leading
    padding, drop reason or None, examples kept), and the kept examples' tokens back to back (example k is
    ``bounds[k]:bounds[k + 1]``)."""

    outcomes: list[tuple[str | None, int, int, str | None, int]]
    ids: np.ndarray
    labels: np.ndarray
    bounds: np.ndarray


def format_rows(fmt: Format, rows: list[dict[str, Any]], rules: KeepRules) -> RowsDone:
    """Format, tokenise and apply the keep rules to ``rows``: everything about a row that does not depend on
    the rows before it (the held-out split and deduplication do, and stay with the caller)."""
    outcomes: list[tuple[str | None, int, int, str | None, int]] = []
    ids, labels, bounds = array("i"), array("i"), array("q", [0])
    for result in fmt.batch(rows):
        if isinstance(result, RowError):
            outcomes.append((str(result), 0, 0, None, 0))
            continue
        kept, reason, changed = examples_to_keep(result, pad_id=rules.pad_id, sequence_len=rules.sequence_len,
                                                 min_sample_len=rules.min_sample_len)
        for example in kept:
            ids.extend(example.input_ids)
            labels.extend(example.labels)
            bounds.append(len(ids))
        outcomes.append((None, len(result), changed, reason, len(kept)))
    return RowsDone(outcomes, np.frombuffer(ids, dtype=np.int32), np.frombuffer(labels, dtype=np.int32),
                    np.frombuffer(bounds, dtype=np.int64))


_worker_job: tuple[Format, KeepRules] | None = None  # set in each worker process by _start_worker


def _start_worker(fmt: Format, rules: KeepRules) -> None:
    global _worker_job  # noqa: PLW0603 - one job per worker process, handed over once at fork
    _worker_job = fmt, rules


def _work(rows: list[dict[str, Any]]) -> RowsDone:
    fmt, rules = _worker_job  # type: ignore[misc]
    return format_rows(fmt, rows, rules)


class RowRunner:
    """``format_rows`` over batches of rows, results in the rows' order: in this process, or spread over
    ``processes`` forked workers that inherit the format (nothing is pickled but rows and results). A bounded
    number of batches is in flight, so memory stays flat whatever the input's size."""

    def __init__(self, fmt: Format, rules: KeepRules, *, processes: int) -> None:
        self.fmt, self.rules, self.processes = fmt, rules, processes
        self.pool: Any = None
        if processes > 1:
            import multiprocessing

            # Hugging Face's tokenizers library warns in every forked child once its own threads have run in
            # the parent; the workers tokenise with tiktoken, so say it is settled while they are forked.
            before = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            try:
                self.pool = multiprocessing.get_context("fork").Pool(processes, _start_worker, (fmt, rules))
            finally:
                if before is None:
                    del os.environ["TOKENIZERS_PARALLELISM"]
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = before

    def run(self, rows: Iterator[dict[str, Any]]) -> Iterator[RowsDone]:
        if self.pool is None:
            for chunk in _chunks(rows, TOKENISE_BATCH):
                yield format_rows(self.fmt, chunk, self.rules)
            return
        pending: deque[Any] = deque()
        for chunk in _chunks(rows, WORKER_BATCH):
            pending.append(self.pool.apply_async(_work, (chunk,)))
            if len(pending) >= self.processes * WORKER_TASKS_AHEAD:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def row_runner(fmt: Format, source: Source, rules: KeepRules, engines: EngineSelector, *,
               processes: int | None) -> tuple[RowRunner, dict[str, Any]]:
    """The runner for one dataset, and the engine decision for its stats: tiktoken across every core when it
    reproduces the tokenizer's ids on the dataset's first rows; otherwise the Hugging Face tokenizer in this
    process, as before (its Rust code already uses every core, and cannot run in forked processes).
    By default workers are forked only from a process that has not imported torch (`tunefile preprocess`): a
    training process has torch's threads, and a distributed one its process group, which a fork copies."""
    choice = engines.choose(fmt, islice(iter_rows(source), ENGINE_SAMPLE_ROWS), label=source.label)
    if processes is None:
        processes = available_cores() if "torch" not in sys.modules else 1
    workers = processes if choice.engine == "tiktoken" else 1
    return RowRunner(fmt, rules, processes=workers), choice.record()


def _rows_noting_places(part: Source, places: deque[RowPlace]) -> Iterator[dict[str, Any]]:
    for place, row in located_rows(part):
        places.append(place)
        yield row


def _where(label: str, place: RowPlace) -> str:
    """``data/x.jsonl:12`` (a line, counted from 1 like every line and row shown); a Hub row with its dataset."""
    return str(place) if place.path is not None else f"{label} {place}"


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
          shard_rows: int = SHARD_ROWS, processes: int | None = None) -> None:
    """Tokenise every source into ``directory`` (train/ and, with val_set_size, eval/), atomically.
    ``processes``: worker processes where tiktoken tokenises (None: every available core); the output is
    the same bytes whatever the number."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        stats, _, _ = _tokenise(data, tokenizer, sources, staging, seed=seed, shard_rows=shard_rows,
                                processes=processes)
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
                    shard_rows: int = SHARD_ROWS, processes: int | None = None,
                    ) -> tuple[dict[str, Any], TokenizedDataset, TokenizedDataset | None]:
    """(stats, train, eval or None): the same tokenisation as ``build``, held in memory; nothing is written."""
    stats, train, evaluation = _tokenise(data, tokenizer, sources, None, seed=seed, shard_rows=shard_rows,
                                         processes=processes)
    return (stats, TokenizedDataset.from_writer(train),
            TokenizedDataset.from_writer(evaluation) if evaluation is not None else None)


def _tokenise(data: DataPlan, tokenizer: Any, sources: list[Source], staging: Path | None, *, seed: int,
              shard_rows: int, processes: int | None) -> tuple[dict[str, Any], ShardWriter, ShardWriter | None]:
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
    rules = KeepRules(pad_id=pad_id, sequence_len=sequence_len, min_sample_len=data.min_sample_len)
    engines = EngineSelector(tokenizer)
    for number, source in enumerate(sources):
        fmt = make_formatter(source.entry, data, tokenizer)
        runner, engine = row_runner(fmt, source, rules, engines, processes=processes)
        source_rows = 0
        files: SourceFiles = []
        try:
            for label, part in source.parts():
                first_row = source_rows
                # Each row's place (file and line) waits here while the row is tokenised, in the rows' order,
                # so that a dropped row is named as a JSON error is; the runner bounds how many rows are ahead.
                places: deque[RowPlace] = deque()
                for done in runner.run(_rows_noting_places(part, places)):
                    next_example = 0  # the first kept example of this row in the batch
                    for error, formatted, changed, reason, kept_count in done.outcomes:
                        row_number, global_row, place = source_rows, rows, places.popleft()
                        source_rows, rows = source_rows + 1, rows + 1
                        is_eval = next_held < len(held_out) and held_out[next_held] == global_row
                        next_held += is_eval
                        if error is not None:
                            dropped["malformed"] += 1
                            if len(problems) < MAX_PROBLEMS:
                                problems.append(f"{_where(label, place)}: {error}")
                            continue
                        if formatted > 1:
                            split_rows, split_chunks = split_rows + 1, split_chunks + formatted
                        padding_stripped += changed
                        bounds = done.bounds[next_example:next_example + kept_count + 1].tolist()
                        next_example += kept_count
                        kept = [Example(done.ids[start:end], done.labels[start:end])
                                for start, end in zip(bounds, bounds[1:], strict=False)]
                        if reason is None and duplicates is not None:  # after the length rule, as in Axolotl
                            unique = [example for example in kept if not duplicates.is_repeat(example)]
                            repeats += len(kept) - len(unique)
                            kept, reason = unique, (None if unique else "duplicate")
                        if reason is not None:
                            dropped[reason] += 1
                            continue
                        writer = evaluation if is_eval and evaluation is not None else train
                        for kept_example in kept:
                            writer.add(kept_example.input_ids, kept_example.labels, source=number, row=row_number)
                files.append((label, source_rows - first_row))
        finally:
            runner.close()
        files_of_sources.append(files)
        per_dataset.append({"dataset": source.label, "type": source.entry.type, "rows": source_rows,
                            "tokenizer_engine": engine})
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
