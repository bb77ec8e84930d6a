"""The prepared-data cache: reused when nothing that changes tokens changed, rebuilt when something did;
streamed into several shards; an eval split held out by seed; incomplete caches never trusted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from helpers import require_module

require_module("torch", "make install")

import numpy as np  # noqa: E402

from tunefile.runtime.config import RunConfig  # noqa: E402
from tunefile.runtime.data import build as build_module  # noqa: E402
from tunefile.runtime.data import prepare_data  # noqa: E402
from tunefile.runtime.data.cache import COMPLETE  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"


def config(tmp_path: Path, model: Path, **values: Any) -> RunConfig:
    base: dict[str, Any] = {
        "base_model": str(model), "sequence_len": 256, "seed": 42, "val_set_size": 0.0, "train_on_inputs": False,
        "dataset_prepared_path": str(tmp_path / "prepared"), "resolved": {},
        "datasets": [{"path": str(tmp_path / "alpaca.jsonl"), "type": "alpaca"}],
    }
    base.update(values)
    return RunConfig(values=base, bundle_dir=tmp_path)


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

    def counting(cfg: Any, tokenizer: Any, sources: Any, staging: Path, **kwargs: Any) -> Any:
        calls.append(staging)
        return real(cfg, tokenizer, sources, staging, **kwargs)

    monkeypatch.setattr(build_module, "_tokenise", counting)
    return calls


def test_second_prepare_reuses_the_cache(workspace: Path, tiny_model_dir: Path, tiny_tokenizer: Any,
                                         tokenise_calls: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(workspace, tiny_model_dir)
    first = prepare_data(cfg, tiny_tokenizer)
    stats_mtime = (first.cache_dir / "stats.json").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        second = prepare_data(cfg, tiny_tokenizer)
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
    chat = [{"path": str(workspace / "chat.jsonl"), "type": "chat_template"}]
    before = config(workspace, tiny_model_dir, datasets=chat)
    first = prepare_data(before, tiny_tokenizer)
    after = dict(before.values)
    if change == "data file":
        with (workspace / "chat.jsonl").open("a") as handle:
            handle.write(json.dumps({"messages": [{"role": "user", "content": "Say red."},
                                                  {"role": "assistant", "content": "RED"}]}) + "\n")
    elif change == "sequence_len":
        after["sequence_len"] = 128
    elif change == "chat template":
        after["chat_template"] = "llama3"
    elif change == "special tokens":
        after["special_tokens"] = {"eos_token": "<|im_end|>"}
    elif change == "train_on_inputs":
        after["train_on_inputs"] = True
    else:
        after["datasets"] = [{**chat[0], "train_on_eos": "all"}]
    second = prepare_data(RunConfig(values=after, bundle_dir=workspace), tiny_tokenizer)
    assert len(tokenise_calls) == 2
    assert second.cache_dir != first.cache_dir and not second.stats["reused"]
    if change == "data file":
        assert len(second.train) == len(first.train) + 1


def test_tokenizer_change_rebuilds(workspace: Path, tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    from transformers import AutoTokenizer

    cfg = config(workspace, tiny_model_dir)
    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    other.add_tokens(["zebracorn"])
    assert prepare_data(cfg, tiny_tokenizer).cache_dir != prepare_data(cfg, other).cache_dir


def test_tokenisation_streams_into_shards(workspace: Path, tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    cfg = config(workspace, tiny_model_dir)
    sharded = prepare_data(cfg, tiny_tokenizer, shard_rows=10)
    index = json.loads((sharded.cache_dir / "train" / "index.json").read_text())
    assert [shard["rows"] for shard in index["shards"]] == [10, 10, 10, 10, 10, 10, 4]
    assert len(list((sharded.cache_dir / "train").glob("*-input_ids.npy"))) == 7
    # The same examples as one big shard would hold, in source order, memory-mapped.
    whole = prepare_data(config(workspace, tiny_model_dir, dataset_prepared_path=str(workspace / "p2")),
                         tiny_tokenizer)
    assert len(sharded.train) == len(whole.train) == 64
    assert np.array_equal(sharded.train.lengths, whole.train.lengths)
    for i in (0, 9, 10, 33, 63, -1):
        assert np.array_equal(sharded.train[i]["input_ids"], whole.train[i]["input_ids"])
        assert np.array_equal(sharded.train[i]["labels"], whole.train[i]["labels"])
    assert isinstance(sharded.train[0]["input_ids"], np.memmap)
    with pytest.raises(IndexError):
        sharded.train[64]


def test_eval_split_is_held_out_by_seed(workspace: Path, tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    def prepared(seed: int, path: str) -> Any:
        return prepare_data(config(workspace, tiny_model_dir, val_set_size=0.25, seed=seed,
                                   dataset_prepared_path=str(workspace / path)), tiny_tokenizer)

    def texts(dataset: Any) -> set[str]:
        return {tiny_tokenizer.decode(dataset[i]["input_ids"]) for i in range(len(dataset))}

    first, again, other = prepared(1, "a"), prepared(1, "b"), prepared(2, "c")
    assert (len(first.train), len(first.eval)) == (48, 16)
    assert first.stats["eval"]["examples"] == 16
    assert not texts(first.train) & texts(first.eval)
    assert texts(first.eval) == texts(again.eval)
    assert texts(first.eval) != texts(other.eval)


def test_incomplete_cache_is_rebuilt(workspace: Path, tiny_model_dir: Path, tiny_tokenizer: Any,
                                     tokenise_calls: list[Path]) -> None:
    cfg = config(workspace, tiny_model_dir)
    directory = prepare_data(cfg, tiny_tokenizer).cache_dir
    (directory / COMPLETE).unlink()  # as if a build had died before its last step
    rebuilt = prepare_data(cfg, tiny_tokenizer)
    assert len(tokenise_calls) == 2 and rebuilt.cache_dir == directory and (directory / COMPLETE).is_file()
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_other_ranks_wait_at_the_barrier_then_open_the_cache(workspace: Path, tiny_model_dir: Path,
                                                             tiny_tokenizer: Any, tokenise_calls: list[Path]) -> None:
    cfg = config(workspace, tiny_model_dir)
    order: list[str] = []
    main = prepare_data(cfg, tiny_tokenizer, is_main_process=True, barrier=lambda: order.append("main at barrier"))
    other = prepare_data(cfg, tiny_tokenizer, is_main_process=False,
                         barrier=lambda: order.append("other at barrier"))
    assert len(tokenise_calls) == 1 and other.cache_dir == main.cache_dir and len(other.train) == 64
    assert order == ["main at barrier", "other at barrier"]


def test_rows_too_long_or_malformed_are_dropped_and_counted(workspace: Path, tiny_model_dir: Path,
                                                            tiny_tokenizer: Any) -> None:
    rows = [{"instruction": "Say red.", "output": "RED"}, {"instruction": "Say red.", "output": "RED " * 200},
            {"instruction": "no output"}, {"instruction": "Say blue.", "output": "BLUE"}]
    data = workspace / "mixed.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prepared = prepare_data(config(workspace, tiny_model_dir, sequence_len=64,
                                   datasets=[{"path": str(data), "type": "alpaca"}]), tiny_tokenizer)
    stats = prepared.stats
    assert (stats["rows"], len(prepared.train), stats["dropped_rows"]) == (4, 2, 2)
    assert stats["dropped"] == {"too_long": 1, "malformed": 1}
    assert stats["problems"] == [f"{data} row 2: missing field 'output'"]
