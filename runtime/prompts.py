"""Prompts for inference, built by the same code that built the training examples, so the model sees at
inference exactly the token sequence it was trained to continue.

The format is that of the run plan's first dataset (``data.datasets[0]``; a compiled plan always has one):
- alpaca, alpaca:chat, alpaca:phi, jeopardy: the type's instruction prompt (instruction.AlpacaFormat with the
  type's style) around the message as the instruction (jeopardy: the question), tokenised with the tokenizer's
  special tokens, as in training;
- chat_template: the conversation so far plus the user's message, rendered with the template training
  resolved (chat.dataset_chat_template) and the generation prompt, tokenised without added special tokens
  (the template places them), as in training;
- completion and pretokenized: the message as raw text to continue.

A message that is a JSON object is read as a row of the dataset instead, so a line copied from the training
file asks the model exactly that question: alpaca ``{"instruction": …, "input": …}`` (its output is ignored;
jeopardy ``{"question": …, "category": …}``), chat ``{"messages": [...]}`` (the reply is generated after its last
non-assistant turn), completion ``{"text": …}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..schemas.run_plan import DataPlan, DatasetPlan
from .data.chat import row_messages  # the message parser training used (aliases, content parts)
from .data.errors import DataError
from .data.formats import AlpacaFormat, Format, RowError, make_formatter

Message = dict[str, str]  # {"role": ..., "content": ...}

# Pretokenized data has no text format to follow: its prompts are raw text, formatted as a completion dataset
# whose rows keep the text in this column (the JSON-row form of a prompt is then {"text": …}).
RAW_TEXT_FIELD = "text"


class PromptError(DataError):
    """A prompt that is not a usable row of the dataset's format, or a plan with no dataset to follow."""


def prompt_entry(entry: DatasetPlan) -> DatasetPlan:
    """The dataset entry whose format prompts follow: the entry itself, or for pretokenized data a completion
    entry over raw text."""
    if entry.type == "pretokenized":
        return replace(entry, type="completion", field=RAW_TEXT_FIELD)
    return entry


class PromptBuilder:
    def __init__(self, data: DataPlan, tokenizer: Any) -> None:
        if not data.datasets:
            raise PromptError("the run plan has no datasets, so there is no prompt format to follow; recompile the "
                              "config with `tunefile compile`")
        self.entry = data.datasets[0]
        self.kind: str = self.entry.type
        self.tokenizer = tokenizer
        self.format_entry = prompt_entry(self.entry)
        self.format: Format = make_formatter(self.format_entry, data, tokenizer)

    @property
    def keeps_history(self) -> bool:
        """Only chat templates have turns; the other formats were trained on single prompts."""
        return self.kind == "chat_template"

    def text(self, message: str, history: Sequence[Message] = ()) -> tuple[str, bool]:
        """(prompt text, whether the tokenizer adds its special tokens), as the training format does."""
        row = _json_row(message)
        if self.kind == "chat_template":
            messages = self._row_conversation(row) if row is not None else [
                *history, {"role": "user", "content": message}]
            return self.format.render(messages, generation_prompt=True), False  # type: ignore[attr-defined]
        try:
            if isinstance(self.format, AlpacaFormat):  # the prompt alone: the row's output is not needed
                style = self.format.style
                return self.format.prompt(row if row is not None else {style.instruction_key: message}), True
            texts, _ = self.format.texts(row if row is not None else {self.format_entry.field: message})
        except RowError as exc:
            raise PromptError(f"prompt {message.strip()[:60]!r}: not a {self.kind} row: {exc}") from None
        return texts[0]

    def token_ids(self, message: str, history: Sequence[Message] = ()) -> list[int]:
        text, special = self.text(message, history)
        return list(self.format.encode_many([text], special)[0][0])

    def stop_token_ids(self) -> list[int]:
        """eos and, for chat templates, the end-of-turn markers the template writes (<|im_end|>, <|eot_id|>, …):
        a reply ends where a trained turn ended."""
        ids = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        if self.kind == "chat_template":
            template = self.format.template  # type: ignore[attr-defined]
            ids += [self.tokenizer.convert_tokens_to_ids(marker)
                    for marker in self.format.terminators if marker in template]  # type: ignore[attr-defined]
        return list(dict.fromkeys(ids))

    def _row_conversation(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        entry = self.entry  # a chat_template entry: the plan fills in its message keys
        try:
            messages = row_messages(row, entry.field_messages, entry.message_field_role, entry.message_field_content)
        except RowError as exc:
            raise PromptError(f"prompt row: not a chat_template row: {exc}") from None
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()  # the answer to generate
        if not messages:
            raise PromptError("prompt row: no message before the assistant's reply")
        return messages


def _json_row(message: str) -> dict[str, Any] | None:
    text = message.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None  # text that merely looks like JSON is a prompt like any other
    return value if isinstance(value, dict) else None
