"""`preprocess CONFIG [--show N]` end to end from a compiled run plan (the bundle's config.yaml), and the data
sources it reads: local files of each kind and folders, Hub datasets (offline: an error naming the dataset).
Problems propagate as RuntimeUserError subclasses; `python -m tunefile.runtime` prints them as one line."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import require_module

require_module("torch", "make install")

from tunefile.compiler.pipeline import TargetOptions, compile_config  # noqa: E402
from tunefile.compiler.render.config_yaml import dataset_plan  # noqa: E402
from tunefile.compiler.spec import DatasetSpec  # noqa: E402
from tunefile.runtime.__main__ import main  # noqa: E402
from tunefile.runtime.config import ConfigFileError  # noqa: E402
from tunefile.runtime.data.errors import DataError  # noqa: E402
from tunefile.runtime.data.preprocess import GREEN, RESET, render_example, run_preprocess  # noqa: E402
from tunefile.runtime.data.sources import count_rows, iter_rows, resolve_source  # noqa: E402
from tunefile.runtime.errors import RuntimeUserError  # noqa: E402
from tunefile.schemas.run_plan import DatasetPlan  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
TEST_DATA = Path(__file__).resolve().parent / "data"


def write_config(root: Path, model: Path, datasets: list[dict[str, Any]], **values: Any) -> Path:
    """The bundle's config.yaml (the run plan) compiled from a user's YAML, as `tunefile compile` writes it."""
    config = {"base_model": str(model), "datasets": datasets, "sequence_len": 128, "seed": 42,
              "dataset_prepared_path": str(root / "prepared"), "val_set_size": 0.0, "train_on_inputs": False,
              "sample_packing": False, "micro_batch_size": 2, "output_dir": str(root / "out"), "max_steps": 1}
    config.update(values)
    source = root / "cfg.yml"
    source.write_text(yaml.safe_dump(config), encoding="utf-8")
    path = root / "bundle" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(compile_config(source, TargetOptions(target="cpu")).files["config.yaml"], encoding="utf-8")
    return path


def source_of(path: Path | str, type: str = "alpaca", **options: Any) -> DatasetPlan:
    return dataset_plan(DatasetSpec(path=str(path), type=type, **options))


def test_summary_then_reuse(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, tiny_model_dir, [{"path": str(EXAMPLES / "alpaca.jsonl"), "type": "alpaca"}],
                          val_set_size=0.125)
    assert main(["preprocess", str(config)]) == 0
    out = capsys.readouterr().out
    assert "(built)" in out and "rows: 64 read from 1 dataset(s)" in out
    assert "examples: 56 train, 8 eval" in out and "dropped rows: 0" in out and "split rows: 0" in out
    assert "trained" in out and "packing efficiency" not in out and "leading padding" not in out
    assert run_preprocess(config) == 0
    assert "(reused)" in capsys.readouterr().out


def test_show_marks_trained_tokens_with_brackets_off_a_terminal(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path, tiny_model_dir, [{"path": str(EXAMPLES / "chat.jsonl"), "type": "chat_template"}])
    out = io.StringIO()
    assert run_preprocess(config, show=2, out=out) == 0
    text = out.getvalue()
    assert "--- example 1 (" in text and "--- example 2 (" in text and "--- example 3" not in text
    assert f"trained; from {EXAMPLES / 'chat.jsonl'} row 1) ---" in text  # where it came from, counted from 1
    assert "<|im_start|>user\nSay red.<|im_end|>\n<|im_start|>assistant\n[[RED<|im_end|>]]\n" in text
    assert "\033[" not in text


def test_show_uses_colour_on_a_terminal(tiny_tokenizer: Any) -> None:
    ids = tiny_tokenizer("Say red.", add_special_tokens=False)["input_ids"]
    labels = [-100] * (len(ids) - 1) + ids[-1:]
    assert render_example(tiny_tokenizer, ids, labels, colour=True) == f"Say red{GREEN}.{RESET}"
    assert render_example(tiny_tokenizer, ids, labels, colour=False) == "Say red[[.]]"
    assert render_example(tiny_tokenizer, [], [], colour=False) == ""


def test_completion_summary_reports_split_rows_and_packing(tmp_path: Path, tiny_model_dir: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, tiny_model_dir,
                          [{"path": str(EXAMPLES / "corpus.jsonl"), "type": "completion", "field": "text"}],
                          sequence_len=64, sample_packing=True)
    assert run_preprocess(config) == 0
    out = capsys.readouterr().out
    assert "rows: 48 read" in out and "dropped rows: 0" in out
    assert "split rows: 9 (into 18 chunks of at most sequence_len tokens)" in out
    assert "packing efficiency: " in out


def test_summary_counts_leading_padding_stripped(tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer: Any,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    pad = tiny_tokenizer.pad_token_id
    rows = [{"input_ids": [pad, 10, 11]}, {"input_ids": [pad, pad]}, {"input_ids": [10, pad, 11]}]
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = write_config(tmp_path, tiny_model_dir, [{"path": str(tmp_path / "ids.jsonl"), "type": "pretokenized"}])
    assert run_preprocess(config) == 0
    out = capsys.readouterr().out
    assert "dropped rows: 1 (only padding 1)" in out
    assert "leading padding stripped: 2 examples started with the pad token" in out


def test_problems_propagate_as_user_errors_and_main_prints_one_line(tmp_path: Path, tiny_model_dir: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, tiny_model_dir, [{"path": str(tmp_path / "nope.jsonl"), "type": "alpaca"}])
    with pytest.raises(DataError, match=r"dataset .*nope.jsonl: no such file or folder") as caught:
        run_preprocess(config)
    assert isinstance(caught.value, RuntimeUserError)
    assert main(["preprocess", str(config)]) == 2
    err = capsys.readouterr().err
    assert "nope.jsonl: no such file or folder" in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_file_that_is_not_a_run_plan_is_a_config_file_error(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"base_model": "x", "datasets": []}))
    with pytest.raises(ConfigFileError, match="run_plan_version"):
        run_preprocess(tmp_path / "config.yaml")


def test_offline_hub_dataset_error_names_the_dataset(tmp_path: Path, tiny_model_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub

    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    # The libraries read these at import time; the test process imported them already.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    entry = {"path": "tunefile-tests/not-cached-anywhere", "name": "v1", "split": "train", "type": "alpaca"}
    message = (r"dataset tunefile-tests/not-cached-anywhere \(v1\): not in the local Hugging Face cache and the hub "
               r"is offline")
    with pytest.raises(DataError, match=message):
        next(iter_rows(resolve_source(source_of(**entry), offline=True)))
    config = write_config(tmp_path, tiny_model_dir, [entry])
    with pytest.raises(DataError, match=message):
        run_preprocess(config)


ROWS = [{"instruction": f"Say {colour}.", "input": "", "output": colour.upper()} for colour in ("red", "blue", "tan")]


def test_local_file_kinds_stream_the_same_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n\n" for row in ROWS))
    (tmp_path / "rows.json").write_text(json.dumps(ROWS, indent=2))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "rows.parquet", row_group_size=1)
    (tmp_path / "rows.csv").write_text("instruction,input,output\n" + "".join(
        f"{r['instruction']},,{r['output']}\n" for r in ROWS))
    for name in ("rows.jsonl", "rows.json", "rows.parquet", "rows.csv"):
        source = resolve_source(source_of(tmp_path / name), offline=False)
        assert list(iter_rows(source)) == ROWS, name
        assert count_rows(source) == 3


def test_a_json_array_larger_than_a_read_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tunefile.runtime.data import sources

    monkeypatch.setattr(sources, "_CHUNK_CHARS", 7)  # every row straddles several reads
    rows = [{"text": f"row {i} " + "x" * (i % 13)} for i in range(50)]
    (tmp_path / "big.json").write_text(json.dumps(rows))
    assert list(iter_rows(resolve_source(source_of(tmp_path / "big.json", "completion"), offline=False))) == rows


def test_folder_reads_all_data_files_in_name_order(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    (folder / "part").mkdir(parents=True)
    shutil.copy(TEST_DATA / "alpaca_small.jsonl", folder / "a.jsonl")
    (folder / "part" / "b.json").write_text(json.dumps(ROWS[:1]))
    (folder / "notes.md").write_text("not data")
    (folder / ".hidden.jsonl").write_text("not json")
    source = resolve_source(source_of(folder), offline=False)
    assert [p.name for p in source.files] == ["a.jsonl", "b.json"]
    assert len(list(iter_rows(source))) == 4


def test_hub_loader_path_with_data_files_reads_through_datasets(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))  # not the user's cache
    shutil.copy(TEST_DATA / "alpaca_small.jsonl", tmp_path / "small.jsonl")
    entry = source_of("json", data_files=[str(tmp_path / "small.jsonl")], split="train")
    source = resolve_source(entry, offline=False)
    assert not source.is_local
    rows = list(iter_rows(source))
    assert len(rows) == count_rows(source) == 3 and rows[0]["output"] == "74"


def test_invalid_jsonl_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        list(iter_rows(resolve_source(source_of(tmp_path / "bad.jsonl", "completion"), offline=False)))
