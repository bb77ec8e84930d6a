"""What the compiler knows about model families: shapes, parameter counts and FSDP layer classes.

Used by resolution to estimate memory, to size DeepSpeed buckets and to pick the decoder layer
class FSDP wraps. Sources, in order: the local model's config.json, the built-in table below
(matched on the Hub id), the ``model_parameters`` hint.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

# Architecture (config.json "architectures"[0]) → decoder layer class FSDP wraps as one unit.
LAYER_CLASS_BY_ARCHITECTURE: dict[str, str] = {
    "LlamaForCausalLM": "LlamaDecoderLayer",
    "MistralForCausalLM": "MistralDecoderLayer",
    "MixtralForCausalLM": "MixtralDecoderLayer",
    "Qwen2ForCausalLM": "Qwen2DecoderLayer",
    "Qwen2MoeForCausalLM": "Qwen2MoeDecoderLayer",
    "Qwen3ForCausalLM": "Qwen3DecoderLayer",
    "Qwen3MoeForCausalLM": "Qwen3MoeDecoderLayer",
    "GemmaForCausalLM": "GemmaDecoderLayer",
    "Gemma2ForCausalLM": "Gemma2DecoderLayer",
    "Gemma3ForCausalLM": "Gemma3DecoderLayer",
    "Gemma3ForConditionalGeneration": "Gemma3DecoderLayer",
    "Phi3ForCausalLM": "Phi3DecoderLayer",
    "PhiForCausalLM": "PhiDecoderLayer",
    "GPTNeoXForCausalLM": "GPTNeoXLayer",
    "OlmoForCausalLM": "OlmoDecoderLayer",
}


@dataclass(frozen=True)
class ModelShape:
    """The numbers a memory estimate needs; parameters are computed from them."""

    architecture: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int | None = None
    num_experts: int = 1
    tie_embeddings: bool = False

    @property
    def attention_dims(self) -> tuple[int, int]:
        head_dim = self.head_dim or self.hidden_size // self.num_heads
        return self.num_heads * head_dim, self.num_kv_heads * head_dim

    def linear_layers(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of one decoder layer's linear projections."""
        q_dim, kv_dim = self.attention_dims
        h, i = self.hidden_size, self.intermediate_size
        attention = [("q_proj", h, q_dim), ("k_proj", h, kv_dim), ("v_proj", h, kv_dim), ("o_proj", q_dim, h)]
        mlp = [("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)] * self.num_experts
        return attention + mlp

    @property
    def parameters(self) -> int:
        per_layer = sum(fan_in * fan_out for _, fan_in, fan_out in self.linear_layers()) + 2 * self.hidden_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embeddings + self.hidden_size

    def lora_parameters(self, rank: int, target_modules: list[str] | None, all_linear: bool) -> int:
        targets = None if all_linear else set(target_modules or ["q_proj", "v_proj"])
        per_layer = sum(
            rank * (fan_in + fan_out)
            for name, fan_in, fan_out in self.linear_layers()
            if targets is None or name in targets
        )
        return self.num_layers * per_layer


def _shape(arch: str, h: int, layers: int, inter: int, heads: int, kv: int, vocab: int, **kw: Any) -> ModelShape:
    return ModelShape(arch, h, layers, inter, heads, kv, vocab, **kw)


_LLAMA, _MISTRAL, _QWEN2, _QWEN3 = "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"
_GEMMA, _GEMMA2, _GEMMA3, _PHI3 = "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM"

# family → {size label → shape}. Sizes as Hub ids spell them (lower case).
FAMILY_SHAPES: dict[str, dict[str, ModelShape]] = {
    "llama-3": {
        "1b": _shape(_LLAMA, 2048, 16, 8192, 32, 8, 128256, tie_embeddings=True),
        "3b": _shape(_LLAMA, 3072, 28, 8192, 24, 8, 128256, tie_embeddings=True),
        "8b": _shape(_LLAMA, 4096, 32, 14336, 32, 8, 128256),
        "70b": _shape(_LLAMA, 8192, 80, 28672, 64, 8, 128256),
    },
    "llama-2": {
        "7b": _shape(_LLAMA, 4096, 32, 11008, 32, 32, 32000),
        "13b": _shape(_LLAMA, 5120, 40, 13824, 40, 40, 32000),
        "70b": _shape(_LLAMA, 8192, 80, 28672, 64, 8, 32000),
    },
    "mistral": {"7b": _shape(_MISTRAL, 4096, 32, 14336, 32, 8, 32768)},
    "mixtral": {"8x7b": _shape("MixtralForCausalLM", 4096, 32, 14336, 32, 8, 32000, num_experts=8)},
    "qwen2.5": {
        "0.5b": _shape(_QWEN2, 896, 24, 4864, 14, 2, 151936, tie_embeddings=True),
        "1.5b": _shape(_QWEN2, 1536, 28, 8960, 12, 2, 151936, tie_embeddings=True),
        "3b": _shape(_QWEN2, 2048, 36, 11008, 16, 2, 151936, tie_embeddings=True),
        "7b": _shape(_QWEN2, 3584, 28, 18944, 28, 4, 152064),
        "14b": _shape(_QWEN2, 5120, 48, 13824, 40, 8, 152064),
        "32b": _shape(_QWEN2, 5120, 64, 27648, 40, 8, 152064),
        "72b": _shape(_QWEN2, 8192, 80, 29568, 64, 8, 152064),
    },
    "qwen3": {
        "0.6b": _shape(_QWEN3, 1024, 28, 3072, 16, 8, 151936, head_dim=128, tie_embeddings=True),
        "1.7b": _shape(_QWEN3, 2048, 28, 6144, 16, 8, 151936, head_dim=128, tie_embeddings=True),
        "4b": _shape(_QWEN3, 2560, 36, 9728, 32, 8, 151936, head_dim=128, tie_embeddings=True),
        "8b": _shape(_QWEN3, 4096, 36, 12288, 32, 8, 151936, head_dim=128),
        "14b": _shape(_QWEN3, 5120, 40, 17408, 40, 8, 151936, head_dim=128),
        "32b": _shape(_QWEN3, 5120, 64, 25600, 64, 8, 151936, head_dim=128),
    },
    "gemma": {
        "2b": _shape(_GEMMA, 2048, 18, 16384, 8, 1, 256000, head_dim=256, tie_embeddings=True),
        "7b": _shape(_GEMMA, 3072, 28, 24576, 16, 16, 256000, head_dim=256, tie_embeddings=True),
    },
    "gemma-2": {
        "2b": _shape(_GEMMA2, 2304, 26, 9216, 8, 4, 256000, head_dim=256, tie_embeddings=True),
        "9b": _shape(_GEMMA2, 3584, 42, 14336, 16, 8, 256000, head_dim=256, tie_embeddings=True),
        "27b": _shape(_GEMMA2, 4608, 46, 36864, 32, 16, 256000, head_dim=128, tie_embeddings=True),
    },
    "gemma-3": {
        "1b": _shape(_GEMMA3, 1152, 26, 6912, 4, 1, 262144, head_dim=256, tie_embeddings=True),
        "4b": _shape(_GEMMA3, 2560, 34, 10240, 8, 4, 262208, head_dim=256, tie_embeddings=True),
        "12b": _shape(_GEMMA3, 3840, 48, 15360, 16, 8, 262208, head_dim=256, tie_embeddings=True),
        "27b": _shape(_GEMMA3, 5376, 62, 21504, 32, 16, 262208, head_dim=128, tie_embeddings=True),
    },
    "phi-3": {
        "mini": _shape(_PHI3, 3072, 32, 8192, 32, 32, 32064),
        "medium": _shape(_PHI3, 5120, 40, 17920, 40, 10, 32064),
    },
}

# Hub-id patterns → family, most specific first. Matched against the lower-cased id.
_FAMILY_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"llama-?3"), "llama-3"),
    (re.compile(r"llama-?2"), "llama-2"),
    (re.compile(r"mixtral"), "mixtral"),
    (re.compile(r"mistral"), "mistral"),
    (re.compile(r"qwen3"), "qwen3"),
    (re.compile(r"qwen2"), "qwen2.5"),
    (re.compile(r"gemma-?3"), "gemma-3"),
    (re.compile(r"gemma-?2"), "gemma-2"),
    (re.compile(r"gemma"), "gemma"),
    (re.compile(r"phi-?3"), "phi-3"),
]
_SIZE = re.compile(r"(?<![\d.])(\d+x\d+b|\d+(?:\.\d+)?b|mini|medium)(?![a-z0-9])")


def shape_from_table(model_id: str) -> tuple[str, ModelShape] | None:
    """Match a Hub id like ``meta-llama/Llama-3.1-8B-Instruct`` to (label, shape) from the table."""
    name = model_id.lower().rsplit("/", 1)[-1]
    for pattern, family in _FAMILY_PATTERNS:
        if pattern.search(name):
            sizes = FAMILY_SHAPES[family]
            for match in _SIZE.finditer(name):
                if match.group(1) in sizes:
                    return f"{family} {match.group(1).upper()}", sizes[match.group(1)]
            return None
    return None


# The sizes a config.json gives, and the largest each may be: far above any model, low enough that the arithmetic of
# an estimate stays ordinary numbers (a hidden_size of 1e200, or of -64, is a broken file, not a model).
CONFIG_JSON_BOUNDS = {"hidden_size": 1_000_000, "num_hidden_layers": 10_000, "intermediate_size": 10_000_000,
                      "num_attention_heads": 100_000, "num_key_value_heads": 100_000, "vocab_size": 100_000_000,
                      "head_dim": 100_000, "num_local_experts": 100_000, "num_experts": 100_000}


def config_json_problems(config: Any) -> list[tuple[tuple[str, ...], str]]:
    """(key path, message) for each size a local config.json gives that no model could have."""
    if not isinstance(config, dict):
        return [((), f"a model's config.json is a JSON object, not {type(config).__name__}")]
    problems = []
    for prefix, section in (((), config), (("text_config",), config.get("text_config"))):
        if not isinstance(section, dict):
            continue
        for key, bound in CONFIG_JSON_BOUNDS.items():
            value = section.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
                text = json.dumps(value)
                shown = text if len(text) <= 30 else text[:27] + "..."
                problems.append(((*prefix, key), f"must be a whole number from 1 to {bound:,} (got {shown})"))
    return problems


def shape_from_config_json(config: dict[str, Any]) -> ModelShape | None:
    """Read a Hugging Face config.json (as a dict); None when it lacks the decoder fields."""
    text = config.get("text_config", config)  # multimodal wrappers keep the decoder in text_config
    try:
        architectures = config.get("architectures") or [""]
        return ModelShape(
            architecture=str(architectures[0]),
            hidden_size=int(text["hidden_size"]),
            num_layers=int(text["num_hidden_layers"]),
            intermediate_size=int(text["intermediate_size"]),
            num_heads=int(text["num_attention_heads"]),
            num_kv_heads=int(text.get("num_key_value_heads") or text["num_attention_heads"]),
            vocab_size=int(text["vocab_size"]),
            head_dim=int(text["head_dim"]) if text.get("head_dim") else None,
            num_experts=int(text.get("num_local_experts") or text.get("num_experts") or 1),
            tie_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        )
    except (KeyError, TypeError, ValueError):
        return None


_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmbt]?)\s*$", re.IGNORECASE)
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}
MAX_MODEL_PARAMETERS = 10**15  # 1000T: hundreds of times the largest model trained so far


def parse_parameter_count(value: str | int) -> int | None:
    """``8B`` → 8_000_000_000, ``350M`` → 350_000_000, ``1234`` → 1234; None when unreadable or outside 1 to
    MAX_MODEL_PARAMETERS (a count no model has would reach the memory estimate and the sbatch arithmetic)."""
    if isinstance(value, int):
        count = value
    else:
        match = _COUNT.match(value)
        if not match:
            return None
        number = float(match.group(1))  # 400 digits read as a float are infinite
        if not math.isfinite(number):
            return None
        count = int(number * _SCALE[match.group(2).lower()])
    return count if 0 < count <= MAX_MODEL_PARAMETERS else None


def layer_class_for(architecture: str | None) -> str | None:
    return LAYER_CLASS_BY_ARCHITECTURE.get(architecture or "")
