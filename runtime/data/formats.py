"""Row formats → training examples: ``{"input_ids": [...], "labels": [...]}`` with -100 where no loss is taken.

Labels are aligned with input_ids (the Hugging Face convention: the model shifts them by one inside its loss).
Each format turns a row into a list of examples; most rows give one, a long ``completion`` text gives several
consecutive chunks. Length limits are applied by the caller (``build.py``), which counts what it drops.

``make_formatter`` is the registry of every type; the shared pieces (``Example``, ``Format``, ``RowError``, …)
live in ``examples.py`` and are re-exported here, and the chat_template format in ``chat.py``. Imports run one
way only: formats → chat → examples.
"""

from __future__ import annotations

from typing import Any

from ...schemas.run_plan import DataPlan, DatasetPlan
from .chat import ChatTemplateFormat
from .errors import DataError
from .examples import IGNORE, PROBE_TEXT, Encoded, Example, Format, RowError, batch_encoder

__all__ = ["IGNORE", "PROBE_TEXT", "AlpacaFormat", "ChatTemplateFormat", "CompletionFormat", "Encoded", "Example",
           "Format", "PretokenizedFormat", "RowError", "batch_encoder", "make_formatter"]

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def make_formatter(entry: DatasetPlan, data: DataPlan, tokenizer: Any) -> Format:
    """The format of one dataset; ``data`` supplies the run-wide options (sequence_len, train_on_inputs, the
    run's chat template)."""
    if entry.type == "alpaca":
        return AlpacaFormat(tokenizer, train_on_inputs=data.train_on_inputs)
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
                    "(alpaca, chat_template, completion, pretokenized)")


def _text(row: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise RowError(f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise RowError(f"field {key!r} is a {type(value).__name__}, not text")
    return value


class AlpacaFormat(Format):
    """Alpaca's prompt (with or without input), then the output and eos; the prompt is masked unless
    ``train_on_inputs``. Prompt and response are tokenised separately so the split is exact and matches
    inference, where the model continues the tokenised prompt."""

    def __init__(self, tokenizer: Any, *, train_on_inputs: bool) -> None:
        super().__init__(tokenizer)
        self.train_on_inputs = train_on_inputs
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def texts(self, row: dict[str, Any]) -> tuple[list[tuple[str, bool]], Any]:
        instruction, output = _text(row, "instruction"), _text(row, "output")
        extra = _text(row, "input", required=False)
        template = ALPACA_PROMPT_INPUT if extra.strip() else ALPACA_PROMPT_NO_INPUT
        return [(template.format(instruction=instruction, input=extra), True), (output, False)], None

    def assemble(self, encoded: list[Encoded], context: Any) -> list[Example]:
        prompt, response = list(encoded[0][0]), list(encoded[1][0]) + self.eos
        prompt_labels = list(prompt) if self.train_on_inputs else [IGNORE] * len(prompt)
        return [Example(prompt + response, prompt_labels + response)]


class CompletionFormat(Format):
    """Raw text, every token trained; a text longer than ``sequence_len`` becomes consecutive chunks of
    ``sequence_len`` tokens (the last one shorter), so nothing is silently dropped."""

    def __init__(self, tokenizer: Any, *, field: str, sequence_len: int) -> None:
        super().__init__(tokenizer)
        self.field, self.sequence_len = field, sequence_len
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def texts(self, row: dict[str, Any]) -> tuple[list[tuple[str, bool]], Any]:
        return [(_text(row, self.field), True)], None

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
