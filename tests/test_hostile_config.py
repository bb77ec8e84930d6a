"""Hostile config files (issue 14): every one is refused with exit 2 and a FILE:LINE:COL line, in bounded work,
with no traceback and nothing written. The time and memory figures are measured by bench/hostile_input.py."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from helpers import MINIMAL, run_cli, write
from tunefile.compiler import loader
from tunefile.compiler.errors import ConfigError
from tunefile.compiler.loader import load_document


def compile_refuses(tmp_path: Path, config: Path) -> list[str]:
    """Compile ``config`` and check the promise: exit 2, no traceback, nothing written. Returns stderr's lines."""
    out = tmp_path / "bundle"
    code, _, stderr = run_cli("compile", str(config), "-o", str(out))
    assert code == 2, stderr
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    assert not out.exists()
    assert stderr.splitlines()[-1].endswith("nothing was written.")
    return stderr.splitlines()


def located(lines: list[str], name: str) -> list[tuple[int, int, str]]:
    """(line, column, rest) of every ``NAME:LINE:COL: error: …`` line."""
    pattern = re.compile(re.escape(name) + r":(\d+):(\d+): error: (.*)")
    found = [pattern.fullmatch(line) for line in lines]
    return [(int(match[1]), int(match[2]), match[3]) for match in found if match]


def problem_of(text: str) -> tuple[int | None, int | None, str]:
    with pytest.raises(ConfigError) as caught:
        load_document(text, "c.yml")
    (problem,) = caught.value.problems
    return problem.line, problem.column, problem.message


# --- Bounded work -------------------------------------------------------------------------------------------------

def alias_bomb(levels: int, width: int) -> str:
    """The "billion laughs" shape: each level is a list of ``width`` aliases of the level below."""
    lines = [MINIMAL.rstrip("\n"), "a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_by_the_alias_budget() -> None:
    line, column, message = problem_of(alias_bomb(levels=9, width=9))
    assert "aliases expand this file past 10,000 values" in message
    assert line == 9  # the first alias that crosses the budget: the level of 9^4 values, under the 4 MINIMAL lines


def test_alias_bomb_through_the_cli(tmp_path: Path) -> None:
    config = write(tmp_path / "bomb.yml", alias_bomb(levels=10, width=10))
    ((line, _, message),) = located(compile_refuses(tmp_path, config), str(config))
    assert line == 8 and "aliases expand" in message  # a3, the level of 10^4 values


def test_aliases_within_the_budget_still_load() -> None:
    text = "entry: &entry {path: a.jsonl, type: alpaca}\ndatasets: [*entry, *entry, *entry]\n"
    assert load_document(text, "c.yml").data["datasets"] == [{"path": "a.jsonl", "type": "alpaca"}] * 3


def test_recursive_alias_is_refused_with_its_line() -> None:
    line, column, message = problem_of("base_model: x\nloop: &l [*l]\n")
    assert (line, column) == (2, 11)
    assert "recursive alias" in message


def test_nesting_990_deep_is_located_exit_2(tmp_path: Path) -> None:
    config = write(tmp_path / "deep.yml", MINIMAL + "deep: " + "[" * 990 + "]" * 990 + "\n")
    ((line, _, message),) = located(compile_refuses(tmp_path, config), str(config))
    assert line == 5 and f"nested more than {loader.MAX_DEPTH} levels deep" in message


def test_too_many_dataset_entries() -> None:
    entries = "".join(f"  - path: d{index}.jsonl\n    type: alpaca\n" for index in range(loader.MAX_DATASETS + 1))
    line, _, message = problem_of("base_model: x\ndatasets:\n" + entries)
    assert line == 3 and f"more than {loader.MAX_DATASETS} dataset entries" in message


def test_too_many_keys_in_one_mapping() -> None:
    keys = "".join(f"unknown_{index}: 1\n" for index in range(loader.MAX_KEYS + 1))
    line, _, message = problem_of(keys)
    assert line == loader.MAX_KEYS + 1 and "more than 1,000 keys in one mapping" in message


def test_too_many_entries_in_one_list() -> None:
    line, _, message = problem_of("lora_target_modules: [" + ", ".join(["q"] * (loader.MAX_LIST_ENTRIES + 1)) + "]\n")
    assert line == 1 and "more than 1,000 entries in one list" in message


def test_too_long_a_value() -> None:
    line, column, message = problem_of("base_model: x\nchat_template_jinja: " + "x" * (loader.MAX_STRING_CHARS + 1))
    assert (line, column) == (2, 22) and "tunefile reads at most 100,000 in one value" in message


def test_too_large_a_file() -> None:
    _, _, message = problem_of("base_model: x\n#" + " " * loader.MAX_TEXT_CHARS + "\n")
    assert "tunefile reads configs of at most 1,048,576" in message


# --- Values YAML cannot build: located exit 2, not exit 3 ---------------------------------------------------------

@pytest.mark.parametrize("line, column, kind", [
    ("base_model: 2020-13-45", 13, "timestamp"),
    ("seed: !!int abc", 7, "int"),
    ("strict: !!bool maybe", 9, "bool"),
    ("seed: !!timestamp foo", 7, "timestamp"),
])
def test_unbuildable_values_are_located(tmp_path: Path, line: str, column: int, kind: str) -> None:
    config = write(tmp_path / "c.yml", MINIMAL.replace("base_model: meta-llama/Llama-3.1-8B\n", "") + line + "\n")
    ((at_line, at_column, message),) = located(compile_refuses(tmp_path, config), str(config))
    assert (at_line, at_column) == (4, column)
    assert f"is not a valid YAML {kind}" in message


def test_control_character_is_located_at_its_line_and_column(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", MINIMAL + "# comment\nseed: 1\x01\n")
    ((line, column, message),) = located(compile_refuses(tmp_path, config), str(config))
    assert (line, column) == (6, 8)
    assert "control character U+0001" in message


def test_key_with_a_newline_prints_escaped_on_one_line(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", MINIMAL + '"bad\\nkey": 1\n')
    lines = compile_refuses(tmp_path, config)
    assert any('"bad\\nkey": unknown key' in line for line in lines)
    # Every line is a located problem, a hint under one, or the closing count: no line starts mid-message.
    assert all(line.startswith((str(config), "    hint:")) or line.endswith("nothing was written.") for line in lines)


def test_config_that_is_not_utf8_names_the_byte(tmp_path: Path) -> None:
    config = tmp_path / "c.yml"
    config.write_bytes(MINIMAL.encode() + b"# caf\xe9 au lait\n")
    ((line, column, message),) = located(compile_refuses(tmp_path, config), str(config))
    assert (line, column) == (5, 6)
    assert "0xe9" in message


def test_decode_text_locates_the_first_bad_byte() -> None:
    from tunefile.compiler.loader import decode_text

    with pytest.raises(ConfigError) as caught:
        decode_text("base_model: é\nseed: 1\n# \xff\n".encode("latin-1"), "c.yml")
    (problem,) = caught.value.problems
    assert (problem.line, problem.column) == (1, 13)  # the latin-1 é is the first byte UTF-8 cannot read
    assert decode_text("\ufeffseed: 1\n".encode(), "c.yml") == "seed: 1\n"


def test_config_name_that_is_not_utf8(tmp_path: Path) -> None:
    config = Path(os.fsdecode(os.fsencode(tmp_path) + b"/bad\xffname.yml"))
    config.write_text(MINIMAL, encoding="utf-8")
    lines = compile_refuses(tmp_path, config)
    assert lines[0].endswith("bad\\xffname.yml:1:1: error: (top level): the file name is not valid UTF-8; rename it "
                             "(tunefile records the config's name in the bundle's UTF-8 files)")


# --- Merge keys: an override is not a duplicate --------------------------------------------------------------------

def test_key_written_after_a_merge_overrides_it() -> None:
    doc = load_document("base: &base {lora_r: 8, lora_alpha: 16}\nadapter_opts:\n  <<: *base\n  lora_r: 32\n", "c.yml")
    assert doc.data["adapter_opts"] == {"lora_r": 32, "lora_alpha": 16}
    assert doc.locate(("adapter_opts", "lora_r")).line == 4
