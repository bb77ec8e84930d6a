"""`preprocess CONFIG [--show N]`: tokenise into the plan's prepared_path (or reuse it), print a summary, and
optionally N examples with the trained tokens marked: green on a terminal, ``[[...]]`` otherwise. This is the
view that answers "why doesn't my loss go down": a wrong format or roles_to_train shows as the wrong text
being marked.

With ``skip_prepare`` training keeps nothing on disk, so neither does this: the data is tokenised in memory,
summarised and shown, which still checks the formats before a job waits in a queue. With ``streaming`` there is
nothing to prepare at all: it says so and, with --show, prints the first rows training would read."""

from __future__ import annotations

import os
import sys
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Any, TextIO

from ...schemas.run_plan import DataPlan, RunPlan
from ..config import load_run_plan

GREEN, RESET = "\033[32m", "\033[0m"
OPEN, CLOSE = "[[", "]]"


def run_preprocess(config_path: str | Path, *, show: int = 0, out: TextIO | None = None) -> int:
    """Prepare the plan's data and print the summary to ``out`` (stdout by default); exit status 0.

    A problem the user fixes (the plan, a dataset, the tokenizer) raises a ``RuntimeUserError`` subclass
    (ConfigFileError, DataError) for the caller to report in one line."""
    from . import prepare_data
    from .tokenizer import load_tokenizer

    if out is None:
        out = sys.stdout
    plan = load_run_plan(config_path)
    tokenizer, added = load_tokenizer(plan.model, offline=plan.offline)
    if plan.data.streaming:
        return _show_stream(plan, tokenizer, show=show, out=out)
    data = prepare_data(plan.data, tokenizer, seed=plan.seed, offline=plan.offline)
    out.write(summary(data, plan.data, seed=plan.seed, added_tokens=added) + "\n")
    if show > 0:
        # Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org).
        colour = bool(getattr(out, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")
        for i in range(min(show, len(data.train))):
            example = data.train[i]
            label, row = data.train.origin(i)
            out.write(f"\n--- example {i + 1} ({len(example['input_ids'])} tokens, "
                      f"{int((example['labels'] != -100).sum())} trained; from {label} row {row + 1}) ---\n")
            out.write(render_example(tokenizer, example["input_ids"], example["labels"], colour=colour) + "\n")
    return 0


def summary(data: Any, plan: DataPlan, *, seed: int, added_tokens: int = 0) -> str:
    """The prepared data in a few lines; with packing, how full the first epoch's rows are (``seed`` orders
    it as training will)."""
    stats = data.stats
    train, evaluation = stats["train"], stats["eval"]
    reasons = ", ".join(f"{reason.replace('_', ' ')} {count:,}" for reason, count in sorted(stats["dropped"].items()))
    where = f"{data.cache_dir} ({'reused' if stats['reused'] else 'built'})" if data.cache_dir is not None else \
        f"in memory only (skip_prepare: nothing is written to {plan.prepared_path}; training tokenises again)"
    lines = [
        f"prepared data: {where}",
        f"  rows: {stats['rows']:,} read from {len(stats['datasets'])} dataset(s)",
        f"  examples: {train['examples']:,} train" + (f", {evaluation['examples']:,} eval" if evaluation else ""),
        f"  tokens: {stats['tokens']:,} ({stats['trained_tokens']:,} trained, "
        f"{100 * stats['trained_tokens'] / max(stats['tokens'], 1):.1f}%); longest example {train['max_length']:,} "
        f"of sequence_len {stats['sequence_len']:,}",
        f"  dropped rows: {stats['dropped_rows']:,}" + (f" ({reasons})" if reasons else ""),
        f"  split rows: {stats['split_rows']:,}" + (f" (into {stats['split_chunks']:,} chunks of at most "
                                                    f"sequence_len tokens)" if stats["split_rows"] else ""),
    ]
    lines += engine_lines(stats["datasets"])
    if stats["leading_padding_stripped"]:
        lines.append(f"  leading padding stripped: {stats['leading_padding_stripped']:,} examples started with the "
                     "pad token (a sample that starts with padding makes non-finite gradients)")
    lines += [f"  problem: {problem}" for problem in stats["problems"]]
    if added_tokens:
        lines.append(f"  tokens added to the tokenizer: {added_tokens} (the model's embeddings are resized)")
    if plan.packing_attention is not None:
        from .batching import packing_efficiency, plan_batches  # here: batching imports torch, for its tensors

        batches = plan_batches(data.train.lengths, micro_batch_size=plan.micro_batch_size,
                               sequence_len=plan.sequence_len, sample_packing=True, seed=seed, epoch=0)
        rows = sum(len(micro_batch) for micro_batch in batches)
        efficiency = packing_efficiency(data.train.lengths, batches, plan.sequence_len)
        lines.append(f"  packing efficiency: {100 * efficiency:.1f}% ({train['examples']:,} examples in {rows:,} "
                     f"rows of {plan.sequence_len:,} tokens)")
    return "\n".join(lines)


def engine_lines(datasets: list[dict[str, Any]]) -> list[str]:
    """Which engine tokenised each dataset, and why not tiktoken where it did not (fast_tokenizer.py). A cache
    built before the engine was recorded says nothing."""
    lines = []
    for entry in datasets:
        engine = entry.get("tokenizer_engine")  # absent from caches built before it was recorded
        if engine is None:
            continue
        if engine["engine"] == "tiktoken":
            lines.append(f"  tokenised with tiktoken: {entry['dataset']} (the same ids as the tokenizer on "
                         f"{engine['checked_texts']:,} checked texts)")
        else:
            lines.append(f"  tokenised with the Hugging Face tokenizer: {entry['dataset']} ({engine['reason']})")
    return lines


def _show_stream(plan: RunPlan, tokenizer: Any, *, show: int, out: TextIO) -> int:
    """Streaming: nothing to prepare; with ``show``, the first rows rank 0 would train on."""
    from itertools import islice

    import numpy as np

    from .streaming import open_stream

    data = plan.data
    rows = f"packed into rows of at most {data.sequence_len:,} tokens" if data.packing_attention is not None else \
        "one example per row"
    made = f"formatted, tokenised and {rows}" if any(d.type != "completion" for d in data.datasets) else \
        f"tokenised and packed into rows of {data.sequence_len:,} tokens"
    out.write(f"streaming: nothing to prepare; the {len(data.datasets)} source(s) are read, {made} as training "
              f"goes (no cache, no evaluation split, {plan.schedule.max_steps:,} steps)\n")
    if show > 0:
        stream = open_stream(data, tokenizer, seed=plan.seed, offline=plan.offline)
        colour = bool(getattr(out, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")
        for i, (pieces, _) in enumerate(islice(stream.rows(), show)):
            ids = np.concatenate([piece.ids for piece in pieces])
            labels = np.concatenate([piece.trained_labels for piece in pieces])
            origins = "; ".join(f"{label} row {row + 1}" for label, row in  # rows and lines count from 1
                                (stream.files.file_row(piece.source, piece.row) for piece in pieces))
            trained = int((labels != -100).sum())
            out.write(f"\n--- row {i + 1} ({len(ids)} tokens, {'all' if trained == len(ids) else trained} trained; "
                      f"from {origins}) ---\n")
            out.write(render_example(tokenizer, ids, labels, colour=colour) + "\n")
    return 0


def render_example(tokenizer: Any, input_ids: Any, labels: Any, *, colour: bool) -> str:
    """The example's text with trained spans marked; consecutive tokens of the same kind are decoded together
    so multi-byte characters stay whole."""
    tokens = [(int(token), int(label) != -100) for token, label in zip(input_ids, labels, strict=True)]
    parts: list[str] = []
    for trained, run in groupby(tokens, key=itemgetter(1)):
        text = tokenizer.decode([token for token, _ in run], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        if trained:
            text = f"{GREEN}{text}{RESET}" if colour else f"{OPEN}{text}{CLOSE}"
        parts.append(text)
    return "".join(parts)
