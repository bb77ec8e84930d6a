"""Axolotl's tokenizer_use_mistral_common: Mistral's own tokenizer (the mistral-common package, through
transformers' MistralCommonBackend), given the surface tunefile's data code asks of a tokenizer.

What the data code needs and how it gets it here:
- token character offsets (``tokenizer(texts, return_offsets_mapping=True)``: every format's label mask is
  found from them), which the backend does not give: they are computed from each token's bytes, exact for
  tekken tokenizers (byte-level BPE, tekken.json). SentencePiece ones (tokenizer.model.v*) are refused;
- chat rendering: mistral-common does not render a Jinja template to text and then tokenise it. It builds the
  token ids of a conversation itself, and never reads a control token ([INST], </s>) from text. So
  ``apply_chat_template(tokenize=False)`` returns the text of mistral-common's own ids as a ``RenderedChat``,
  a str that keeps those ids; tokenising that very string gives them back, with their offsets in it. Any
  other text is tokenised as mistral-common tokenises text. As in Axolotl, the conversation format is
  mistral-common's: a chat_template the config names is not used (said once in the log);
- validation: mistral-common checks a conversation against the mode it runs in. Whole training conversations
  end with the assistant (its "finetuning" mode), prompts with the user ("test" mode): one backend of each;
- no added tokens: the backend cannot add any, so special_tokens / tokens that would add one are an error
  (a tokenizer silently without them would change the data).

Everything else (eos/pad ids, get_vocab, decode, save_pretrained, convert_tokens_to_ids) is the backend's own.
"""

from __future__ import annotations

import hashlib
import logging
from bisect import bisect_left, bisect_right
from itertools import accumulate
from typing import Any

from .errors import RuntimeUserError

log = logging.getLogger(__name__)

MISTRAL_COMMON_TEMPLATE = "mistral-common"  # stands for the chat template: mistral-common formats conversations
INSTALL = "pip install 'tunefile[mistral]'"


class MistralTokenizerError(RuntimeUserError):
    """The mistral-common tokenizer cannot be loaded or cannot do what the plan asks of it."""


class RenderedChat(str):
    """A conversation as mistral-common renders it: the text of ``token_ids``, which tokenising it returns."""

    token_ids: tuple[int, ...]

    def __new__(cls, text: str, token_ids: list[int]) -> RenderedChat:
        rendered = super().__new__(cls, text)
        rendered.token_ids = tuple(token_ids)
        return rendered


def backend_class() -> Any:
    """transformers' wrapper class: MistralCommonBackend (transformers 5), MistralCommonTokenizer (4.5x)."""
    try:
        import mistral_common  # noqa: F401
    except ImportError:
        raise MistralTokenizerError(f"tokenizer_use_mistral_common needs the mistral-common package: {INSTALL}") \
            from None
    import transformers.tokenization_mistral_common as integration

    found = getattr(integration, "MistralCommonBackend", None) or getattr(integration, "MistralCommonTokenizer", None)
    if found is None:
        raise MistralTokenizerError("tokenizer_use_mistral_common: this transformers has no mistral-common "
                                    "tokenizer class; upgrade transformers")
    return found


def load_mistral_common(name: str, *, local_files_only: bool, revision: dict[str, Any]) -> MistralCommonTokenizer:
    """The tokenizer in folder or hub repo ``name`` (tekken.json); ``revision``: from_pretrained's revision
    argument, empty for a folder."""
    cls = backend_class()
    try:
        backends = [cls.from_pretrained(name, mode=mode, local_files_only=local_files_only, **revision)
                    for mode in ("finetuning", "test")]
    except ImportError as exc:  # transformers refuses a mistral-common older than it supports
        raise MistralTokenizerError(f"tokenizer_use_mistral_common: {str(exc).strip().splitlines()[0]} ({INSTALL})") \
            from None
    return MistralCommonTokenizer(*backends)


def char_offsets(text: str, pieces: list[bytes]) -> list[tuple[int, int]]:
    """(start, end) character offsets in ``text`` of tokens whose UTF-8 bytes are ``pieces``, in order; a token
    that covers part of a character covers the character (as Hugging Face's byte-level tokenizers report it), an
    empty piece (a special token the text does not show) is an empty span where it stands."""
    byte_ends = list(accumulate(len(piece) for piece in pieces))
    if text.isascii():
        return [(end - len(piece), end) for piece, end in zip(pieces, byte_ends, strict=True)]
    char_starts = list(accumulate((len(ch.encode("utf-8")) for ch in text), initial=0))  # byte start of each char
    offsets = []
    for piece, end in zip(pieces, byte_ends, strict=True):
        start = end - len(piece)
        first = bisect_right(char_starts, start) - 1
        offsets.append((first, bisect_left(char_starts, end) if piece else first))
    return offsets


class MistralCommonTokenizer:
    """The two backends (``finetuning`` renders training conversations, ``test`` prompts) as one tokenizer."""

    def __init__(self, finetuning: Any, test: Any) -> None:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        self._backend, self._test = finetuning, test
        self._text = finetuning.tokenizer.instruct_tokenizer.tokenizer  # mistral-common's own tokenizer
        if not hasattr(self._text, "id_to_byte_piece"):
            raise MistralTokenizerError(
                f"tokenizer_use_mistral_common: {self._text.file_path.name} is a SentencePiece tokenizer; tunefile "
                "reads token offsets from tekken tokenizers (tekken.json) only. Use the model's Hugging Face "
                "tokenizer (drop tokenizer_use_mistral_common)")
        self._keep, self._hide = SpecialTokenPolicy.KEEP, SpecialTokenPolicy.IGNORE
        self.fingerprint = hashlib.sha256(self._text.file_path.read_bytes()).hexdigest()
        self._warned_template = False

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not set up (copy, unpickling): no backend to ask
            raise AttributeError(name)
        return getattr(self._backend, name)

    def __len__(self) -> int:
        return len(self._backend)

    @property
    def chat_template(self) -> str:
        return MISTRAL_COMMON_TEMPLATE

    @chat_template.setter
    def chat_template(self, value: Any) -> None:
        """Saving a merged model sets the training template: mistral-common's own is what its files describe."""

    def add_special_tokens(self, tokens: dict[str, Any], **kwargs: Any) -> int:
        """Nothing to do when every extra special token is in the vocabulary already; anything else (a new token,
        another token in a named role such as pad_token) the backend cannot do, which is an error."""
        named = {key: value for key, value in tokens.items() if key != "additional_special_tokens"}
        if named:
            raise MistralTokenizerError(f"tokenizer_use_mistral_common: mistral-common tokenizers keep their own "
                                        f"special tokens; special_tokens asks for {named}: remove it from the config")
        return self.add_tokens(list(tokens.get("additional_special_tokens") or ()))

    def add_tokens(self, tokens: list[str], **kwargs: Any) -> int:
        missing = [token for token in tokens if token not in self._backend.get_vocab()]
        if missing:
            raise MistralTokenizerError(f"tokenizer_use_mistral_common: mistral-common tokenizers cannot add tokens, "
                                        f"and the config adds {', '.join(missing)}; remove them from special_tokens "
                                        "/ tokens")
        return 0

    # --- text → tokens --------------------------------------------------------------------------------------

    def _encode_one(self, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
        if isinstance(text, RenderedChat):  # its ids, control tokens included; it holds its own bos
            ids = list(text.token_ids)
            pieces = [self._text.id_to_byte_piece(i, self._keep) for i in ids]
        else:
            ids = self._text.encode(text, bos=add_special_tokens, eos=False)
            pieces = [self._text.id_to_byte_piece(i, self._hide) for i in ids]
        if b"".join(pieces) != text.encode("utf-8"):
            raise MistralTokenizerError("tokenizer_use_mistral_common: the tokens do not spell the text they were "
                                        "read from; this tokenizer's bytes cannot give character offsets")
        return ids, char_offsets(text, pieces)

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        return self._encode_one(text, add_special_tokens)[0]

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, return_offsets_mapping: bool = False,
                 **kwargs: Any) -> dict[str, Any]:
        """Like a Hugging Face tokenizer's call on a text or a list of texts (no padding, truncation or tensors):
        input_ids, attention_mask and, when asked, offset_mapping."""
        if kwargs:
            raise TypeError(f"MistralCommonTokenizer does not take {', '.join(sorted(kwargs))}")
        texts = [text] if isinstance(text, str) else list(text)
        encoded = [self._encode_one(t, add_special_tokens) for t in texts]
        out: dict[str, Any] = {"input_ids": [ids for ids, _ in encoded],
                               "attention_mask": [[1] * len(ids) for ids, _ in encoded]}
        if return_offsets_mapping:
            out["offset_mapping"] = [offsets for _, offsets in encoded]
        if isinstance(text, str):
            out = {key: value[0] for key, value in out.items()}
        return out

    # --- conversations --------------------------------------------------------------------------------------

    def apply_chat_template(self, conversation: list[dict[str, Any]], chat_template: str | None = None,
                            tokenize: bool = True, add_generation_prompt: bool = False,
                            **kwargs: Any) -> list[int] | RenderedChat:
        """mistral-common's rendering of ``conversation``: its ids, or (``tokenize=False``) their text as a
        RenderedChat. A conversation ending with the assistant renders as training data; any other, and any
        with the generation prompt, as a prompt for the assistant's next turn."""
        if chat_template not in (None, MISTRAL_COMMON_TEMPLATE) and not self._warned_template:
            log.warning("tokenizer_use_mistral_common: conversations are formatted by mistral-common, as in Axolotl; "
                        "the chat template the config names is not used")
            self._warned_template = True
        training = bool(conversation) and conversation[-1].get("role") == "assistant" and not add_generation_prompt
        backend = self._backend if training else self._test
        ids = list(backend.apply_chat_template(conversation, tokenize=True, return_dict=False, **kwargs))
        if tokenize:
            return ids
        pieces = b"".join(self._text.id_to_byte_piece(i, self._keep) for i in ids)
        return RenderedChat(pieces.decode("utf-8"), ids)
