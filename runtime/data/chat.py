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

Three dataset options shape the conversation before it is rendered, as Axolotl's do: a message's reasoning trace
moves from ``field_thinking`` to ``template_thinking_key`` (where the template reads it), and is trained with its
turn; ``drop_system_message`` leaves out a leading system turn; the run's ``chat_template_kwargs`` are extra
variables every rendering gets (inference renders through this class too, so prompts get them as well).
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
# Keywords the renderer passes to apply_chat_template itself: chat_template_kwargs naming one would clash with
# them or change what a rendering is (continue_final_message leaves the last turn open).
RENDER_KEYWORDS = ("conversation", "messages", "chat_template", "tokenize", "add_generation_prompt",
                   "continue_final_message")
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
        self.thinking = (_chat_option(entry, "field_thinking"), _chat_option(entry, "template_thinking_key"))
        self.drop_system_message = _chat_option(entry, "drop_system_message")
        self.template_variables = template_variables(data.chat_template_kwargs)
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
                                                  add_generation_prompt=generation_prompt, **self.template_variables)

    def conversation(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The row's messages as the template receives them: roles mapped, traces under the template's key, and
        with ``drop_system_message`` the leading system turn left out. Like Axolotl, only that first turn goes (a
        later system turn is part of the conversation), and a system prompt the template writes by itself stays."""
        messages = row_messages(row, self.field, self.role_key, self.content_key, thinking=self.thinking)
        if self.drop_system_message and messages[0]["role"] == "system":
            messages = messages[1:]
            if not messages:
                raise RowError("the conversation is only a system message, which drop_system_message leaves out")
        return messages

    def texts(self, row: dict[str, Any]) -> tuple[list[tuple[str, bool]], Any]:
        """The full rendering (tokenised without added special tokens: the template places them), the character
        spans of the trained contents, and per turn (after its content, its end, whether its end token trains)."""
        messages = self.conversation(row)
        try:
            full = self.render(messages)
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception() or a Jinja error
            raise RowError(f"the chat template cannot render this conversation: {exc}") from None
        spans, turn_end = _spans(messages, full, self.render, self.thinking[1])
        trained = [spans[i] for i, message in enumerate(messages) if message["role"] in self.roles_to_train]
        turns = []
        for i, message in enumerate(messages):
            wants_end = {"all": True, "turn": message["role"] in self.roles_to_train,
                         "last": i == len(messages) - 1, "none": False}[self.train_on_eos]
            turns.append((spans[i][1], turn_end[i], wants_end))
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


def row_messages(row: dict[str, Any], field: str, role_key: str, content_key: str, *,
                 thinking: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    """The row's messages with OpenAI roles and text content. ``thinking`` (field_thinking,
    template_thinking_key) moves each message's reasoning trace to the key the template reads; as in Axolotl, a
    message without one, or with null (what a table column holds for the messages that lack it), gets no key."""
    raw = row.get(field)
    if not (isinstance(raw, list) and raw):
        raise RowError(f"field {field!r} is not a non-empty list of messages")
    messages = []
    for message in raw:
        if not (isinstance(message, dict) and role_key in message):
            raise RowError(f"a message has no {role_key!r}")
        content = _message_text(message.get(content_key), content_key)
        extra = {k: v for k, v in message.items() if k not in (role_key, content_key)}
        if thinking is not None:
            source, target = thinking
            trace = extra.pop(source, None)  # the source key goes: the template reads the trace under target
            if trace is not None:
                extra[target] = _message_text(trace, source)
        role = str(message[role_key])
        messages.append({**extra, "role": ROLE_ALIASES.get(role, role), "content": content})
    return messages


def _message_text(value: Any, key: str) -> str:
    if isinstance(value, list):  # OpenAI content parts: keep the text ones
        value = "".join(part.get("text", "") for part in value if isinstance(part, dict))
    if not isinstance(value, str):
        raise RowError(f"a message's {key!r} is not text")
    return value


def template_variables(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The run's chat_template_kwargs, checked once: none may name a keyword the renderer sets itself."""
    clashes = sorted(set(kwargs) & set(RENDER_KEYWORDS))
    if clashes:
        raise DataError(f"chat_template_kwargs: {', '.join(clashes)} cannot be set there; tunefile passes "
                        f"{'it' if len(clashes) == 1 else 'them'} itself when it renders a conversation")
    return dict(kwargs)


def _spans(messages: list[dict[str, Any]], full: str, render: Any,
           thinking_key: str | None) -> tuple[list[tuple[int, int]], list[int]]:
    """Each message's span in ``full`` (its content, widened to its reasoning trace under ``thinking_key`` where
    the template renders one) and where its turn ends (the next turn's start, or the end)."""
    spans: list[tuple[int, int]] = []
    turn_start: list[int | None] = []  # None: the template renders the turns before it differently as a prefix
    cursor = 0
    for i, message in enumerate(messages):
        if i:  # everything before this turn, when the template renders prefixes as prefixes
            prefix = _prefix_length(full, render, messages[:i], False)
            turn_start.append(max(cursor, prefix) if prefix else None)
            cursor = max(cursor, prefix)
        else:
            turn_start.append(0)
        if message["role"] == "assistant":  # skip the assistant header, which may contain the content's text
            cursor = max(cursor, _prefix_length(full, render, messages[:i], True))
        trace = _trace_region(full, render, messages, i, thinking_key, cursor) \
            if thinking_key is not None and thinking_key in message else None
        # The content follows its trace (and may quote it); a template that writes the trace last is searched again.
        content = _find_text(full, message["content"], cursor if trace is None else trace[1])
        if content is None and trace is not None:
            content = _find_text(full, message["content"], cursor)
        if content is None:
            raise RowError(f"message {i} ({message['role']}): its content is not in the rendered conversation")
        # Trace and content train as one span, so what the template writes between them (</think>) trains too.
        span = content if trace is None else (min(content[0], trace[0]), max(content[1], trace[1]))
        spans.append(span)
        cursor = span[1]
    # Where a turn's start is unknown (templates that render the last message differently, as Qwen3 does with
    # its <think> block), the turn before it ends where this turn's own text begins.
    next_turn = [start if start is not None else span[0] for start, span in zip(turn_start[1:], spans[1:], strict=True)]
    next_turn.append(len(full))
    turn_end = [max(following, end) for following, (_, end) in zip(next_turn, spans, strict=True)]
    return spans, turn_end


def _find_text(full: str, text: str, cursor: int) -> tuple[int, int] | None:
    """Where ``text`` first shows in ``full`` from ``cursor`` on, trimmed if only so (templates that trim)."""
    start = full.find(text, cursor) if text else cursor
    if start < 0 and text.strip():
        text = text.strip()
        start = full.find(text, cursor)
    return None if start < 0 else (start, start + len(text))


def _trace_region(full: str, render: Any, messages: list[dict[str, Any]], i: int, key: str,
                  cursor: int) -> tuple[int, int] | None:
    """The characters message ``i``'s reasoning trace adds to ``full`` (from ``cursor`` on), found by rendering
    the conversation again without it, the turn kept in its place (as Axolotl finds a turn): so template text
    that comes only with a trace (<think> tags) is part of it, and a trace the template leaves out (Qwen3 drops
    those of turns before the last user message) has none."""
    without = [*messages[:i], {k: v for k, v in messages[i].items() if k != key}, *messages[i + 1:]]
    try:
        other = render(without)
    except Exception:  # noqa: BLE001 - a template that needs the trace: look for its text instead
        return _find_text(full, messages[i][key], cursor)
    start = _common_prefix(full, other)
    # The common suffix may not reach back over the common prefix (both are shared text, counted once).
    end = len(full) - min(_common_prefix(full[::-1], other[::-1]), min(len(full), len(other)) - start)
    start = max(start, cursor)
    return (start, end) if end > start else None


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix, by bisection over slice comparisons (done in C, fast on long text)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


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
