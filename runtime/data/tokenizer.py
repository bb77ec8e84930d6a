"""Load the run's tokenizer (``model.tokenizer``: a local folder or a hub id at the plan's revision,
offline-aware; the class ``model.tokenizer_class`` names, else ``AutoTokenizer``, or with ``tokenizer_backend:
mistral_common`` Mistral's own tokenizer, see runtime/mistral_tokenizer.py) and add the plan's
``special_tokens`` and ``tokens``. The model side resizes its embeddings when ``len(tokenizer)`` exceeds its
vocabulary.

The plan's revision (Axolotl's revision_of_model) applies to the tokenizer too, as in Axolotl, when it loads from
the Hub; a local folder has no revisions, which the log says once."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from ...schemas.run_plan import ModelPlan
from .errors import DataError

log = logging.getLogger(__name__)
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
TRUE_WORDS = ("1", "true", "yes", "on")
# tokenizer_config.json's names of transformers' generic fast tokenizer (the second is its name in transformers 5).
GENERIC_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
# Model types for which AutoTokenizer keeps a generic tokenizer_class as it is (transformers 5 replaces it for a
# list of models whose Hub files name the wrong class; llama is not among them, and is Llama 3's type).
GENERIC_MODEL_TYPES = ("llama",)


def is_offline(offline: bool) -> bool:
    """Offline when the plan says so (``offline``) or the environment does (launch.sh exports these before
    Python)."""
    if offline:
        return True
    return any(os.environ.get(name, "").strip().lower() in TRUE_WORDS for name in OFFLINE_VARIABLES)


def tokenizer_class(name: str | None) -> Any:
    """The transformers class ``name`` (``model.tokenizer_class``, e.g. ``LlamaTokenizerFast``); None:
    ``AutoTokenizer``, which reads the class from the tokenizer's own files."""
    import transformers

    if name is None:
        return transformers.AutoTokenizer
    try:
        found = getattr(transformers, name, None)
    except Exception as exc:  # noqa: BLE001 - transformers' lazy import of a class whose backend is missing
        raise DataError(f"tokenizer_class {name}: cannot be imported from transformers ({exc})") from None
    is_tokenizer = isinstance(found, type) and issubclass(found, transformers.PreTrainedTokenizerBase)
    # In this order: touching transformers.AutoTokenizer imports its configuration classes, and they torch.
    if not is_tokenizer and found is not transformers.AutoTokenizer:
        raise DataError(f"tokenizer_class {name}: transformers has no tokenizer class of that name "
                        "(e.g. AutoTokenizer, PreTrainedTokenizerFast, LlamaTokenizerFast)")
    return found


def generic_tokenizer_folder(folder: Path) -> bool:
    """Whether AutoTokenizer would load this local folder with transformers' generic fast tokenizer class
    (``TokenizersBackend``) and nothing more: its tokenizer_config.json names the generic class, it brings no
    code of its own (auto_map), and its config.json, if any, is of a model type whose tokenizer transformers
    does not substitute (``GENERIC_MODEL_TYPES``). Llama 3's checkpoints are such folders. Loading the class
    directly then gives the same tokenizer without importing AutoTokenizer, whose configuration classes import
    torch (~400 MiB and seconds that tokenising does not need)."""
    try:
        settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        config_file = folder / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    except (OSError, ValueError):
        return False
    return (isinstance(settings, dict) and isinstance(config, dict)
            and settings.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES and "auto_map" not in settings
            and "auto_map" not in config and config.get("model_type", "llama") in GENERIC_MODEL_TYPES)


def load_tokenizer(model: ModelPlan, *, offline: bool) -> tuple[Any, int]:
    """(tokenizer, number of tokens added to its vocabulary by ``special_tokens`` and ``tokens``).

    ``offline`` is the plan's flag; the HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE environment counts too."""
    source = model.tokenizer
    local = Path(source).expanduser()
    offline = is_offline(offline)
    revision: dict[str, Any] = {}
    if local.is_dir():
        name, local_files_only = str(local), True
        if model.revision is not None:
            log.warning("revision_of_model %s: ignored for the tokenizer, %s is a local folder", model.revision, source)
    elif source.startswith((".", "/", "~")):
        raise DataError(f"tokenizer {source}: no such folder")
    else:
        name, local_files_only = source, offline
        if model.revision is not None:
            revision["revision"] = model.revision
    try:
        if model.tokenizer_backend == "mistral_common":
            tokenizer = load_mistral_common_tokenizer(model, name, local_files_only=local_files_only,
                                                      revision=revision)
        else:
            wanted = model.tokenizer_class
            if wanted is None and local.is_dir() and generic_tokenizer_folder(local):
                wanted = "PreTrainedTokenizerFast"  # what AutoTokenizer would load, without importing torch
            tokenizer = tokenizer_class(wanted).from_pretrained(
                name, trust_remote_code=model.trust_remote_code, local_files_only=local_files_only, **revision)
    except (OSError, ValueError) as exc:
        where = "offline and not in the Hugging Face cache" if offline else "cannot be loaded"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"tokenizer {source}: {where} ({first_line})") from None
    return tokenizer, add_config_tokens(tokenizer, model.special_tokens, model.tokens)


def load_mistral_common_tokenizer(model: ModelPlan, name: str, *, local_files_only: bool,
                                  revision: dict[str, Any]) -> Any:
    """Mistral's own tokenizer for ``tokenizer_backend: mistral_common``. Its problems (the package missing, a
    tokenizer it cannot serve) are errors, never a fallback to another tokenizer, which would change the data."""
    from ..mistral_tokenizer import MistralTokenizerError, load_mistral_common

    if model.tokenizer_class is not None:
        log.warning("tokenizer_type %s: not used, tokenizer_use_mistral_common loads mistral-common's tokenizer (as "
                    "Axolotl does)", model.tokenizer_class)
    try:
        return load_mistral_common(name, local_files_only=local_files_only, revision=revision)
    except MistralTokenizerError as exc:
        raise DataError(str(exc)) from None


def add_config_tokens(tokenizer: Any, special_tokens: dict[str, Any] | None,
                      tokens: tuple[str, ...] | list[str] | None) -> int:
    """Set the named special tokens, add the additional special tokens and plain tokens; return how many new
    vocabulary entries that made."""
    before = len(tokenizer)
    if special_tokens:
        named = {key: value for key in NAMED_SPECIAL_TOKENS if (value := special_tokens.get(key))
                 and getattr(tokenizer, key, None) != value}
        if named:
            tokenizer.add_special_tokens(named)
        extra = special_tokens.get("additional_special_tokens")
        if extra:
            # Extend, not replace: the tokenizer's own extra tokens (chat markers) must stay special.
            tokenizer.add_special_tokens({"additional_special_tokens": list(extra)},
                                         replace_extra_special_tokens=False)
    if tokens:
        tokenizer.add_tokens(list(tokens))
    return len(tokenizer) - before


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of everything in the tokenizer that decides token ids: its full serialisation (vocabulary,
    merges, normalisation, added tokens, post-processor), its special tokens and its own chat template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    own_file = getattr(tokenizer, "fingerprint", None)  # a mistral-common tokenizer: its tekken.json's digest
    if backend is not None:
        digest.update(backend.to_str().encode())
    elif isinstance(own_file, str):
        digest.update(own_file.encode())
    else:  # a slow (Python) tokenizer: its vocabulary and added tokens are what we can see
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {key: str(getattr(tokenizer, key, None)) for key in NAMED_SPECIAL_TOKENS}
    extra = getattr(tokenizer, "extra_special_tokens", None)
    specials["extra"] = [str(token) for token in extra] if extra else []
    digest.update(json.dumps(specials, sort_keys=True).encode())
    template = getattr(tokenizer, "chat_template", None)
    digest.update(json.dumps(template, sort_keys=True, default=str).encode())
    return digest.hexdigest()
