"""The on-disk layout of prepared data, its writer and its memory-mapped reader.

A prepared split is a folder of shards; shard ``k`` is four ``.npy`` files: ``k-input_ids.npy`` and
``k-labels.npy`` (int32, the shard's examples concatenated), ``k-offsets.npy`` (int64, rows + 1 boundaries) and
``k-origins.npy`` (int64, one ``[source, row]`` pair per example: the index of its dataset in the plan and the
0-based row of that dataset it came from). The writer holds one shard in compact ``array`` buffers and flushes
it, so tokenising needs memory for one shard whatever the dataset's size. ``index.json`` lists the shards and,
per dataset, its files with their row counts (so a row of a dataset maps back to a file and a row in it); it
is written when the split is closed. A whole prepared folder is complete only once its ``COMPLETE`` file
exists (see ``build.py``).

With ``skip_prepare`` nothing goes to disk: a writer without a folder keeps its shards as arrays, and
``TokenizedDataset.from_writer`` reads them the same way it reads a folder.

Provenance is for people: when the watchdog stops a run, ``describe_examples`` names the files and rows of the
micro-batches involved.
"""

from __future__ import annotations

import json
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np

SHARD_ROWS = 16_384
SHARD_TOKENS = 16 * 1024 * 1024  # a flush also happens at this many tokens: shards of long documents stay small
COMPLETE = "COMPLETE"
DESCRIBE_ROWS = 20  # rows describe_examples lists before it only counts the rest

# Per dataset (in the plan's order), its files in reading order with the rows each holds: (label, rows).
SourceFiles = list[tuple[str, int]]
SHARD_FILES = ("input_ids", "labels", "offsets", "origins")  # shard k's files: k-<name>.npy


# One shard in memory: (input_ids, labels, offsets, origins), as the four .npy files hold them.
ShardArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class ShardWriter:
    """Appends examples to one split's folder, one shard at a time; with ``directory=None`` the shards stay in
    memory (``arrays``) and nothing is written."""

    def __init__(self, directory: Path | None, *, shard_rows: int = SHARD_ROWS,
                 shard_tokens: int = SHARD_TOKENS) -> None:
        self.directory = directory
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        self.shard_rows, self.shard_tokens = shard_rows, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.arrays: list[ShardArrays] = []  # in memory only
        self.index: dict[str, Any] | None = None  # set by close()
        self.rows = self.tokens = self.trained_tokens = self.max_length = 0
        self._ids, self._labels, self._offsets = array("i"), array("i"), array("q", [0])
        self._origins = array("q")

    def add(self, input_ids: Sequence[int], labels: Sequence[int], *, source: int, row: int) -> None:
        """One example, from row ``row`` (0-based) of dataset number ``source``; ids and labels are lists or
        int32 arrays (the builder's, appended as bytes with no per-token Python work)."""
        if isinstance(input_ids, np.ndarray) and isinstance(labels, np.ndarray):
            self._ids.frombytes(input_ids.astype(np.int32, copy=False).tobytes())
            self._labels.frombytes(labels.astype(np.int32, copy=False).tobytes())
            self.trained_tokens += int(np.count_nonzero(labels != -100))
        else:
            self._ids.extend(input_ids)
            self._labels.extend(labels)
            self.trained_tokens += sum(1 for label in labels if label != -100)
        self._offsets.append(len(self._ids))
        self._origins.extend((source, row))
        self.rows += 1
        self.tokens += len(input_ids)
        self.max_length = max(self.max_length, len(input_ids))
        if any((len(self._offsets) - 1 >= self.shard_rows, len(self._ids) >= self.shard_tokens)):
            self._flush()

    def _flush(self) -> None:
        rows = len(self._offsets) - 1
        if rows == 0:
            return
        name = f"{len(self.shards):05d}"
        arrays = (np.frombuffer(self._ids, dtype=np.int32), np.frombuffer(self._labels, dtype=np.int32),
                  np.frombuffer(self._offsets, dtype=np.int64),
                  np.frombuffer(self._origins, dtype=np.int64).reshape(-1, 2))
        if self.directory is None:
            self.arrays.append(arrays)
        else:
            for suffix, values in zip(SHARD_FILES, arrays, strict=True):
                np.save(self.directory / f"{name}-{suffix}.npy", values)
        self.shards.append({"name": name, "rows": rows, "tokens": len(self._ids)})
        self._ids, self._labels, self._offsets = array("i"), array("i"), array("q", [0])
        self._origins = array("q")

    def close(self, sources: list[SourceFiles]) -> dict[str, int]:
        """Flush the last shard and write ``index.json``; ``sources`` maps dataset rows back to files."""
        self._flush()
        summary = {"examples": self.rows, "tokens": self.tokens, "trained_tokens": self.trained_tokens,
                   "max_length": self.max_length}
        self.index = {"shards": self.shards,
                      "sources": [[[label, rows] for label, rows in files] for files in sources], **summary}
        if self.directory is not None:
            (self.directory / "index.json").write_text(json.dumps(self.index, indent=1, sort_keys=True) + "\n",
                                                       encoding="utf-8")
        return summary


class TokenizedDataset:
    """One prepared split, memory-mapped (or held in memory, see ``from_writer``): ``ds[i]`` is
    ``{"input_ids": int32 array, "labels": int32 array}``; ``ds.lengths`` holds every example's token count
    (int64); ``ds.origin(i)`` says which file and row it came from."""

    column_names = ("input_ids", "labels", "length")

    def __init__(self, directory: Path) -> None:
        self.directory: Path | None = Path(directory)
        index = json.loads((self.directory / "index.json").read_text(encoding="utf-8"))
        shards = []
        for shard in index["shards"]:
            name = shard["name"]
            shards.append(tuple(np.load(self.directory / f"{name}-{suffix}.npy",
                                        mmap_mode=None if suffix == "offsets" else "r") for suffix in SHARD_FILES))
        self._open(shards, index)

    @classmethod
    def from_writer(cls, writer: ShardWriter) -> TokenizedDataset:
        """The split a closed in-memory writer holds (``skip_prepare``: nothing on disk)."""
        if writer.directory is not None or writer.index is None:
            raise ValueError("from_writer takes a closed writer without a folder")
        dataset = cls.__new__(cls)
        dataset.directory = None
        dataset._open(writer.arrays, writer.index)
        return dataset

    def _open(self, shards: list[Any], index: dict[str, Any]) -> None:
        self._ids: list[np.ndarray] = [ids for ids, _, _, _ in shards]
        self._labels: list[np.ndarray] = [labels for _, labels, _, _ in shards]
        self._offsets: list[np.ndarray] = [offsets for _, _, offsets, _ in shards]
        self._origins: list[np.ndarray] = [origins for _, _, _, origins in shards]
        # Per dataset: its files' labels and the dataset row each file starts at.
        self._files: list[tuple[list[str], list[int]]] = []
        for files in index["sources"]:
            starts = [0, *accumulate(rows for _, rows in files)][:-1]
            self._files.append(([label for label, _ in files], starts))
        counts = [len(offsets) - 1 for offsets in self._offsets]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
        diffs = [np.diff(offsets) for offsets in self._offsets]
        self.lengths: np.ndarray = np.concatenate(diffs).astype(np.int64) if diffs else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, key: int | str) -> dict[str, np.ndarray] | np.ndarray:
        if isinstance(key, str):  # column access, for callers written against `datasets.Dataset`
            if key == "length":
                return self.lengths
            return [self[i][key] for i in range(len(self))]  # type: ignore[index]
        shard, local = self._locate(key)
        start, end = self._offsets[shard][local], self._offsets[shard][local + 1]
        return {"input_ids": self._ids[shard][start:end], "labels": self._labels[shard][start:end]}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def _locate(self, key: int) -> tuple[int, int]:
        """(shard, example within it) of example ``key``; negative keys count from the end."""
        index = int(key)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {key} of {len(self)}")
        shard = bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def source_row(self, index: int) -> tuple[int, int]:
        """(dataset number in the plan's ``datasets``, 0-based row of that dataset) example ``index`` came from."""
        shard, local = self._locate(index)
        source, row = self._origins[shard][local]
        return int(source), int(row)

    def source_rows(self, index: int) -> list[tuple[int, int]]:
        """Every (dataset, row) example ``index`` holds: one here (a streamed row may hold several documents)."""
        return [self.source_row(index)]

    def origin(self, index: int) -> tuple[str, int]:
        """(file, 0-based row in that file) example ``index`` came from. The file is labelled as the user wrote
        the dataset (its path; a file of a folder dataset as folder/file; a Hub dataset as ``id (name)``). A row
        is the n-th record the reader yields: for JSON Lines and text the n-th non-empty line."""
        return self.file_row(*self.source_row(index))

    def file_row(self, source: int, row: int) -> tuple[str, int]:
        """(file, row in that file) of row ``row`` of dataset number ``source``."""
        labels, starts = self._files[source]
        file = bisect_right(starts, row) - 1
        return labels[file], row - starts[file]


def describe_examples(dataset: Any, indices: Iterable[int]) -> str:
    """One line naming where examples came from, e.g. ``data/alpaca.jsonl rows 12, 873, 9001; data/chat.jsonl
    row 4`` (rows counted from 1): files in the plan's order, rows sorted and deduplicated, at most
    ``DESCRIBE_ROWS`` rows listed and the rest counted ("and 7 more rows"). ``dataset`` is a TokenizedDataset or
    anything with its ``source_rows`` and ``file_row`` (the streamed rows of ``streaming.StreamedRows``)."""
    rows = sorted({pair for index in indices for pair in dataset.source_rows(index)})
    if not rows:
        return "no examples"
    listed: dict[str, list[int]] = {}
    for source, row in rows[:DESCRIBE_ROWS]:
        label, file_row = dataset.file_row(source, row)
        listed.setdefault(label, []).append(file_row + 1)  # shown from 1, as lines and JSON errors are
    parts = [f"{label} {'rows' if len(numbers) > 1 else 'row'} {', '.join(map(str, sorted(set(numbers))))}"
             for label, numbers in listed.items()]
    more = len(rows) - DESCRIBE_ROWS
    return "; ".join(parts) + (f"; and {more} more row{'s' if more > 1 else ''}" if more > 0 else "")
