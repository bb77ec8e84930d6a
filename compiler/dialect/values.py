"""Values as the Axolotl dialect reader judges them: whole numbers as JSON Schema counts them, equality as JSON sees
it, and one field's verdict worded the way validate words it. Split from normalize.py, which reads the keys."""

from __future__ import annotations

import json
from functools import cache
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from ..errors import KeyPath, Problem


def short(value: Any) -> str:
    """VALUE as a few words for a message: JSON, at most 40 characters."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def whole_number(value: Any) -> int | None:
    """VALUE as an int when it is a whole number (8, or 8.0 as JSON Schema counts it); None for anything else,
    true and false included."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# validate's words for a value of the wrong type.
_REASONS = {"int_type": "expected a whole number", "string_type": "expected a string"}


@cache
def _field_adapter(model: type[BaseModel], key: str) -> TypeAdapter[Any]:
    info = model.model_fields[key]
    bounded = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    return TypeAdapter(bounded, config=ConfigDict(strict=True, allow_inf_nan=False))


def field_problem(model: type[BaseModel], key: str, value: Any, where: KeyPath) -> Problem | None:
    """What MODEL's field KEY refuses in VALUE (worded as validate words it), at WHERE; None if it takes it."""
    whole = whole_number(value)
    try:
        _field_adapter(model, key).validate_python(value if whole is None else whole)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        reason = _REASONS.get(error["type"]) or str(error["msg"]).replace("Input should be", "must be")
        return Problem(where, f"{reason} (got {short(value)})")
    return None


def json_equal(left: Any, right: Any) -> bool:
    """Equality as JSON, and so JSON Schema's enum, sees it: 0 equals 0.0, but true equals only true (in Python
    True == 1, which read `expert_parallel_size: true` as Axolotl's default 1)."""
    if isinstance(left, bool) or isinstance(right, bool):
        return left is right
    if isinstance(left, (int, float)) and isinstance(right, (int, float)):
        return left == right
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(json_equal, left, right))
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(json_equal(left[key], right[key]) for key in left)
    return type(left) is type(right) and left == right
