"""Hostile data files are one line that names the file and the line (counted from 1), never a traceback: bytes that
are not UTF-8, a file with no rows, a row that is not an object, JSON that does not parse. The places handed to
callers (``located_rows``) count from 1 as well, for a JSON array, CSV rows that span lines, and Parquet rows."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from tunefile.runtime.data.errors import DataError
from tunefile.runtime.data.sources import Source, count_rows, iter_rows, located_rows, resolve_source
from tunefile.schemas.run_plan import DatasetPlan


def source_of(path: Path) -> Source:
    """A completion dataset reading ``path``; every other field of the plan entry None (unused by the readers)."""
    entry = DatasetPlan(**{field.name: None for field in fields(DatasetPlan)}
                        | {"path": str(path), "type": "completion", "split": "train", "field": "text"})
    return resolve_source(entry, offline=False)


def read_all(path: Path) -> list[dict]:
    return list(iter_rows(source_of(path)))


def error_of(path: Path) -> str:
    with pytest.raises(DataError) as raised:
        read_all(path)
    message = str(raised.value)
    assert "\n" not in message and raised.value.exit_code == 2
    return message


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".txt"])
def test_bytes_that_are_not_utf8_name_the_file_line_and_column(tmp_path: Path, suffix: str) -> None:
    lines = {".jsonl": ['{"text": "one"}', '{"text": "two"}', '{"text": "caf\xe9 \udcff"}'],
             ".json": ["[", '{"text": "one"},', '{"text": "two"},', '{"text": "caf\xe9 \udcff"}', "]"],
             ".csv": ["text", "one", "two", "caf\xe9 \udcff"],
             ".txt": ["one", "two", "caf\xe9 \udcff"]}[suffix]
    bad_line = next(number for number, line in enumerate(lines, start=1) if "\udcff" in line)
    # The bad byte is 0xff, after a correctly encoded é: the column counts characters, from 1.
    column = lines[bad_line - 1].index("\udcff") + 1
    path = tmp_path / f"rows{suffix}"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogateescape") + b"\n")
    message = error_of(path)
    assert message.startswith(f"{path}:{bad_line}:{column}: not UTF-8 text (byte 0xff)"), message


@pytest.mark.parametrize(("suffix", "content", "why"), [
    (".jsonl", "", "the file is empty"),
    (".jsonl", "\n  \n\n", "only blank lines"),
    (".json", "[]", "an empty array"),
    (".csv", "text\n", "only a header"),
    (".txt", "", "the file is empty"),
])
def test_a_file_without_rows_is_named(tmp_path: Path, suffix: str, content: str, why: str) -> None:
    path = tmp_path / f"empty{suffix}"
    path.write_text(content, encoding="utf-8")
    assert error_of(path) == f"{path}: holds no rows ({why}); remove it or fill it"


def test_an_empty_file_in_a_folder_is_named_among_the_others(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "one"}\n', encoding="utf-8")
    (folder / "b.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{folder / 'b.jsonl'}: holds no rows \(the file is empty\)"):
        count_rows(source_of(folder))


@pytest.mark.parametrize(("row", "kind"), [("[1, 2]", "array"), ('"text"', "string"), ("7", "number"),
                                           ("null", "null")])
def test_a_row_that_is_not_an_object_names_its_line(tmp_path: Path, row: str, kind: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "one"}\n\n' + row + "\n", encoding="utf-8")  # a blank line: lines, not rows, count
    assert error_of(path).startswith(f"{path}:3: the row is a JSON {kind}, not an object")


def test_a_json_array_row_that_is_not_an_object_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"text": "one"},\n\n  ["a", "list"]\n]\n', encoding="utf-8")
    assert error_of(path).startswith(f"{path}:4: the row is a JSON array")


def test_invalid_json_is_located_by_line(tmp_path: Path) -> None:
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    assert error_of(jsonl) == f"{jsonl}:2: invalid JSON: Expecting value (column 10)"
    array = tmp_path / "bad.json"
    array.write_text('[\n {"text": "ok"},\n {"text":\n   oops}\n]\n', encoding="utf-8")
    assert error_of(array) == f"{array}:4: invalid JSON: Expecting value (in the value that starts on line 3)"


def test_places_count_lines_from_one_in_every_text_format(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from tunefile.runtime.data import sources

    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('\n{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    csv_file = tmp_path / "rows.csv"
    csv_file.write_text('text\n"two\nlines"\nthree\n', encoding="utf-8")
    text = tmp_path / "rows.txt"
    text.write_text("a\n\nb\n", encoding="utf-8")
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([{"text": "a"}, {"text": "b"}, {"text": "c"}], indent=1), encoding="utf-8")
    monkeypatch.setattr(sources, "_CHUNK_CHARS", 5)  # every value straddles several reads
    lines = {path.suffix: [(place.row, place.line) for place, _ in located_rows(source_of(path))]
             for path in (jsonl, csv_file, text, array)}
    assert lines == {".jsonl": [(1, 2), (2, 4)], ".csv": [(1, 2), (2, 4)], ".txt": [(1, 1), (2, 3)],
                     ".json": [(1, 2), (2, 5), (3, 8)]}
    place, _ = next(located_rows(source_of(jsonl)))
    assert str(place) == f"{jsonl}:2"


def test_parquet_places_are_rows_from_one(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": "b"}]), path)
    assert [str(place) for place, _ in located_rows(source_of(path))] == [f"{path}: row 1", f"{path}: row 2"]


def test_a_csv_field_beyond_the_csv_module_limit_is_located(tmp_path: Path) -> None:
    import csv

    path = tmp_path / "rows.csv"
    path.write_text("text\none\n" + "x" * (csv.field_size_limit() + 1) + "\n", encoding="utf-8")
    assert error_of(path).startswith(f"{path}:3: invalid CSV: field larger than field limit")
