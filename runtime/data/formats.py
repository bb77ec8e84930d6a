"""Row formats → training examples: ``{"input_ids": [...], "labels": [...]}`` with -100 where no loss is taken.

Labels are aligned with input_ids (the Hugging Face convention: the model shifts them by one inside its loss).
Each format turns a row into a list of examples; most rows give one, a long ``completion`` text gives several
consecutive chunks. Length limits are applied by the caller (``build.py``), which counts what it drops.

``make_formatter`` is the registry of every type; the shared pieces (``Example``, ``Format``, ``RowError``, …)
live in ``examples.py`` and are re-exported here, the instruction types (alpaca and its variants, jeopardy) in
``instruction.py`` and the chat_template format in ``chat.py``. Imports run one way only: formats → chat,
instruction → examples.
"""

from __future__ import annotations

from typing import Any

from ...schemas.run_plan import DataPlan, DatasetPlan
from .chat import ChatTemplateFormat
from .errors import DataError
from .examples import IGNORE, PROBE_TEXT, Encoded, Example, Format, RowError, batch_encoder, text_field
from .instruction import STYLES, AlpacaFormat

__all__ = ["IGNORE", "PROBE_TEXT", "AlpacaFormat", "ChatTemplateFormat", "CompletionFormat", "Encoded", "Example",
           "Format", "PretokenizedFormat", "RowError", "batch_encoder", "make_formatter"]


def make_formatter(entry: DatasetPlan, data: DataPlan, tokenizer: Any) -> Format:
    """The format of one dataset; ``data`` supplies the run-wide options (sequence_len, train_on_inputs, the
    run's chat template)."""
    if entry.type in STYLES:  # alpaca, alpaca:chat, alpaca:phi, jeopardy
        return AlpacaFormat(tokenizer, train_on_inputs=data.train_on_inputs, style=STYLES[entry.type])
    if entry.type == "completion":
        if entry.field is None:
            raise DataError(f"dataset {entry.path}: field is not set; a completion dataset needs it "
                            "(the compiler writes it; recompile the config)")
        return CompletionFormat(tokenizer, field=entry.field, sequence_len=data.sequence_len)
    if entry.type == "pretokenized":
        return PretokenizedFormat(tokenizer)
    if entry.type == "chat_template":
        return ChatTemplateFormat(entry, data, tokenizer)
    raise DataError(f"dataset {entry.path}: unknown type {entry.type!r} "
                    f"({', '.join([*STYLES, 'chat_template', 'completion', 'pretokenized'])})")


class CompletionFormat(Format):
    """Raw text, every token trained; a text longer than ``sequence_len`` becomes consecutive chunks of
    ``sequence_len`` tokens (the last one shorter), so nothing is silently dropped."""

    def __init__(self, tokenizer: Any, *, field: str, sequence_len: int) -> None:
        super().__init__(tokenizer)
        self.field, self.sequence_len = field, sequence_len
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def texts(self, row: dict[str, Any]) -> tuple[list[tuple[str, bool]], Any]:
        return [(text_field(row, self.field), True)], None

    def assemble(self, encoded: list[Encoded], context: Any) -> list[Example]:
        ids, n = list(encoded[0][0]) + self.eos, self.sequence_len
        return [Example(ids[i:i + n], ids[i:i + n]) for i in range(0, len(ids), n)]


class PretokenizedFormat(Format):
    """Rows that already hold ``input_ids`` (and optionally ``labels``; default: train on every token)."""

    def texts(self, row: dict[str, Any]) -> tuple[list[tuple[str, bool]], Any]:
        ids, labels = row.get("input_ids"), row.get("labels")
        if not (isinstance(ids, (list, tuple)) and all(isinstance(i, int) for i in ids)):
            raise RowError("input_ids is not a list of integers")
        if labels is None:
            labels = ids
        if not (isinstance(labels, (list, tuple)) and len(labels) == len(ids)):
            raise RowError(f"labels has {len(labels) if isinstance(labels, (list, tuple)) else 'no'} entries, "
                           f"input_ids {len(ids)}")
        return [], Example([int(i) for i in ids], [int(label) for label in labels])

    def assemble(self, encoded: list[Encoded], context: Any) -> list[Example]:
        return [context]
