"""How the base model's files are read: the Hub revision, overrides of its configuration, a transformers
quantisation config, and the size its embedding matrix is rounded to.

These are the plan's ``model`` fields that every load of the base shares (training, merging, inference), kept
out of model.py so that each of those callers builds the same ``from_pretrained`` arguments. Nothing here
has a default of its own: the plan says which revision, which overrides, which quantisation config.
"""

from __future__ import annotations

import inspect
import logging
import math
from pathlib import Path
from typing import Any

from ..schemas.run_plan import ModelPlan
from .errors import RuntimeUserError

log = logging.getLogger(__name__)


class PretrainedOptionError(RuntimeUserError):
    """A model-loading option of the plan cannot be applied (an override the configuration lacks, a
    quantisation class transformers does not have); the message names the option."""


def is_local_folder(source: str) -> bool:
    return Path(source).expanduser().is_dir()


def revision_kwargs(source: str, revision: str | None) -> dict[str, Any]:
    """``{"revision": …}`` for a hub id; nothing for a local folder, which has no revisions to choose from
    (revision_decision says so in the run's record)."""
    if revision is None or is_local_folder(source):
        return {}
    return {"revision": revision}


def revision_decision(model: ModelPlan) -> str | None:
    """What became of the plan's revision on this machine, for the runtime decisions; None without one.

    Whether base_model (or tokenizer) is a folder or a hub id is only known where the run lands: a hub-style
    name that exists as a folder there is read from the folder, and its revision cannot apply."""
    if model.revision is None:
        return None
    local = [name for name, source in (("base_model", model.base_model), ("tokenizer", model.tokenizer))
             if is_local_folder(source)]
    if not local:
        return f"{model.revision} (from the Hub)"
    return f"ignored for {' and '.join(local)}: a local folder has no revisions"


def overridden_config(model: ModelPlan, source: str, *, revision: dict[str, Any]) -> Any:
    """The base model's configuration with the plan's config_overrides set on it, to build the model from;
    None when there are none (from_pretrained then reads the configuration itself). An override naming an
    attribute the configuration does not have is an error: transformers would keep it without effect."""
    if not model.config_overrides:
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=model.trust_remote_code, **revision)
    unknown = sorted(key for key in model.config_overrides if not hasattr(config, key))
    if unknown:
        raise PretrainedOptionError(
            f"model_config: {type(config).__name__} ({model.base_model}) has no attribute "
            f"{', '.join(unknown)}; only existing attributes can be overridden")
    refused = []
    for key, value in model.config_overrides.items():
        try:
            setattr(config, key, value)
        except (TypeError, ValueError) as exc:  # transformers 5 checks the types of its config fields
            refused.append(f"{key}={value!r} ({str(exc).strip().splitlines()[-1].strip()})")
    if refused:
        raise PretrainedOptionError(f"model_config: {type(config).__name__} refuses {'; '.join(refused)}")
    log.info("model configuration overrides: %s", ", ".join(f"{k}={v!r}" for k, v in model.config_overrides.items()))
    return config


def build_quantization_config(spec: dict[str, Any] | None) -> Any:
    """``getattr(transformers, spec["class"])(**spec["kwargs"])``, for a class transformers has and
    arguments its constructor names (several of these classes swallow unknown keyword arguments, so a
    misspelt one would otherwise be ignored); None without a spec."""
    if spec is None:
        return None
    import transformers
    from transformers.utils.quantization_config import QuantizationConfigMixin

    name, kwargs = spec["class"], dict(spec["kwargs"])  # the compiler writes both keys
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, QuantizationConfigMixin)):
        raise PretrainedOptionError(f"model_quantization_config: transformers {transformers.__version__} has no "
                                    f"quantisation config class {name!r} (e.g. Mxfp4Config)")
    parameters = inspect.signature(cls).parameters
    named = {key for key, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    unknown = sorted(set(kwargs) - named)
    if unknown:
        raise PretrainedOptionError(f"model_quantization_config_kwargs: {name} takes no {', '.join(unknown)} "
                                    f"(it takes {', '.join(sorted(named))})")
    return cls(**kwargs)


def dequantizing(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """The quantisation spec to read the base with when its real weights are needed (merging an adapter into
    them, generating from the merged model): the same class with dequantize on, where the class has that
    option (Mxfp4Config); otherwise none at all, which reads the weights as stored."""
    if spec is None:
        return None
    import transformers

    cls = getattr(transformers, str(spec["class"]), None)
    if cls is None or "dequantize" not in inspect.signature(cls).parameters:
        return None
    return {"class": spec["class"], "kwargs": {**spec["kwargs"], "dequantize": True}}


def quantization_change(quantization_config: Any, before: dict[str, Any], module: Any) -> str | None:
    """What transformers changed in the quantisation config while loading on this machine (it turns MXFP4
    into a dequantised load where the GPU, triton or the kernels package is missing), as one sentence; None
    when nothing changed. ``before``: ``vars(config)`` as it was built."""
    if quantization_config is None:
        return None
    quantizer = getattr(module, "hf_quantizer", None)
    after = vars(getattr(quantizer, "quantization_config", quantization_config))
    changed = {key: value for key, value in after.items() if key in before and before[key] != value}
    if not changed:
        return None
    changes = ", ".join(f"{key}: {before[key]!r} → {value!r}" for key, value in sorted(changed.items()))
    return f"transformers changed {type(quantization_config).__name__} on this machine ({changes})"


def embedding_rows(vocab_size: int, multiple: int | None) -> int:
    """The embedding matrix's row count for a tokenizer of ``vocab_size`` tokens: rounded up to ``multiple``
    when the plan asks (Axolotl's resize_token_embeddings_to_32x), else exactly the vocabulary."""
    if multiple is None:
        return vocab_size
    return math.ceil(vocab_size / multiple) * multiple
