"""Load the run's tokenizer (``tokenizer_config`` or ``base_model``; a local folder or a hub id, offline-aware)
and add the config's ``special_tokens`` and ``tokens``. The model side resizes its embeddings when
``len(tokenizer)`` exceeds its vocabulary."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..config import RunConfig
from .errors import DataError

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def is_offline(cfg: RunConfig | dict[str, Any]) -> bool:
    """Offline when the config says so or the environment does (launch.sh exports these before Python)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(cfg.get("offline")) or any(flag.strip().lower() in ("1", "true", "yes", "on") for flag in flags)


def load_tokenizer(cfg: RunConfig) -> tuple[Any, int]:
    """(tokenizer, number of tokens added to its vocabulary by ``special_tokens`` and ``tokens``)."""
    from transformers import AutoTokenizer

    source = cfg.get("tokenizer_config") or cfg.get("base_model")
    if not source:
        raise DataError("no tokenizer: set base_model (or tokenizer_config)")
    local = Path(source).expanduser()
    offline = is_offline(cfg)
    if not local.is_dir() and str(source).startswith((".", "/", "~")):
        raise DataError(f"tokenizer {source}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else str(source),
                                                  trust_remote_code=bool(cfg.get("trust_remote_code")),
                                                  local_files_only=offline or local.is_dir())
    except (OSError, ValueError) as exc:
        where = "offline and not in the Hugging Face cache" if offline else "cannot be loaded"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"tokenizer {source}: {where} ({first_line})") from None
    return tokenizer, add_config_tokens(tokenizer, cfg.get("special_tokens"), cfg.get("tokens"))


def add_config_tokens(tokenizer: Any, special_tokens: dict[str, Any] | None, tokens: list[str] | None) -> int:
    """Set the named special tokens, add the additional special tokens and plain tokens; return how many new
    vocabulary entries that made."""
    before = len(tokenizer)
    special_tokens = special_tokens or {}
    named = {key: value for key in NAMED_SPECIAL_TOKENS if (value := special_tokens.get(key))
             and getattr(tokenizer, key, None) != value}
    if named:
        tokenizer.add_special_tokens(named)
    extra = [token for token in special_tokens.get("additional_special_tokens") or []]
    if extra:
        # Extend, not replace: the tokenizer's own extra tokens (chat markers) must stay special.
        tokenizer.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
    if tokens:
        tokenizer.add_tokens(list(tokens))
    return len(tokenizer) - before


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of everything in the tokenizer that decides token ids: its full serialisation (vocabulary,
    merges, normalisation, added tokens, post-processor), its special tokens and its own chat template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:  # a slow (Python) tokenizer: its vocabulary and added tokens are what we can see
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {key: str(getattr(tokenizer, key, None)) for key in NAMED_SPECIAL_TOKENS}
    specials["extra"] = [str(token) for token in getattr(tokenizer, "extra_special_tokens", []) or []]
    digest.update(json.dumps(specials, sort_keys=True).encode())
    template = getattr(tokenizer, "chat_template", None)
    digest.update(json.dumps(template, sort_keys=True, default=str).encode())
    return digest.hexdigest()
