"""The prepared-data cache: reused when nothing that changes tokens changed, rebuilt when something did;
streamed into several shards; an eval split held out by seed; incomplete caches never trusted."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from helpers import require_module

require_module("torch", "make install")

import numpy as np  # noqa: E402
import runtime_plans  # noqa: E402

from tunefile.compiler.render.config_yaml import dataset_plan  # noqa: E402
from tunefile.compiler.spec import DatasetSpec  # noqa: E402
from tunefile.runtime.data import build as build_module  # noqa: E402
from tunefile.runtime.data import describe_examples, prepare_data  # noqa: E402
from tunefile.runtime.data.cache import COMPLETE  # noqa: E402
from tunefile.schemas.run_plan import DataPlan, DatasetPlan  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"


def dataset(path: Path | str, type: str = "alpaca", **options: Any) -> DatasetPlan:
    """One dataset as the compiler writes it into the plan: the defaults of its type filled in."""
    return dataset_plan(DatasetSpec(path=str(path), type=type, **options))


def config(tmp_path: Path, **changes: Any) -> DataPlan:
    return runtime_plans.data_plan(dataset(tmp_path / "alpaca.jsonl"),
                                   **{"prepared_path": str(tmp_path / "prepared"), **changes})


def prepare(data: DataPlan, tokenizer: Any, *, seed: int = 42, **options: Any) -> Any:
    return prepare_data(data, tokenizer, seed=seed, offline=True, **options)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    for name in ("alpaca.jsonl", "chat.jsonl", "corpus.jsonl"):
        shutil.copy(EXAMPLES / name, tmp_path / name)
    return tmp_path


@pytest.fixture
def tokenise_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Records every tokenisation pass (the staging folder it wrote)."""
    calls: list[Path] = []
    real = build_module._tokenise

    def counting(data: Any, tokenizer: Any, sources: Any, staging: Path, **kwargs: Any) -> Any:
        calls.append(staging)
        return real(data, tokenizer, sources, staging, **kwargs)

    monkeypatch.setattr(build_module, "_tokenise", counting)
    return calls


def test_second_prepare_reuses_the_cache(workspace: Path, tiny_tokenizer: Any,
                                         tokenise_calls: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(workspace)
    first = prepare(cfg, tiny_tokenizer)
    stats_mtime = (first.cache_dir / "stats.json").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        second = prepare(cfg, tiny_tokenizer)
    assert len(tokenise_calls) == 1
    assert not first.stats["reused"] and second.stats["reused"]
    assert "reusing prepared data" in caplog.text
    assert second.cache_dir == first.cache_dir and (second.cache_dir / COMPLETE).is_file()
    assert (second.cache_dir / "stats.json").stat().st_mtime_ns == stats_mtime
    assert len(second.train) == 64 and second.eval is None
    assert second.stats["rows"] == 64 and second.stats["dropped_rows"] == 0
    assert second.stats["trained_tokens"] == int(sum((second.train[i]["labels"] != -100).sum() for i in range(64)))


@pytest.mark.parametrize("change", ["data file", "sequence_len", "chat template", "special tokens",
                                    "train_on_inputs", "dataset option"])
def test_any_change_that_alters_tokens_rebuilds(workspace: Path, tiny_model_dir: Path, tiny_tokenizer: Any,
                                                tokenise_calls: list[Path], change: str) -> None:
    from transformers import AutoTokenizer

    from tunefile.runtime.data.tokenizer import add_config_tokens

    chat = dataset(workspace / "chat.jsonl", "chat_template")
    before = config(workspace, datasets=(chat,))
    first = prepare(before, tiny_tokenizer)
    after, tokenizer = before, tiny_tokenizer
    if change == "data file":
        with (workspace / "chat.jsonl").open("a") as handle:
            handle.write(json.dumps({"messages": [{"role": "user", "content": "Say red."},
                                                  {"role": "assistant", "content": "RED"}]}) + "\n")
    elif change == "sequence_len":
        after = replace(before, sequence_len=128)
    elif change == "chat template":
        after = replace(before, chat_template="llama3")
    elif change == "special tokens":  # the plan's model.special_tokens reach the data through the tokenizer
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        add_config_tokens(tokenizer, {"eos_token": "<|im_end|>"}, None)
    elif change == "train_on_inputs":
        after = replace(before, train_on_inputs=True)
    else:
        after = replace(before, datasets=(replace(chat, train_on_eos="all"),))
    second = prepare(after, tokenizer)
    assert len(tokenise_calls) == 2
    assert second.cache_dir != first.cache_dir and not second.stats["reused"]
    if change == "data file":
        assert len(second.train) == len(first.train) + 1


def test_tokenizer_change_rebuilds(workspace: Path, tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    from transformers import AutoTokenizer

    cfg = config(workspace)
    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    other.add_tokens(["zebracorn"])
    assert prepare(cfg, tiny_tokenizer).cache_dir != prepare(cfg, other).cache_dir


def test_tokenisation_streams_into_shards(workspace: Path, tiny_tokenizer: Any) -> None:
    cfg = config(workspace)
    sharded = prepare(cfg, tiny_tokenizer, shard_rows=10)
    index = json.loads((sharded.cache_dir / "train" / "index.json").read_text())
    assert [shard["rows"] for shard in index["shards"]] == [10, 10, 10, 10, 10, 10, 4]
    assert len(list((sharded.cache_dir / "train").glob("*-input_ids.npy"))) == 7
    # The same examples as one big shard would hold, in source order, memory-mapped.
    whole = prepare(config(workspace, prepared_path=str(workspace / "p2")), tiny_tokenizer)
    assert len(sharded.train) == len(whole.train) == 64
    assert np.array_equal(sharded.train.lengths, whole.train.lengths)
    for i in (0, 9, 10, 33, 63, -1):
        assert np.array_equal(sharded.train[i]["input_ids"], whole.train[i]["input_ids"])
        assert np.array_equal(sharded.train[i]["labels"], whole.train[i]["labels"])
    assert isinstance(sharded.train[0]["input_ids"], np.memmap)
    with pytest.raises(IndexError):
        sharded.train[64]


def test_eval_split_is_held_out_by_seed(workspace: Path, tiny_tokenizer: Any) -> None:
    def prepared(seed: int, path: str) -> Any:
        return prepare(config(workspace, val_set_size=0.25, prepared_path=str(workspace / path)), tiny_tokenizer,
                       seed=seed)

    def texts(dataset: Any) -> set[str]:
        return {tiny_tokenizer.decode(dataset[i]["input_ids"]) for i in range(len(dataset))}

    first, again, other = prepared(1, "a"), prepared(1, "b"), prepared(2, "c")
    assert (len(first.train), len(first.eval)) == (48, 16)
    assert first.stats["eval"]["examples"] == 16
    assert not texts(first.train) & texts(first.eval)
    assert texts(first.eval) == texts(again.eval)
    assert texts(first.eval) != texts(other.eval)


def test_incomplete_cache_is_rebuilt(workspace: Path, tiny_tokenizer: Any,
                                     tokenise_calls: list[Path]) -> None:
    cfg = config(workspace)
    directory = prepare(cfg, tiny_tokenizer).cache_dir
    (directory / COMPLETE).unlink()  # as if a build had died before its last step
    rebuilt = prepare(cfg, tiny_tokenizer)
    assert len(tokenise_calls) == 2 and rebuilt.cache_dir == directory and (directory / COMPLETE).is_file()
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_other_ranks_wait_at_the_barrier_then_open_the_cache(workspace: Path,
                                                             tiny_tokenizer: Any, tokenise_calls: list[Path]) -> None:
    cfg = config(workspace)
    order: list[str] = []
    main = prepare(cfg, tiny_tokenizer, is_main_process=True, barrier=lambda: order.append("main at barrier"))
    other = prepare(cfg, tiny_tokenizer, is_main_process=False,
                         barrier=lambda: order.append("other at barrier"))
    assert len(tokenise_calls) == 1 and other.cache_dir == main.cache_dir and len(other.train) == 64
    assert order == ["main at barrier", "other at barrier"]


def test_rows_too_long_or_malformed_are_dropped_and_counted(workspace: Path,
                                                            tiny_tokenizer: Any) -> None:
    rows = [{"instruction": "Say red.", "output": "RED"}, {"instruction": "Say red.", "output": "RED " * 200},
            {"instruction": "no output"}, {"instruction": "Say blue.", "output": "BLUE"}]
    data = workspace / "mixed.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prepared = prepare(config(workspace, sequence_len=64, datasets=(dataset(data),)), tiny_tokenizer)
    stats = prepared.stats
    assert (stats["rows"], len(prepared.train), stats["dropped_rows"]) == (4, 2, 2)
    assert stats["dropped"] == {"too_long": 1, "malformed": 1}
    assert stats["problems"] == [f"{data}:3: missing field 'output'"]  # the third line, as a JSON error names it


def test_a_dropped_row_is_named_by_its_line_when_blank_lines_come_before_it(workspace: Path,
                                                                           tiny_tokenizer: Any) -> None:
    """Rows and lines differ once a file has blank lines: the problem names the line a person opens."""
    good = json.dumps({"instruction": "Say red.", "output": "RED"})
    data = workspace / "gaps.jsonl"
    data.write_text(f"{good}\n\n\n{good}\n" + json.dumps({"instruction": "no output"}) + "\n")
    stats = prepare(config(workspace, datasets=(dataset(data),)), tiny_tokenizer).stats
    assert stats["problems"] == [f"{data}:5: missing field 'output'"]  # the third row, on line 5


def test_seed_zero_is_a_seed_of_its_own(workspace: Path, tiny_tokenizer: Any) -> None:
    """Seed 0 picks its own eval rows (it once turned into the default 42)."""
    def eval_rows(seed: int) -> set[int]:
        prepared = prepare(config(workspace, val_set_size=0.25, prepared_path=str(workspace / f"p{seed}")),
                           tiny_tokenizer, seed=seed)
        return {prepared.eval.source_row(i)[1] for i in range(len(prepared.eval))}

    assert eval_rows(0) == set(build_module.eval_rows(64, 0.25, 0).tolist())
    assert eval_rows(0) != eval_rows(42)


def write_rows(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_every_example_records_its_file_and_row(workspace: Path, tiny_tokenizer: Any) -> None:
    # Pretokenized rows whose first token says where they are: 100 × file number + row in the file.
    def rows(file: int, count: int, *, bad: int | None = None) -> list[Any]:
        return [{"input_ids": "not ids"} if r == bad else {"input_ids": [100 * file + r, 7, 8]} for r in range(count)]

    single = write_rows(workspace / "single.jsonl", rows(1, 5, bad=2))
    folder = workspace / "folder"
    write_rows(folder / "a.jsonl", rows(2, 3))
    write_rows(folder / "sub" / "b.jsonl", rows(3, 4))
    labels = {1: str(single), 2: f"{folder}/a.jsonl", 3: f"{folder}/sub/b.jsonl"}
    plan = config(workspace, datasets=(dataset(single, "pretokenized"), dataset(folder, "pretokenized")),
                  val_set_size=3.0)
    prepared = prepare(plan, tiny_tokenizer, seed=0)
    assert prepared.stats["dropped"] == {"malformed": 1} and len(prepared.eval) == 3
    seen = set()
    for split in (prepared.train, prepared.eval):
        for i in range(len(split)):
            first = int(split[i]["input_ids"][0])
            assert split.origin(i) == (labels[first // 100], first % 100)
            assert split.source_row(i)[0] == (0 if first // 100 == 1 else 1)
            seen.add(first)
    assert seen == {100, 101, 103, 104, 200, 201, 202, 300, 301, 302, 303}  # row 2 of single.jsonl is malformed
    assert prepared.train.source_row(len(prepared.train) - 1) == (1, 6)  # folder rows count across its files


def test_describe_examples_names_files_and_rows(workspace: Path, tiny_tokenizer: Any) -> None:
    chat = dataset(workspace / "chat.jsonl", "chat_template")
    prepared = prepare(config(workspace, datasets=(dataset(workspace / "alpaca.jsonl"), chat)), tiny_tokenizer)
    train = prepared.train
    alpaca, chat_path = workspace / "alpaca.jsonl", workspace / "chat.jsonl"
    assert train.origin(5) == (str(alpaca), 5) and train.origin(64 + 4) == (str(chat_path), 4)
    # origin() is an index (from 0); what people read counts rows from 1, as lines are counted
    assert describe_examples(train, [64 + 4, 873 % 64, 12, 12, 5]) == f"{alpaca} rows 6, 13, 42; {chat_path} row 5"
    assert describe_examples(train, [3]) == f"{alpaca} row 4"
    assert describe_examples(train, []) == "no examples"
    many = describe_examples(train, range(100))
    assert many == f"{alpaca} rows {', '.join(map(str, range(1, 21)))}; and 80 more rows"
