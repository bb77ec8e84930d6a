"""Document → Spec: schema validation with located, friendly problems, then the cross-field rules.

The pydantic models in ``spec.py`` are the schema (``schemas/tunefile.schema.json`` is their
JSON Schema projection, kept in sync by a test). Validating through them gives every error at
once with its key path; here each pydantic error becomes a Problem a human can act on:
unknown keys get a "did you mean", union errors collapse into one line, missing keys point at
their parent mapping.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from .dialect.normalize import axolotl_catalogue, read_axolotl
from .errors import ConfigError, KeyPath, Problem, suggest
from .loader import Document
from .rules import check_rules
from .spec import Spec

SPELLING_HINTS = 50  # unknown keys that get a "did you mean"

def validate_document(document: Document) -> tuple[Spec, list[Problem]]:
    """Return the Spec and its warnings, or raise ConfigError with every problem found."""
    spec, warnings, _ = validate_with_notes(document)
    return spec, warnings


def validate_with_notes(document: Document) -> tuple[Spec, list[Problem], list[Problem]]:
    """As validate_document, plus the notes of reading Axolotl's dialect (accepted keys, rewritten spellings),
    which ``explain`` shows."""
    data = document.data
    if not isinstance(data, dict):
        raise ConfigError([Problem((), "a config must be a mapping of keys to values, e.g. `base_model: …`")])

    reading = read_axolotl(data)
    for new, old in reading.moved.items():
        for marks in (document.key_marks, document.value_marks):
            if old in marks and new not in marks:
                marks[new] = marks[old]
    document.written_as.update(reading.moved)
    problems: list[Problem] = list(reading.problems)
    supported = reading.data
    if not supported.get("datasets") and not supported.get("pretraining_dataset"):
        problems.append(Problem((), "required key `datasets` is missing",
                                hint="or `pretraining_dataset:` for completion text streamed during training"))

    try:
        spec = Spec.model_validate(supported)
    except ValidationError as exc:
        schema_problems = _problems_from_pydantic(exc, supported)
        problems.extend(schema_problems)
        problems.extend(_rules_on_valid_part(supported, schema_problems))
        raise ConfigError(problems) from None

    errors, warnings = check_rules(spec)
    if problems or errors:
        raise ConfigError(problems + errors)
    return spec, warnings, reading.notes


_PLACEHOLDERS = {"base_model": "unknown", "datasets": [{"path": "unknown", "type": "completion"}]}


def _rules_on_valid_part(data: dict[str, Any], schema_problems: list[Problem]) -> list[Problem]:
    """Cross-field errors among the keys that passed the schema, so one round shows everything."""
    broken = {problem.path[0] if problem.path else None for problem in schema_problems}
    if None in broken:
        return []
    valid_part = {key: value for key, value in data.items() if key not in broken}
    for key, placeholder in _PLACEHOLDERS.items():
        if key == "datasets" and valid_part.get("pretraining_dataset"):
            continue  # a pretraining config has no datasets; a placeholder would contradict it
        if key in broken or key not in valid_part:
            valid_part[key] = placeholder
    try:
        spec = Spec.model_validate(valid_part)
    except ValidationError:
        return []
    errors, _ = check_rules(spec)
    replaced = {key for key in _PLACEHOLDERS if valid_part.get(key) is _PLACEHOLDERS[key]}
    return [error for error in errors if error.path and error.path[0] not in broken | replaced]


def _problems_from_pydantic(exc: ValidationError, data: Any) -> list[Problem]:
    grouped: dict[KeyPath, list[dict[str, Any]]] = {}
    for error in exc.errors(include_url=False):
        path = _document_path(error["loc"], data, error["type"])
        grouped.setdefault(path, []).append(error)

    problems = []
    hints_left = SPELLING_HINTS
    for path, errors in grouped.items():
        kinds = {error["type"] for error in errors}
        if "extra_forbidden" in kinds:
            # A "did you mean" costs a fuzzy match against every known key: the first ones get one, a file of
            # hundreds of unknown keys (not a config with typos) is reported without.
            hint = _spelling_hint(path) if hints_left > 0 else ""
            hints_left -= 1
            problems.append(Problem(path, "unknown key" + hint, at_key=True))
        elif "missing" in kinds:
            problems.append(Problem(path[:-1], f"required key `{path[-1]}` is missing"))
        else:
            value = _value_at(data, path)
            messages = sorted({_message(error) for error in errors})
            # Union members each report; "expected a or expected b" reads as "expected a or b".
            messages = messages[:1] + [message.removeprefix("expected ") for message in messages[1:]]
            problems.append(Problem(path, f"{' or '.join(messages)} (got {_show(value)})"))
    return problems


def _document_path(loc: tuple[Any, ...], data: Any, error_type: str) -> KeyPath:
    """Drop pydantic's union-member tags from a location so that it indexes the document."""
    path: list[str | int] = []
    node = data
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if isinstance(node, dict) and part in node:
            node = node[part]
            path.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            path.append(part)
        elif last and error_type == "missing":
            path.append(part)
    return tuple(path)


def _message(error: dict[str, Any]) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected', '')}"
    if kind in ("bool_type", "int_type", "float_type", "string_type", "list_type", "dict_type", "model_type"):
        return "expected " + {"bool_type": "true or false", "int_type": "a whole number", "float_type": "a number",
                              "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
                              "model_type": "a mapping"}[kind]
    if kind == "too_short" and ctx.get("min_length"):
        return f"needs at least {ctx['min_length']} item(s)"
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return "must not be empty"
    if kind in ("less_than_equal", "greater_than_equal", "less_than", "greater_than") and "Input should be" in str(
            error["msg"]):  # "must be less than or equal to 1000000000" reads better with its digits grouped
        bound = next(iter(ctx.values()), None)
        if isinstance(bound, int) and not isinstance(bound, bool) and abs(bound) >= 10_000:
            return str(error["msg"]).replace("Input should be", "must be").replace(str(bound), f"{bound:,}")
    return str(error["msg"]).replace("Input should be", "must be").replace("Value error, ", "")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _value_at(data: Any, path: KeyPath) -> Any:
    for part in path:
        data = data[part]
    return data


def _spelling_hint(path: KeyPath) -> str:
    """A "did you mean" only for a likely misspelling of a key at the same level (tunefile's or Axolotl's),
    never a jump to a key with another meaning."""
    word, ours = str(path[-1]), _field_names_at(path[:-1])
    catalogue = axolotl_catalogue()
    axolotl = {0: catalogue.top_level}.get(len(path) - 1) or (
        catalogue.fsdp_config if path[0] == "fsdp_config" else catalogue.datasets)
    match = suggest(word, [*ours, *axolotl], cutoff=0.8)
    if match is None:
        return ""
    if match in ours:
        return f"; did you mean {match}?"
    return f"; did you mean {match}? (an Axolotl key tunefile does not support)"


def _field_names_at(path: KeyPath) -> list[str]:
    """Names the model at ``path`` accepts (for "did you mean"), walking the Spec's field types."""
    model: type[BaseModel] | None = Spec
    for part in path:
        if model is None:
            return []
        if isinstance(part, int):
            continue  # list index: same item model
        field = model.model_fields.get(str(part))
        model = _model_in(field.annotation) if field else None
    return list(model.model_fields) if model else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found:
            return found
    return None
