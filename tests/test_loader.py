"""YAML loading: values, locations, floats written the Axolotl way, duplicate keys, syntax errors."""

from __future__ import annotations

import pytest

from tunefile.compiler.errors import ConfigError
from tunefile.compiler.loader import Mark, load_document


def test_marks_locate_keys_and_values() -> None:
    doc = load_document("base_model: x\ndatasets:\n  - path: a\n    type: alpaca\n", "c.yml")
    assert doc.data == {"base_model": "x", "datasets": [{"path": "a", "type": "alpaca"}]}
    assert doc.locate(("datasets", 0, "type"), at_key=True) == Mark(4, 5)
    assert doc.locate(("datasets", 0, "type")) == Mark(4, 11)
    assert doc.locate(("base_model",)) == Mark(1, 13)


def test_missing_path_falls_back_to_nearest_ancestor() -> None:
    doc = load_document("fsdp_config:\n  offload_params: true\n", "c.yml")
    assert doc.locate(("fsdp_config", "nope"), at_key=True) == Mark(1, 1)


@pytest.mark.parametrize("text, value", [("2e-4", 2e-4), ("1E5", 1e5), ("-3.5e+2", -350.0), ("0.0002", 2e-4)])
def test_scientific_floats_are_numbers(text: str, value: float) -> None:
    assert load_document(f"learning_rate: {text}\n", "c.yml").data["learning_rate"] == pytest.approx(value)


def test_duplicate_key_is_an_error_with_both_lines() -> None:
    with pytest.raises(ConfigError) as caught:
        load_document("lora_r: 8\nlora_alpha: 16\nlora_r: 32\n", "c.yml")
    (problem,) = caught.value.problems
    assert (problem.line, problem.column) == (3, 1)
    assert "first set on line 1" in problem.message


def test_syntax_error_is_located() -> None:
    with pytest.raises(ConfigError) as caught:
        load_document("base_model: x\ndatasets:\n  - path: a\n   type: alpaca\n", "c.yml")
    (problem,) = caught.value.problems
    assert problem.file == "c.yml" and problem.line == 4
    assert problem.message.startswith("YAML syntax error")


def test_empty_file_is_an_empty_mapping() -> None:
    assert load_document("", "c.yml").data == {}
