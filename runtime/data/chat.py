"""The ``chat_template`` format: OpenAI-style message lists rendered with a chat template, with the loss on
the turns of ``roles_to_train`` and the end-of-turn tokens ``train_on_eos`` selects.

How the mask is found, soundly for any template: the conversation is rendered once in full and then
incrementally (the first i messages, and for assistant turns with the generation prompt), which marks where
each turn and its header end; each message's content is located in the rendered text from there on, and its
end-of-turn marker (eos, or a known turn terminator such as <|im_end|>) is the first one after the content.
The rendered text is tokenised once with character offsets, and a token is trained when its characters overlap
a trained span. So the tokens are exactly those of the full rendering (what the model sees at inference).
"""

from __future__ import annotations

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
        vocabulary = tokenizer.get_vocab()
        self.terminators = [t for t in dict.fromkeys([tokenizer.eos_token, *TURN_TERMINATORS])
                            if t and t in vocabulary]

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def texts(self, row: dict[str, Any]) -> tuple[list[tuple[str, bool]], Any]:
        """The full rendering (tokenised without added special tokens: the template places them) and the
        character spans to train."""
        messages = row_messages(row, self.field, self.role_key, self.content_key)
        try:
            full = self.render(messages)
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception() or a Jinja error
            raise RowError(f"the chat template cannot render this conversation: {exc}") from None
        content, turn_end = _spans(messages, full, self.render)
        eos = [_terminator(full, start, end, self.terminators)
               for (_, start), end in zip(content, turn_end, strict=True)]
        trained: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message["role"] in self.roles_to_train:
                trained.append(content[i])
            wants_eos = {"all": True, "turn": message["role"] in self.roles_to_train,
                         "last": i == len(messages) - 1, "none": False}[self.train_on_eos]
            if wants_eos and eos[i] is not None:
                trained.append(eos[i])
        return [(full, False)], (len(full), trained)

    def assemble(self, encoded: list[Encoded], context: Any) -> list[Example]:
        """A token is trained when its characters overlap a trained span."""
        (ids, offsets), (length, trained) = encoded[0], context
        mask = bytearray(length + 1)
        for start, end in trained:
            mask[start:end] = b"\x01" * (end - start)
        labels = [token if end > start and any(mask[start:end]) else IGNORE
                  for token, (start, end) in zip(ids, offsets, strict=True)]
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


def _terminator(full: str, start: int, end: int, terminators: list[str]) -> tuple[int, int] | None:
    """The first end-of-turn marker after a message's content, within its turn."""
    found = [(at, at + len(t)) for t in terminators if 0 <= (at := full.find(t, start, end))]
    return min(found) if found else None
