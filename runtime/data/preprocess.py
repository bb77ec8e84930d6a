"""`preprocess CONFIG [--show N]`: tokenise into dataset_prepared_path (or reuse it), print a summary, and
optionally N examples with the trained tokens marked: green on a terminal, ``[[...]]`` otherwise. This is the
view that answers "why doesn't my loss go down": a wrong format or roles_to_train shows as the wrong text
being marked."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, TextIO

from ..config import ConfigFileError, load_run_config
from .errors import DataError

GREEN, RESET = "\033[32m", "\033[0m"
OPEN, CLOSE = "[[", "]]"


def run_preprocess(config_path: str | Path, show: int = 0, *, out: TextIO | None = None) -> int:
    """Exit status: 0, or 2 with a one-line message on stderr for a problem in the config or data."""
    out = out or sys.stdout
    try:
        cfg = load_run_config(config_path)
        from . import prepare_data
        from .tokenizer import load_tokenizer

        tokenizer, added = load_tokenizer(cfg)
        data = prepare_data(cfg, tokenizer)
    except (ConfigFileError, DataError) as exc:
        print(f"tunefile preprocess: {exc}", file=sys.stderr)
        return 2
    out.write(summary(data, cfg, added_tokens=added) + "\n")
    if show > 0:
        # Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org).
        colour = bool(getattr(out, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")
        for i in range(min(show, len(data.train))):
            example = data.train[i]
            out.write(f"\n--- example {i} ({len(example['input_ids'])} tokens, "
                      f"{int((example['labels'] != -100).sum())} trained) ---\n")
            out.write(render_example(tokenizer, example["input_ids"], example["labels"], colour=colour) + "\n")
    return 0


def summary(data: Any, cfg: Any, *, added_tokens: int = 0) -> str:
    from .batching import packing_efficiency, plan_batches

    stats = data.stats
    train, evaluation = stats["train"], stats.get("eval")
    dropped = stats.get("dropped") or {}
    reasons = ", ".join(f"{reason.replace('_', ' ')} {count:,}" for reason, count in sorted(dropped.items()))
    lines = [
        f"prepared data: {data.cache_dir} ({'reused' if stats.get('reused') else 'built'})",
        f"  rows: {stats['rows']:,} read from {len(stats['datasets'])} dataset(s)",
        f"  examples: {train['examples']:,} train" + (f", {evaluation['examples']:,} eval" if evaluation else ""),
        f"  tokens: {stats['tokens']:,} ({stats['trained_tokens']:,} trained, "
        f"{100 * stats['trained_tokens'] / max(stats['tokens'], 1):.1f}%); longest example {train['max_length']:,} "
        f"of sequence_len {stats['sequence_len']:,}",
        f"  dropped rows: {stats['dropped_rows']:,}" + (f" ({reasons})" if reasons else ""),
        f"  split rows: {stats['split_rows']:,}" + (f" (into {stats['split_chunks']:,} chunks of at most "
                                                    f"sequence_len tokens)" if stats["split_rows"] else ""),
    ]
    lines += [f"  problem: {problem}" for problem in stats.get("problems") or []]
    if added_tokens:
        lines.append(f"  tokens added to the tokenizer: {added_tokens} (the model's embeddings are resized)")
    if cfg.get("sample_packing"):
        sequence_len = int(cfg["sequence_len"])
        plan = plan_batches(data.train.lengths, micro_batch_size=int(cfg.get("micro_batch_size") or 1),
                            sequence_len=sequence_len, sample_packing=True, seed=int(cfg.get("seed") or 42), epoch=0)
        rows = sum(len(micro_batch) for micro_batch in plan)
        lines.append(f"  packing efficiency: {100 * packing_efficiency(data.train.lengths, plan, sequence_len):.1f}% "
                     f"({train['examples']:,} examples in {rows:,} rows of {sequence_len:,} tokens)")
    return "\n".join(lines)


def render_example(tokenizer: Any, input_ids: Any, labels: Any, *, colour: bool) -> str:
    """The example's text with trained spans marked; consecutive tokens of the same kind are decoded together
    so multi-byte characters stay whole."""
    ids, trained = [int(i) for i in input_ids], [int(label) != -100 for label in labels]
    parts: list[str] = []
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or trained[end] != trained[start]:
            text = tokenizer.decode(ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if trained[start]:
                text = f"{GREEN}{text}{RESET}" if colour else f"{OPEN}{text}{CLOSE}"
            parts.append(text)
            start = end
    return "".join(parts)
