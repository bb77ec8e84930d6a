"""A faster engine for the tokenizers Llama 3 made common: tiktoken, built from the same ``tokenizer.json``.

Tokenising is most of preprocessing's time. For a byte-level BPE tokenizer whose text is split by one regular
expression and never normalised (Llama 3's kind: a tiktoken vocabulary converted to Hugging Face's format),
tiktoken computes the same ids several times faster. It is used only when all of this holds:

1. the tokenizer's own JSON says so: a BPE model (no dropout, byte fallback or word affixes) that looks whole
   words up before merging (``ignore_merges``, as tiktoken always does); no normaliser; a ``Split`` regex
   (isolated pieces) followed by ``ByteLevel`` without its own regex or prefix space; every byte a token;
   merges that are exactly every split of a token into two tokens, ordered by the merged token's id (what
   converting a tiktoken vocabulary produces, and what makes both merge orders agree); added tokens matched as
   whole strings (no lstrip/rstrip/single_word, none the prefix of another, not split as text);
2. tiktoken is installed (``pip install 'tunefile[fast-tokenize]'``) and compiles the same regex;
3. on sample rows of the dataset itself, and on a probe of awkward text, the ids equal those of the path the
   format would otherwise take (``examples.batch_encoder``), with and without the special tokens around a
   sequence (which are read off that path: whatever the post-processor adds before and after the text).

Otherwise the data is tokenised as before, and the reason is logged once and recorded in the prepared data's
stats (``tokenizer_engine``), which ``preprocess`` prints. The engine returns no character offsets, so only
formats that read token ids alone use it (``OFFSET_FREE_FORMATS``); chat templates keep the Hugging Face path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .examples import PROBE_TEXT, Encoded, batch_encoder
from .formats import CompletionFormat
from .instruction import AlpacaFormat

log = logging.getLogger(__name__)
EXTRA = "fast-tokenize"  # the pyproject extra that installs tiktoken
# Formats whose examples are built from token ids alone (their assemble never reads offsets). Exact types: a
# subclass may read more.
OFFSET_FREE_FORMATS = (AlpacaFormat, CompletionFormat)
# Text the check always includes besides the dataset's rows: runs of spaces, tabs and newlines, digits, accents,
# scripts without spaces, emoji, contractions in both cases, and (added below) every added token inside text.
AWKWARD_TEXT = (PROBE_TEXT + "   leading\n\n\n  trailing   \t\r\n 123456789 3.14159 1,000,000 DON'T don't We'LL "
                "日本語のテキスト 中文 한국어 Ελληνικά русский العربية हिन्दी 👍🏽👨‍👩‍👧 \u00a0nbsp\u2009thin "
                "e\u0301 ﬁ ＡＢＣ x\x00y\x7f \n")


@dataclass(frozen=True)
class EngineChoice:
    """Which engine tokenised a dataset, and why not tiktoken when it did not (for stats and the summary)."""

    engine: str  # "tiktoken" or "huggingface"
    reason: str | None = None
    checked_texts: int = 0  # texts whose ids were compared before tiktoken was trusted

    def record(self) -> dict[str, Any]:
        return {"engine": self.engine, "reason": self.reason, "checked_texts": self.checked_texts}


def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE character of each byte (GPT-2's table): printable Latin-1 bytes stand for themselves,
    the rest for the code points from 256 upwards, in byte order. Token strings in ``tokenizer.json`` are
    spelled in these characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {chr(byte): byte for byte in printable}
    others = [byte for byte in range(256) if byte not in set(printable)]
    alphabet.update({chr(256 + n): byte for n, byte in enumerate(others)})
    return alphabet


def _merge_pairs(merges: list[Any]) -> list[tuple[str, str]]:
    """Merges as (left, right): tokenizer.json spells them "left right" (older) or [left, right] (newer)."""
    if merges and isinstance(merges[0], str):
        return [tuple(merge.split(" ", 1)) for merge in merges]  # type: ignore[misc]
    return list(map(tuple, merges))


def structure_reason(spec: dict[str, Any], *, split_special_tokens: bool) -> str | None:
    """Why this tokenizer (its parsed tokenizer.json) is not of the kind tiktoken reproduces; None when it is."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"the tokenizer's model is {model.get('type')}, not byte-level BPE"
    if spec.get("normalizer") is not None:
        return f"the tokenizer normalises text first ({spec['normalizer'].get('type')})"
    if model.get("dropout") or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        return "the BPE model uses dropout, byte fallback or word prefixes/suffixes"
    if not model.get("ignore_merges"):
        return "the BPE model merges whole words that are tokens themselves (ignore_merges is off); tiktoken " \
               "looks them up first"
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds != ["Split", "ByteLevel"]:
        return f"the pre-tokenizer is {' + '.join(map(str, kinds))}, not a Split regex then ByteLevel"
    split, byte_level = steps
    if "Regex" not in (split.get("pattern") or {}) or split.get("behavior") != "Isolated" or split.get("invert"):
        return "the Split pre-tokenizer is not an isolating regular expression"
    if byte_level.get("use_regex") or byte_level.get("add_prefix_space"):
        return "the ByteLevel pre-tokenizer adds its own regex or a prefix space"
    if split_special_tokens:
        return "split_special_tokens is set: added tokens are tokenised as text"
    added = spec.get("added_tokens") or []
    loose = [token["content"] for token in added if token.get("lstrip") or token.get("rstrip")
             or token.get("single_word")]
    if loose:
        return f"added token {loose[0]!r} strips spaces or matches single words only"
    contents = sorted(token["content"] for token in added)
    for shorter, longer in zip(contents, contents[1:], strict=False):
        if longer.startswith(shorter):  # sorted: a prefix comes right before the strings it starts
            return f"added token {shorter!r} starts added token {longer!r} (matched differently)"
    return None


def mergeable_ranks(spec: dict[str, Any]) -> tuple[dict[bytes, int] | None, str | None]:
    """(bytes → id for every vocabulary token, None) when the merges are tiktoken's, else (None, why not)."""
    alphabet = byte_level_alphabet()
    added = {token["content"] for token in spec.get("added_tokens") or []}
    vocab: dict[str, int] = {token: rank for token, rank in spec["model"]["vocab"].items() if token not in added}
    missing = [char for char in alphabet if char not in vocab]
    if missing:
        return None, f"{len(missing)} of the 256 bytes have no token of their own"
    strange = set().union(*vocab) - alphabet.keys()
    if strange:
        return None, f"vocabulary entries hold {sorted(strange)[0]!r}, which is not a byte-level character"
    # Each byte-level character becomes the Latin-1 character of its byte, whose encoding is that byte.
    to_latin1 = {ord(char): byte for char, byte in alphabet.items()}
    ranks = {token.translate(to_latin1).encode("latin-1"): rank for token, rank in vocab.items()}
    if len(set(ranks.values())) != len(ranks):
        return None, "two vocabulary entries share an id"
    pairs = _merge_pairs(spec["model"].get("merges") or [])
    merged = [vocab.get(left + right, -1) for left, right in pairs]
    if min(merged, default=0) < 0 or not all(left in vocab and right in vocab for left, right in pairs):
        return None, "a merge does not join two tokens into a token"
    if any(later < earlier for earlier, later in zip(merged, merged[1:], strict=False)):
        return None, "merges are not in the order of the merged tokens' ids"
    # tiktoken joins any two neighbours whose join is a token; BPE only the listed pairs. The same when every
    # split of every token into two tokens is listed (and nothing else is).
    splits = sum(1 for token in vocab for at in range(1, len(token)) if token[:at] in vocab and token[at:] in vocab)
    if splits != len(set(pairs)):
        return None, f"the merges list {len(set(pairs)):,} pairs but the vocabulary splits {splits:,} ways into " \
                     "two tokens (not a tiktoken vocabulary)"
    return ranks, None


class TiktokenEncoder:
    """``encode_many(texts, special)`` with tiktoken: the ids a Hugging Face tokenizer gives (offsets empty),
    ``special`` adding the tokens its post-processor puts around a sequence."""

    def __init__(self, encoding: Any, *, prefix: list[int], suffix: list[int]) -> None:
        self.encoding, self.prefix, self.suffix = encoding, prefix, suffix
        self.specials = encoding.special_tokens_set

    def encode(self, text: str, special: bool) -> list[int]:
        ids = self.encoding.encode(text, allowed_special=self.specials, disallowed_special=())
        return self.prefix + ids + self.suffix if special else ids

    def __call__(self, texts: list[str], special: bool) -> list[Encoded]:
        return [(self.encode(text, special), []) for text in texts]


def build_tiktoken(tokenizer: Any) -> tuple[TiktokenEncoder | None, str | None]:
    """(the engine, None) when the tokenizer's structure allows it and tiktoken is installed, else (None, why)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None, f"{type(tokenizer).__name__} is not a Hugging Face fast tokenizer"
    spec = json.loads(backend.to_str())
    reason = structure_reason(spec, split_special_tokens=bool(getattr(tokenizer, "split_special_tokens", False)))
    if reason is not None:
        return None, reason
    try:
        import tiktoken
    except ImportError:
        return None, f"tiktoken is not installed (pip install 'tunefile[{EXTRA}]')"
    ranks, reason = mergeable_ranks(spec)
    if ranks is None:
        return None, reason
    split = spec["pre_tokenizer"]["pretokenizers"][0]
    specials = {token["content"]: token["id"] for token in spec.get("added_tokens") or []}
    try:
        encoding = tiktoken.Encoding("tunefile", pat_str=split["pattern"]["Regex"], mergeable_ranks=ranks,
                                     special_tokens=specials)
    except Exception as exc:  # noqa: BLE001 - tiktoken raises ValueError (or a Rust panic) for a regex it rejects
        return None, f"tiktoken cannot use the tokenizer's split regex ({type(exc).__name__}: {exc})"
    reference = batch_encoder(tokenizer)
    plain, full = reference([PROBE_TEXT], False)[0][0], reference([PROBE_TEXT], True)[0][0]
    starts = [at for at in range(len(full) - len(plain) + 1) if full[at:at + len(plain)] == plain]
    if not starts:
        return None, "the special tokens added around a sequence change the sequence's own tokens"
    prefix, suffix = full[:starts[0]], full[starts[0] + len(plain):]
    return TiktokenEncoder(encoding, prefix=list(prefix), suffix=list(suffix)), None


def first_difference(engine: Callable[[list[str], bool], list[Encoded]],
                     reference: Callable[[list[str], bool], list[Encoded]],
                     texts: list[tuple[str, bool]]) -> str | None:
    """Where the engine's ids first differ from the reference's on ``texts`` ((text, special) pairs); None when
    they agree everywhere."""
    for special in (False, True):
        batch = [text for text, wants in texts if wants is special]
        if not batch:
            continue
        for text, mine, theirs in zip(batch, engine(batch, special), reference(batch, special), strict=True):
            if list(mine[0]) != list(theirs[0]):
                return f"different ids for the text {text[:60]!r}{'…' if len(text) > 60 else ''}"
    return None


def probe_texts(tokenizer: Any) -> list[tuple[str, bool]]:
    """Awkward text with every added token inside it, with and without the sequence's special tokens."""
    added = list(getattr(tokenizer, "get_added_vocab", dict)())
    texts = [AWKWARD_TEXT, "", " ", "\n", "word" + "word".join(added) + " tail", " ".join(added)]
    return [(text, special) for text in texts for special in (False, True)]


class EngineSelector:
    """Decides, dataset by dataset, whether a format tokenises with tiktoken; the engine is built once per
    tokenizer, and every reason not to use it is logged once."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._engine: TiktokenEncoder | None = None
        self._reason: str | None = None
        self._built = False
        self._logged: set[str] = set()

    def engine(self) -> tuple[TiktokenEncoder | None, str | None]:
        if not self._built:
            self._engine, self._reason = build_tiktoken(self.tokenizer)
            self._built = True
        return self._engine, self._reason

    def choose(self, fmt: Any, sample_rows: Iterable[dict[str, Any]], *, label: str) -> EngineChoice:
        """Put tiktoken into ``fmt`` (its ``encode_many``) when it reproduces the format's own ids on
        ``sample_rows`` and the probe text; the choice, with the reason when not."""
        if type(fmt) not in OFFSET_FREE_FORMATS:
            return self._fallback(f"the {type(fmt).__name__} format reads character offsets", label, quiet=True)
        engine, reason = self.engine()
        if engine is None:
            return self._fallback(reason, label)
        texts = probe_texts(self.tokenizer)
        for row in sample_rows:
            try:
                texts.extend(fmt.texts(row)[0])
            except Exception:  # noqa: BLE001,S112 - a malformed row is the format's business, counted later
                continue
        difference = first_difference(engine, fmt.encode_many, texts)
        if difference is not None:
            return self._fallback(f"tiktoken and the tokenizer disagree: {difference}", label)
        fmt.encode_many = engine
        log.info("tokenising %s with tiktoken (identical ids on %d checked texts)", label, len(texts))
        return EngineChoice("tiktoken", checked_texts=len(texts))

    def _fallback(self, reason: str | None, label: str, *, quiet: bool = False) -> EngineChoice:
        reason = reason or "unknown"
        if not quiet and reason not in self._logged:
            self._logged.add(reason)
            log.info("tokenising %s with the Hugging Face tokenizer, not tiktoken: %s", label, reason)
        return EngineChoice("huggingface", reason=reason)
