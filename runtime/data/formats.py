"""Row formats → training examples: ``{"input_ids": [...], "labels": [...]}`` with -100 where no loss is taken.

Labels are aligned with input_ids (the Hugging Face convention: the model shifts them by one inside its loss).
Each format turns a row into a list of examples; most rows give one, a long ``completion`` text gives several
consecutive chunks. Length limits are applied by the caller (``build.py``), which counts what it drops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

IGNORE = -100

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


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


class RowError(Exception):
    """This row cannot be formatted (a missing field, a wrong type); it is skipped and counted."""


Encoded = tuple[list[int], list[tuple[int, int]]]  # token ids and each token's character span
PROBE_TEXT = "Hello, world!  12 + 30 = 42\n\tnaïve café 🙂 <|im_start|>user\n</s><s>"


class Format:
    """Rows → examples. A format says which texts a row needs tokenised (``texts``) and how the tokens make
    examples (``assemble``); ``batch`` tokenises the texts of many rows in one call, which the Rust tokenizer
    spreads over every core. ``format(row)`` does one row (raises ``RowError``)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.encode_many = batch_encoder(tokenizer)

    def texts(self, row: dict[str, Any]) -> tuple[list[tuple[str, bool]], Any]:
        """((text, add the tokenizer's special tokens?) for each text to tokenise, context for assemble)."""
        raise NotImplementedError

    def assemble(self, encoded: list[Encoded], context: Any) -> list[Example]:
        raise NotImplementedError

    def batch(self, rows: list[dict[str, Any]]) -> list[list[Example] | RowError]:
        plans: list[tuple[list[tuple[str, bool]], Any] | RowError] = []
        for row in rows:
            try:
                plans.append(self.texts(row))
            except RowError as exc:
                plans.append(exc)
        encoded: dict[tuple[int, int], Encoded] = {}
        for special in (False, True):
            where = [(r, t) for r, plan in enumerate(plans) if not isinstance(plan, RowError)
                     for t, (_, wants) in enumerate(plan[0]) if wants is special]
            texts = [plans[r][0][t][0] for r, t in where]  # type: ignore[index]
            encoded.update(zip(where, self.encode_many(texts, special) if texts else [], strict=True))
        results: list[list[Example] | RowError] = []
        for r, plan in enumerate(plans):
            if isinstance(plan, RowError):
                results.append(plan)
                continue
            try:
                results.append(self.assemble([encoded[(r, t)] for t in range(len(plan[0]))], plan[1]))
            except RowError as exc:
                results.append(exc)
        return results

    def __call__(self, row: dict[str, Any]) -> list[Example]:
        result = self.batch([row])[0]
        if isinstance(result, RowError):
            raise result
        return result


def make_formatter(entry: dict[str, Any], cfg: Any, tokenizer: Any) -> Format:
    """The format of one `datasets:` entry; ``cfg`` supplies run-wide options (sequence_len, templates)."""
    kind = entry.get("type")
    if kind == "alpaca":
        return AlpacaFormat(tokenizer, train_on_inputs=bool(cfg.get("train_on_inputs")))
    if kind == "completion":
        return CompletionFormat(tokenizer, field=entry.get("field") or "text", sequence_len=int(cfg["sequence_len"]))
    if kind == "pretokenized":
        return PretokenizedFormat(tokenizer)
    if kind == "chat_template":
        from .chat import ChatTemplateFormat

        return ChatTemplateFormat(entry, cfg, tokenizer)
    from .errors import DataError

    raise DataError(f"dataset {entry.get('path')}: unknown type {kind!r} "
                    "(alpaca, chat_template, completion, pretokenized)")


def batch_encoder(tokenizer: Any) -> Callable[[list[str], bool], list[Encoded]]:
    """``encode_many(texts, special)``: ids and offsets of each text; ``special`` adds what the tokenizer adds
    around a sequence (e.g. bos). Calls the Rust tokenizer directly (several times faster than the transformers
    wrapper, and parallel) when a probe text shows both give the same tokens, else goes through the wrapper."""

    def wrapped(texts: list[str], special: bool) -> list[Encoded]:
        encoding = tokenizer(texts, add_special_tokens=special, return_offsets_mapping=True)
        return [(list(ids), [tuple(pair) for pair in offsets])
                for ids, offsets in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)]

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return wrapped

    def direct(texts: list[str], special: bool) -> list[Encoded]:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=special)]

    same = all(direct([PROBE_TEXT], special) == wrapped([PROBE_TEXT], special) for special in (True, False))
    return direct if same else wrapped


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
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) for i in ids):
            raise RowError("input_ids is not a list of integers")
        if labels is None:
            labels = ids
        if not isinstance(labels, (list, tuple)) or len(labels) != len(ids):
            raise RowError(f"labels has {len(labels) if isinstance(labels, (list, tuple)) else 'no'} entries, "
                           f"input_ids {len(ids)}")
        return [], Example([int(i) for i in ids], [int(label) for label in labels])

    def assemble(self, encoded: list[Encoded], context: Any) -> list[Example]:
        return [context]
