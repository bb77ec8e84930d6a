"""Where rows come from: local .jsonl/.json/.parquet/.csv/.txt files and folders, or Hugging Face Hub datasets.

Rows are streamed, never loaded whole: JSON Lines line by line, JSON arrays value by value, Parquet by record
batch, Hub datasets through their memory-mapped Arrow cache in batches. Each source also says what identifies
its content for the prepared-data cache key (the bytes of local files; id/name/split/revision on the Hub).

Every problem with a local file names the file and where in it, as ``file:line`` with lines counted from 1 (the
line a row starts on), or ``file: row N`` (from 1) for Parquet, which has no lines: text that is not UTF-8, JSON
that does not parse, a row that is not an object, a file that holds no rows. ``located_rows`` hands the same
places to callers that report problems of their own.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ...schemas.run_plan import DatasetPlan
from .errors import DataError

READERS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
# ds_type names the reader when the extension cannot (e.g. `.jsonl.gz` is not supported; `data.ndjson` is).
DS_TYPE_READERS = {"json": ("jsonl", "json"), "parquet": ("parquet",), "csv": ("csv",), "text": ("text",)}
BATCH_ROWS = 1024
_CHUNK_CHARS = 1 << 20


@dataclass(frozen=True)
class Source:
    """One dataset of the plan, resolved: local files (in a fixed order) or a Hub dataset."""

    entry: DatasetPlan
    files: tuple[Path, ...] = ()  # empty for a Hub dataset
    offline: bool = False

    @property
    def is_local(self) -> bool:
        return bool(self.files)

    @property
    def label(self) -> str:
        """The dataset as the user wrote it: its path, and a Hub dataset's configuration name."""
        if self.entry.name is None:
            return self.entry.path
        return f"{self.entry.path} ({self.entry.name})"

    def parts(self) -> list[tuple[str, Source]]:
        """(label, source of that one file) for each file, in reading order; the whole source for the Hub.
        A file inside a folder is labelled by the folder as written plus the file's path within it."""
        if not self.is_local:
            return [(self.label, self)]
        folder = Path(self.entry.path).expanduser()
        if not folder.is_dir():
            return [(self.label, self)]
        return [(os.path.join(self.entry.path, str(path.relative_to(folder))), replace(self, files=(path,)))
                for path in self.files]


def resolve_source(entry: DatasetPlan, *, offline: bool) -> Source:
    path = Path(entry.path).expanduser()
    if path.is_file():
        return Source(entry, (path,), offline)
    if path.is_dir():
        return Source(entry, tuple(_folder_files(path, entry)), offline)
    looks_local = any((entry.path.startswith((".", "/", "~")), path.suffix.lower() in READERS))
    if looks_local:
        raise DataError(f"dataset {entry.path}: no such file or folder (relative paths are relative to "
                        f"{Path.cwd()})")
    return Source(entry, (), offline)


def _folder_files(folder: Path, entry: DatasetPlan) -> list[Path]:
    if entry.data_files:
        files = [folder / name for name in entry.data_files]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"dataset {folder}: data_files not found: {', '.join(missing)}")
        return files
    wanted = tuple(READERS.values()) if entry.ds_type is None else DS_TYPE_READERS[entry.ds_type]
    files = sorted(p for p in folder.rglob("*") if p.is_file() and READERS.get(p.suffix.lower()) in wanted
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(f"dataset {folder}: the folder holds no {'/'.join(sorted(READERS))} files")
    return files


def _reader(path: Path, entry: DatasetPlan) -> str:
    by_extension = READERS.get(path.suffix.lower())
    if entry.ds_type is not None:
        choices = DS_TYPE_READERS[entry.ds_type]
        return by_extension if by_extension in choices else choices[0]
    if by_extension is None:
        raise DataError(f"dataset {path}: unknown file type {path.suffix!r}; set ds_type (json, parquet, csv, text)")
    return by_extension


def fingerprint(source: Source) -> dict[str, Any]:
    """What identifies the rows, for the cache key: content hashes of local files; the Hub coordinates."""
    if source.is_local:
        return {"files": [[str(path), file_sha256(path)] for path in source.files]}
    entry = source.entry
    return {"hub": {"path": entry.path, "name": entry.name, "split": entry.split, "data_files": entry.data_files,
                    "ds_type": entry.ds_type}}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class RowPlace:
    """Where a row is: the 1-based line it starts on in a text file, or its 1-based row number in a Parquet file
    (``line`` None) or a Hub dataset (``path`` None)."""

    path: Path | None
    row: int
    line: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.path}:{self.line}"
        return f"row {self.row}" if self.path is None else f"{self.path}: row {self.row}"


def iter_rows(source: Source) -> Iterator[dict[str, Any]]:
    for _, row in located_rows(source):
        yield row


def located_rows(source: Source) -> Iterator[tuple[RowPlace, dict[str, Any]]]:
    """Each row with its place; DataError (one line, naming the file and line) for what cannot be a row."""
    if not source.is_local:
        for number, row in enumerate(_hub_rows(source), start=1):
            yield RowPlace(None, number), row
        return
    for path in source.files:
        reader = _reader(path, source.entry)
        rows = {"jsonl": _jsonl_rows, "json": _json_rows, "parquet": _parquet_rows, "csv": _csv_rows,
                "text": _text_rows}[reader](path)
        number = 0
        for number, (line, row) in enumerate(_utf8_located(path, rows), start=1):
            place = RowPlace(path, number, line)
            if not isinstance(row, dict):
                raise DataError(f"{place}: the row is a JSON {_json_kind(row)}, not an object "
                                f"({{\"field\": value, ...}})")
            yield place, row
        if number == 0 and reader != "parquet":  # a Parquet file that says it has no rows means it
            raise DataError(f"{path}: holds no rows ({_why_empty(path, reader)}); remove it or fill it")


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def _why_empty(path: Path, reader: str) -> str:
    if path.stat().st_size == 0:
        return "the file is empty"
    return {"csv": "only a header", "json": "an empty array"}.get(reader, "only blank lines")


def _utf8_located(path: Path, rows: Iterator[tuple[int | None, Any]]) -> Iterator[tuple[int | None, Any]]:
    """``rows``, with a decoding error turned into one line naming the file and the line of the first byte that
    is not UTF-8 (the text reader only knows its position in a buffer)."""
    try:
        yield from rows
    except UnicodeDecodeError:
        raise DataError(_not_utf8(path)) from None


def _not_utf8(path: Path) -> str:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):  # a UTF-8 sequence never spans a newline byte
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                column = len(raw[:exc.start].decode("utf-8")) + 1
                return (f"{path}:{number}:{column}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as "
                        "UTF-8")
    return f"{path}: not UTF-8 text; save the file as UTF-8"


def count_rows(source: Source) -> int:
    """Rows in the source, for a deterministic eval split (Parquet and the Hub know it without reading)."""
    if not source.is_local:
        return len(_hub_dataset(source))
    total = 0
    for path in source.files:
        if _reader(path, source.entry) == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows
        else:
            total += sum(1 for _ in iter_rows(Source(source.entry, (path,), source.offline)))
    return total


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: invalid JSON: {exc.msg} (column {exc.colno})") from None


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """The values of a top-level JSON array (or of concatenated JSON values), decoded one at a time from
    1 MiB chunks, so a large .json file never sits in memory whole; each with the line it starts on."""
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8") as handle:
        buffer, position, eof = "", 0, False
        line, counted = 1, 0  # the line at buffer[counted]
        opened = False  # past the outer array's "[": a later "[" starts a row (which then is no object)

        def line_at(index: int) -> int:
            nonlocal line, counted
            line, counted = line + buffer.count("\n", counted, index), index
            return line

        while True:
            while position < len(buffer) and (buffer[position] in " \t\r\n,]" or
                                              (buffer[position] == "[" and not opened)):
                opened = opened or buffer[position] == "["
                position += 1  # separators and the outer array's brackets
            if position >= len(buffer) or (not eof and len(buffer) - position < 2):
                if eof:
                    return
                line_at(position)
                chunk = handle.read(_CHUNK_CHARS)
                buffer, position, counted, eof = buffer[position:] + chunk, 0, 0, not chunk
                continue
            try:
                value, end = decoder.raw_decode(buffer, position)
            except json.JSONDecodeError as exc:
                if eof:
                    start = line_at(position)
                    at = line + buffer.count("\n", counted, exc.pos)
                    raise DataError(f"{path}:{at}: invalid JSON: {exc.msg} (in the value that starts on line "
                                    f"{start})") from None
                line_at(position)
                chunk = handle.read(_CHUNK_CHARS)  # the value continues past the buffer
                buffer, position, counted, eof = buffer[position:] + chunk, 0, 0, not chunk
                continue
            yield line_at(position), value
            position, opened = end, True


def _parquet_rows(path: Path) -> Iterator[tuple[None, dict[str, Any]]]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
        for row in batch.to_pylist():
            yield None, row


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        ended = 0
        try:
            _ = reader.fieldnames  # reads the header
            ended = reader.line_num  # a quoted field may span lines: a row starts after the one before ends
            for row in reader:
                yield ended + 1, row
                ended = reader.line_num
        except csv.Error as exc:
            raise DataError(f"{path}:{ended + 1}: invalid CSV: {exc}") from None


def _text_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, {"text": line.rstrip("\n")}


def _hub_dataset(source: Source) -> Any:
    """The Hub dataset's split, from the local cache when offline; a one-line error naming it otherwise."""
    import datasets

    entry = source.entry
    data_files = list(entry.data_files) if entry.data_files else None
    try:
        return datasets.load_dataset(entry.path, name=entry.name, split=entry.split, data_files=data_files)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types (connection, offline, not found)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if any((source.offline, datasets.config.HF_HUB_OFFLINE)):
            raise DataError(f"dataset {source.label}: not in the local Hugging Face cache and the hub is offline "
                            f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); download it on a machine with network first "
                            f"({reason})") from None
        raise DataError(f"dataset {source.label}: cannot be loaded from the Hugging Face Hub ({reason})") from None


def _hub_rows(source: Source) -> Iterator[dict[str, Any]]:
    dataset = _hub_dataset(source)
    for batch in dataset.iter(batch_size=BATCH_ROWS):
        columns = list(batch)
        for i in range(len(batch[columns[0]]) if columns else 0):
            yield {column: batch[column][i] for column in columns}
