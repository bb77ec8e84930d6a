"""The on-disk layout of prepared data, its writer and its memory-mapped reader.

A prepared split is a folder of shards; shard ``k`` is three ``.npy`` files: ``k-input_ids.npy`` and
``k-labels.npy`` (int32, the shard's examples concatenated) and ``k-offsets.npy`` (int64, rows + 1 boundaries).
The writer holds one shard in compact ``array('i')`` buffers and flushes it, so tokenising needs memory for one
shard whatever the dataset's size. ``index.json`` lists the shards; it is written when the split is closed.
A whole prepared folder is complete only once its ``COMPLETE`` file exists (see ``build.py``).
"""

from __future__ import annotations

import json
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SHARD_ROWS = 16_384
SHARD_TOKENS = 16 * 1024 * 1024  # a flush also happens at this many tokens: shards of long documents stay small
COMPLETE = "COMPLETE"


class ShardWriter:
    """Appends examples to one split's folder, one shard at a time."""

    def __init__(self, directory: Path, *, shard_rows: int = SHARD_ROWS, shard_tokens: int = SHARD_TOKENS) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.shard_rows, self.shard_tokens = shard_rows, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.rows = self.tokens = self.trained_tokens = self.max_length = 0
        self._ids, self._labels, self._offsets = array("i"), array("i"), array("q", [0])

    def add(self, input_ids: Sequence[int], labels: Sequence[int]) -> None:
        self._ids.extend(input_ids)
        self._labels.extend(labels)
        self._offsets.append(len(self._ids))
        self.rows += 1
        self.tokens += len(input_ids)
        self.trained_tokens += sum(1 for label in labels if label != -100)
        self.max_length = max(self.max_length, len(input_ids))
        if len(self._offsets) - 1 >= self.shard_rows or len(self._ids) >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        rows = len(self._offsets) - 1
        if rows == 0:
            return
        name = f"{len(self.shards):05d}"
        np.save(self.directory / f"{name}-input_ids.npy", np.frombuffer(self._ids, dtype=np.int32))
        np.save(self.directory / f"{name}-labels.npy", np.frombuffer(self._labels, dtype=np.int32))
        np.save(self.directory / f"{name}-offsets.npy", np.frombuffer(self._offsets, dtype=np.int64))
        self.shards.append({"name": name, "rows": rows, "tokens": len(self._ids)})
        self._ids, self._labels, self._offsets = array("i"), array("i"), array("q", [0])

    def close(self) -> dict[str, int]:
        self._flush()
        summary = {"examples": self.rows, "tokens": self.tokens, "trained_tokens": self.trained_tokens,
                   "max_length": self.max_length}
        index = {"shards": self.shards, **summary}
        (self.directory / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n",
                                                   encoding="utf-8")
        return summary


class TokenizedDataset:
    """One prepared split, memory-mapped: ``ds[i]`` is ``{"input_ids": int32 array, "labels": int32 array}``;
    ``ds.lengths`` holds every example's token count (int64)."""

    column_names = ("input_ids", "labels", "length")

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        index = json.loads((self.directory / "index.json").read_text(encoding="utf-8"))
        self._ids: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        for shard in index["shards"]:
            name = shard["name"]
            self._ids.append(np.load(self.directory / f"{name}-input_ids.npy", mmap_mode="r"))
            self._labels.append(np.load(self.directory / f"{name}-labels.npy", mmap_mode="r"))
            self._offsets.append(np.load(self.directory / f"{name}-offsets.npy"))
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
        index = int(key)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {key} of {len(self)}")
        shard = bisect_right(self._starts, index) - 1
        local = index - self._starts[shard]
        start, end = self._offsets[shard][local], self._offsets[shard][local + 1]
        return {"input_ids": self._ids[shard][start:end], "labels": self._labels[shard][start:end]}

    def __iter__(self):
        return (self[i] for i in range(len(self)))
