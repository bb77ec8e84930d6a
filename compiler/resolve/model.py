"""What model is being trained: architecture, parameter count and shape, and where we learnt them."""

from __future__ import annotations

import math
from typing import Any

from ..models import (
    LAYER_CLASS_BY_ARCHITECTURE,
    ModelShape,
    parse_parameter_count,
    shape_from_config_json,
    shape_from_table,
)
from ..plan import Decision, ModelInfo
from ..spec import Spec


def resolve_model(spec: Spec, local_config: dict[str, Any] | None) -> tuple[ModelInfo, ModelShape | None, Decision]:
    """Sources in order: the local model's config.json, the built-in table, the model_parameters hint."""
    shape, source = None, "unknown"
    if local_config is not None:
        shape = shape_from_config_json(local_config)
        source = "local config.json" if shape else "unknown"
    if shape is None:
        found = shape_from_table(spec.base_model)
        if found:
            label, shape = found
            source = f"built-in table ({label})"

    parameters = shape.parameters if shape else None
    if spec.model_parameters is not None:
        hinted = parse_parameter_count(spec.model_parameters)
        if shape is None:
            parameters, source = hinted, "model_parameters hint"
            shape = _shape_from_count(hinted) if hinted else None

    architecture = shape.architecture if shape and shape.architecture else None
    if spec.model_type in LAYER_CLASS_BY_ARCHITECTURE:
        architecture = spec.model_type  # an explicit architecture class name wins
    elif architecture is None or architecture == "unknown":
        architecture = None

    trainable = None
    if shape is not None and parameters is not None:
        if spec.adapter:
            trainable = shape.lora_parameters(spec.lora_r, spec.lora_target_modules, spec.lora_target_linear)
        else:
            trainable = parameters
    info = ModelInfo(
        architecture=architecture,
        parameters=parameters,
        parameters_source=source,
        hidden_size=shape.hidden_size if shape else None,
        num_layers=shape.num_layers if shape else None,
        trainable_parameters=trainable,
    )
    if parameters:
        value = f"{format_count(parameters)} parameters"
        reason = f"read from the {source}" + (f"; architecture {architecture}" if architecture else "")
    else:
        value, reason = "unknown size", "not local, not in the built-in table, no model_parameters hint"
    return info, shape, Decision("model", value, reason)


def _shape_from_count(parameters: int) -> ModelShape:
    """A Llama-like shape of roughly the hinted size, for the activation part of the estimate only."""
    layers = 32 if parameters > 3e9 else 24
    hidden = int(math.sqrt(parameters / (12 * layers)) // 128 * 128) or 128
    return ModelShape("unknown", hidden, layers, int(hidden * 3.5), max(hidden // 128, 1),
                      max(hidden // 128, 1), 32000)


def format_count(count: int) -> str:
    """8_030_261_248 → "8.03B", 1_246_720 → "1.25M"."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.2f}{suffix}"
    return str(count)
