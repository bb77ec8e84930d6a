"""The ``chat_template`` format: OpenAI-style message lists rendered with a chat template, with the loss on
the turns of ``roles_to_train`` and the end-of-turn tokens ``train_on_eos`` selects.

How the mask is found, soundly for any template: the conversation is rendered once in full and then
incrementally (the first i messages, and for assistant turns with the generation prompt), which marks where
each turn and its header end; each message's content is located in the rendered text from there on. The
rendered text is tokenised once with character offsets, and a token is trained when its characters overlap a
trained content span. So the tokens are exactly those of the full rendering (what the model sees at inference).

A turn's end token is the first end-of-turn token (by token id) after its content and before the next turn:
the plan's ``eot_tokens`` when it names them, else eos or a known terminator such as <|im_end|>. As in
Axolotl, where ``train_on_eot`` defaults to ``train_on_eos`` (tunefile has the one option), naming
``eot_tokens`` does not stop the eos token from ending a turn too: the first eos in the same place follows the
same ``train_on_eos`` rule.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from typing import Any

from ...schemas.run_plan import DataPlan, DatasetPlan
from .errors import DataError
from .examples import IGNORE, Encoded, Example, Format, RowError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}
# Markers that end a turn in common templates; the tokenizer's eos is always one too.
TURN_TERMINATORS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>")
# ShareGPT-style role names, mapped to the OpenAI ones templates expect.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
TRAIN_ON_EOS = ("all", "turn", "last", "none")
log = logging.getLogger(__name__)


def resolve_chat_template(name: str | None, jinja: str | None, tokenizer: Any) -> str:
    """The Jinja text for a dataset: a name (chatml, llama3, tokenizer_default,
    tokenizer_default_fallback_<name>, jinja) or a Jinja string itself. Unset (None) means the tokenizer's own,
    or ``jinja`` when only that is given."""
    if name is None:
        if jinja:
            return jinja
        name = "tokenizer_default"
    if any(marker in name for marker in ("{{", "{%")):
        return name
    if name == "jinja":
        if not jinja:
            raise DataError("chat_template: jinja needs chat_template_jinja (the template text)")
        return jinja
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if name == "tokenizer_default":
        if not own:
            raise DataError(f"the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template; "
                            f"set chat_template to one of {', '.join(NAMED_TEMPLATES)} or give chat_template_jinja")
        return own
    if name.startswith("tokenizer_default_fallback_"):
        if own:
            return own
        return resolve_chat_template(name.removeprefix("tokenizer_default_fallback_"), jinja, tokenizer)
    if name not in NAMED_TEMPLATES:
        raise DataError(f"chat_template {name!r} is not known; choose one of "
                        f"{', '.join([*NAMED_TEMPLATES, 'tokenizer_default', 'jinja'])} or give a Jinja string")
    return NAMED_TEMPLATES[name]


def dataset_chat_template(entry: DatasetPlan, data: DataPlan, tokenizer: Any) -> str:
    """The dataset's own template wins over the run's (``data.chat_template`` / ``data.chat_template_jinja``)."""
    name = data.chat_template if entry.chat_template is None else entry.chat_template
    return resolve_chat_template(name, data.chat_template_jinja, tokenizer)


def _chat_option(entry: DatasetPlan, name: str) -> Any:
    """A chat option the compiler fills in for every chat_template entry; None only in a hand-made plan."""
    value = getattr(entry, name)
    if value is None:
        raise DataError(f"dataset {entry.path}: {name} is not set; a chat_template dataset needs it "
                        "(the compiler writes it; recompile the config)")
    return value


class ChatTemplateFormat(Format):
    def __init__(self, entry: DatasetPlan, data: DataPlan, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.template = dataset_chat_template(entry, data, tokenizer)
        self.field = _chat_option(entry, "field_messages")
        self.role_key = _chat_option(entry, "message_field_role")
        self.content_key = _chat_option(entry, "message_field_content")
        self.roles_to_train = set(_chat_option(entry, "roles_to_train"))
        self.train_on_eos = _chat_option(entry, "train_on_eos")
        if self.train_on_eos not in TRAIN_ON_EOS:
            raise DataError(f"dataset {entry.path}: train_on_eos {self.train_on_eos!r} is not one of "
                            f"{', '.join(TRAIN_ON_EOS)}")
        # The tokens that end a turn (inference stops at them too, see prompts.py), and their ids.
        self.terminators = end_of_turn_tokens(data.eot_tokens, tokenizer)
        vocabulary = tokenizer.get_vocab()
        self.end_ids = frozenset(vocabulary[token] for token in self.terminators)
        # Named eot_tokens leave eos a turn end of its own (Axolotl's separate EOS search).
        eos_id = tokenizer.eos_token_id
        self.eos_ids = frozenset() if data.eot_tokens is None or eos_id is None or eos_id in self.end_ids \
            else frozenset([eos_id])
        unused = [] if data.eot_tokens is None else [token for token in data.eot_tokens if token not in self.template]
        if unused:
            log.warning("dataset %s: eot_tokens %s never appear in its chat template, so no turn ends with them",
                        entry.path, ", ".join(unused))

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def texts(self, row: dict[str, Any]) -> tuple[list[tuple[str, bool]], Any]:
        """The full rendering (tokenised without added special tokens: the template places them), the character
        spans of the trained contents, and per turn (after its content, its end, whether its end token trains)."""
        messages = row_messages(row, self.field, self.role_key, self.content_key)
        try:
            full = self.render(messages)
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception() or a Jinja error
            raise RowError(f"the chat template cannot render this conversation: {exc}") from None
        content, turn_end = _spans(messages, full, self.render)
        trained = [content[i] for i, message in enumerate(messages) if message["role"] in self.roles_to_train]
        turns = []
        for i, message in enumerate(messages):
            wants_end = {"all": True, "turn": message["role"] in self.roles_to_train,
                         "last": i == len(messages) - 1, "none": False}[self.train_on_eos]
            turns.append((content[i][1], turn_end[i], wants_end))
        return [(full, False)], (len(full), trained, turns)

    def assemble(self, encoded: list[Encoded], context: Any) -> list[Example]:
        """A token is trained when its characters overlap a trained content span, or when it is the end token
        of a turn whose end train_on_eos trains."""
        (ids, offsets), (length, trained, turns) = encoded[0], context
        mask = bytearray(length + 1)
        for start, end in trained:
            mask[start:end] = b"\x01" * (end - start)
        labels = [token if end > start and any(mask[start:end]) else IGNORE
                  for token, (start, end) in zip(ids, offsets, strict=True)]
        starts = [start for start, _ in offsets]
        for after, before, wants_end in turns:
            if not wants_end:
                continue
            for wanted in (self.end_ids, self.eos_ids):
                at = _first_token(ids, starts, wanted, after, before)
                if at is not None:
                    labels[at] = ids[at]
        return [Example(list(ids), labels)]


def row_messages(row: dict[str, Any], field: str, role_key: str, content_key: str) -> list[dict[str, Any]]:
    raw = row.get(field)
    if not (isinstance(raw, list) and raw):
        raise RowError(f"field {field!r} is not a non-empty list of messages")
    messages = []
    for message in raw:
        if not (isinstance(message, dict) and role_key in message):
            raise RowError(f"a message has no {role_key!r}")
        content = message.get(content_key)
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise RowError(f"a message's {content_key!r} is not text")
        extra = {k: v for k, v in message.items() if k not in (role_key, content_key)}
        role = str(message[role_key])
        messages.append({**extra, "role": ROLE_ALIASES.get(role, role), "content": content})
    return messages


def _spans(messages: list[dict[str, Any]], full: str, render: Any) -> tuple[list[tuple[int, int]], list[int]]:
    """Each message's content span in ``full`` and where its turn ends (the next turn's start, or the end)."""
    content: list[tuple[int, int]] = []
    turn_start: list[int] = []
    cursor = 0
    for i, message in enumerate(messages):
        if i:  # everything before this turn, when the template renders prefixes as prefixes
            cursor = max(cursor, _prefix_length(full, render, messages[:i], False))
        turn_start.append(cursor)
        if message["role"] == "assistant":  # skip the assistant header, which may contain the content's text
            cursor = max(cursor, _prefix_length(full, render, messages[:i], True))
        text = message["content"]
        start = full.find(text, cursor) if text else cursor
        if start < 0 and text.strip():
            text = text.strip()  # templates that trim content (llama3)
            start = full.find(text, cursor)
        if start < 0:
            raise RowError(f"message {i} ({message['role']}): its content is not in the rendered conversation")
        content.append((start, start + len(text)))
        cursor = start + len(text)
    next_turn = [*turn_start[1:], len(full)]
    turn_end = [max(following, end) for following, (_, end) in zip(next_turn, content, strict=True)]
    return content, turn_end


def _prefix_length(full: str, render: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> int:
    try:
        prefix = render(messages, generation_prompt)
    except Exception:  # noqa: BLE001 - some templates refuse partial conversations; fall back to searching
        return 0
    return len(prefix) if full.startswith(prefix) else 0


def end_of_turn_tokens(eot_tokens: tuple[str, ...] | None, tokenizer: Any) -> list[str]:
    """The tokens that end a turn: ``eot_tokens`` when the plan names them (each must be one token of the
    vocabulary; every one that is not is named in one DataError), else eos and the known terminators the
    vocabulary has."""
    vocabulary = tokenizer.get_vocab()
    if eot_tokens is None:
        return [t for t in dict.fromkeys([tokenizer.eos_token, *TURN_TERMINATORS]) if t and t in vocabulary]
    problems = []
    for token in eot_tokens:
        if token not in vocabulary:
            problems.append(f"{token!r} is not in the tokenizer's vocabulary")
        elif (ids := list(tokenizer.encode(token, add_special_tokens=False))) != [vocabulary[token]]:
            # A vocabulary entry whose text reads as other tokens (a byte-level form like 'Ġend') is never found.
            problems.append(f"{token!r} is read as {len(ids)} token(s) {ids}, not as its vocabulary entry")
    if problems:
        raise DataError(f"eot_tokens: {'; '.join(problems)} (add the token under `tokens:` or "
                        "`special_tokens:` in the config)")
    return list(dict.fromkeys(eot_tokens))


def _first_token(ids: list[int], starts: list[int], wanted: frozenset[int], after: int, before: int) -> int | None:
    """Index of the first token with an id in ``wanted`` that starts at character ``after`` or later and before
    ``before``: a turn's end token, found after its content and within its turn."""
    if not wanted:
        return None
    at = bisect_left(starts, after)  # a fast tokenizer's offsets run forward through the text
    while at < len(ids) and starts[at] < before:
        if ids[at] in wanted:
            return at
        at += 1
    return None
