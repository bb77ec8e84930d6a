"""What every row format shares: the example it produces, the row error it raises, the ``Format`` base class
that tokenises many rows per call, and the rules applied to every row's examples before they are stored or
streamed (``examples_to_keep``: leading padding stripped; rows too long, or with nothing to train, dropped).

``formats.py`` (completion, pretokenized and the registry), ``instruction.py`` (alpaca and its variants,
jeopardy) and ``chat.py`` (chat_template) build on this module and none imports another's internals, so there is
no import cycle between them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

IGNORE = -100

Encoded = tuple[list[int], list[tuple[int, int]]]  # token ids and each token's character span
PROBE_TEXT = "Hello, world!  12 + 30 = 42\n\tnaïve café 🙂 <|im_start|>user\n</s><s>"


@dataclass(frozen=True)
class Example:
    """One training example: token ids and aligned labels (-100 = no loss; the model shifts them itself)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


class RowError(Exception):
    """This row cannot be formatted (a missing field, a wrong type); it is skipped and counted."""


def text_field(row: dict[str, Any], key: str, *, required: bool = True) -> str:
    """The text in ``row[key]``; a missing (or null) value is "" unless ``required``, anything but text is a
    malformed row."""
    value = row.get(key)
    if value is None:
        if required:
            raise RowError(f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise RowError(f"field {key!r} is a {type(value).__name__}, not text")
    return value


def leading_padding_id(tokenizer: Any) -> int | None:
    """The token id that is padding when it starts an example: the tokenizer's pad id, unless it has none or
    its pad token is its bos token (then a leading "pad" is a real, trained beginning of sequence)."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        return None
    return None if pad_id == getattr(tokenizer, "bos_token_id", None) else int(pad_id)


def strip_leading_padding(example: Example, pad_id: int | None) -> Example:
    """``example`` without the pad tokens it starts with (ids and labels together); itself when there are none.

    Why: a pad token's input-embedding row is often exactly zero (``padding_idx`` keeps it so). At the first
    position of a sample, attention sees only that position and MLP(0) = 0, so the hidden state stays exactly
    zero through every layer; RMSNorm's backward at zero scales the gradient by 1/sqrt(eps) (1000 for 1e-6) in
    each layer, the activation gradient overflows to inf after ~16 layers, and inf × 0 gives NaN weight
    gradients. Left-padded exports start every example so; random ids do 1 time in a vocabulary's size. Pad
    tokens inside an example see the tokens before them and are harmless, so only leading ones go."""
    if pad_id is None:
        return example
    start = 0
    while start < len(example.input_ids) and example.input_ids[start] == pad_id:
        start += 1
    if start == 0:
        return example
    return Example(example.input_ids[start:], example.labels[start:])


def examples_to_keep(result: list[Example], *, pad_id: int | None, sequence_len: int,
                     min_sample_len: int) -> tuple[list[Example], str | None, int]:
    """(the row's examples to store, why the whole row is dropped or None, how many examples lost leading
    padding). Examples shorter than ``min_sample_len`` tokens are left out, as Axolotl drops them."""
    # Leading pad tokens are padding, not content, and a sample must never start with one: a pad token's
    # embedding row is often exactly zero, which keeps that position's hidden state zero through every layer
    # and turns RMSNorm's backward into NaN gradients (strip_leading_padding says how). Stripped before any
    # length or training check; a row left with nothing but padding is dropped and counted.
    stripped = [strip_leading_padding(example, pad_id) for example in result]
    changed = sum(1 for before, after in zip(result, stripped, strict=True) if after is not before)
    if changed and not any(example.input_ids for example in stripped):
        return [], "only_padding", changed
    if any(len(example.input_ids) > sequence_len for example in stripped):
        return [], "too_long", changed
    long_enough = [example for example in stripped if len(example.input_ids) >= min_sample_len]
    if not long_enough:
        return [], "too_short", changed
    kept = [example for example in long_enough if example.trained_tokens]
    return kept, (None if kept else "nothing_to_train"), changed


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
