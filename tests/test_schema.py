"""The checked-in JSON Schema: current, complete, and agreeing with the validator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from helpers import MINIMAL, REPO
from tunefile.compiler.errors import ConfigError
from tunefile.compiler.loader import load_document
from tunefile.compiler.schema import README_END, README_START, reference_markdown, schema_text
from tunefile.compiler.validate import validate_document

SCHEMA_FILE = REPO / "schemas" / "tunefile.schema.json"


def checked_in() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def test_checked_in_schema_matches_the_models() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == schema_text(), (
        "schemas/tunefile.schema.json drifted from compiler/spec.py; run: make schema"
    )


def test_schema_is_valid_2020_12() -> None:
    schema = checked_in()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def all_properties(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any], bool]]:
    found = [(name, node, name in schema.get("required", [])) for name, node in schema["properties"].items()]
    for model in schema["$defs"].values():
        found += [(name, node, name in model.get("required", [])) for name, node in model["properties"].items()]
    return found


def kinds(node: dict[str, Any]) -> set[str]:
    options = node.get("anyOf", [node])
    return {option.get("type", "ref" if "$ref" in option else "?") for option in options}


def test_every_property_has_description_type_default_and_range() -> None:
    for name, node, required in all_properties(checked_in()):
        assert node.get("description"), f"{name} has no description"
        if "x-axolotl" in node:  # Axolotl's other keys: described, and limited to what the validator accepts
            continue
        assert "?" not in kinds(node), f"{name} has no type"
        assert required or "default" in node, f"{name} is optional but has no default"
        for option in node.get("anyOf", [node]):
            if option.get("type") in ("integer", "number"):
                assert {"minimum", "exclusiveMinimum", "enum"} & set(option), f"{name} has no range"


GOOD = sorted((REPO / "tests" / "golden_configs").glob("*.yml")) + [
    REPO / "examples" / name for name in ("demo.yml", "llama3-lora.yml", "multi-gpu-fsdp2.yml")
]
BAD = {
    "unknown top-level key": MINIMAL + "lora_alpah: 3\n",
    "unknown nested key": MINIMAL + "fsdp_config:\n  offload: true\n",
    "unknown dataset key": MINIMAL + "    tpye: alpaca\n",
    "bad enum": MINIMAL + "optimizer: adam\n",
    "out of range": MINIMAL + "val_set_size: 1.5\n",
    "wrong type": MINIMAL + "micro_batch_size: two\n",
    "missing required": "datasets:\n  - path: a\n    type: alpaca\n",
}


@pytest.mark.parametrize("config", GOOD, ids=lambda path: path.stem)
def test_jsonschema_accepts_what_the_validator_accepts(config: Path) -> None:
    document = load_document(config.read_text(encoding="utf-8"), str(config))
    validate_document(document)
    jsonschema.validate(document.data, checked_in(), cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize("text", BAD.values(), ids=list(BAD))
def test_jsonschema_rejects_what_the_validator_rejects(text: str) -> None:
    document = load_document(text, "c.yml")
    with pytest.raises(ConfigError):
        validate_document(document)
    assert list(jsonschema.Draft202012Validator(checked_in()).iter_errors(document.data))


def test_readme_config_reference_is_current() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start, end = readme.index(README_START) + len(README_START), readme.index(README_END)
    assert readme[start:end] == "\n" + reference_markdown(), "README config reference is stale; run: make schema"
