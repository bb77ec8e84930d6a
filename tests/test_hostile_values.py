"""Issue 14: values that parse but no run could have are refused at their line, exit 2: numbers without bounds or
not finite, empty paths and ids, DeepSpeed sections DeepSpeed would misread, a local config.json with impossible
sizes; and `~` is expanded for every path the runtime reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli, write

BASE = "base_model: meta-llama/Llama-3.1-8B\ndatasets: [{path: d.jsonl, type: alpaca}]\nadapter: lora\n"


def refused(tmp_path: Path, text: str, *args: str) -> str:
    config = write(tmp_path / "c.yml", text)
    code, _out, err = run_cli("validate", str(config), *args)
    assert code == 2, err
    assert "Traceback" not in err and err.strip().endswith("nothing was written."), err
    return err


@pytest.mark.parametrize("line, expected", [
    ("max_grad_norm: .inf", "c.yml:4:16: error: max_grad_norm: must be a finite number"),
    ("learning_rate: .nan", "c.yml:4:16: error: learning_rate: must be a finite number"),
    ("max_steps: 1" + "0" * 400, "c.yml:4:12: error: max_steps: must be less than or equal to 1,000,000,000"),
    ("save_steps: 2000000000", "c.yml:4:13: error: save_steps: must be less than or equal to 1,000,000,000"),
    ("eval_steps: 1e400", "c.yml:4:13: error: eval_steps:"),
    ("lora_r: 99999999999", "c.yml:4:9: error: lora_r:"),
    # once an OverflowError (exit 3) for the string, and accepted as a count for the number
    ("model_parameters: 1" + "0" * 400 + "B", "c.yml:4:19: error: model_parameters: cannot read a parameter count"),
    ("model_parameters: 1" + "0" * 400, "c.yml:4:19: error: model_parameters: cannot read a parameter count"),
    ("model_parameters: 2000T", "c.yml:4:19: error: model_parameters: cannot read a parameter count from '2000T'"),
])
def test_numbers_without_bounds_and_empty_ids_are_refused(tmp_path: Path, line: str, expected: str) -> None:
    assert expected in refused(tmp_path, BASE + line + "\n")


def test_empty_paths_are_refused_each_at_its_line(tmp_path: Path) -> None:
    err = refused(tmp_path, 'base_model: ""\ndatasets: [{path: "", type: alpaca}]\noutput_dir: ""\n')
    assert "c.yml:1:13: error: base_model: must not be empty" in err
    assert "c.yml:2:19: error: datasets[0].path: must not be empty" in err
    assert "c.yml:3:13: error: output_dir: must not be empty" in err


LONG_NAME = "x" * 300  # past the 255 bytes a file system allows in one name: stat() raises, once exit 3


@pytest.mark.parametrize("line, expected", [
    (f"base_model: ./{LONG_NAME}", "c.yml:1:13: error: base_model: a name in the path (xxxxxxxxxxxxxxxxxxxx...) "
                                   "is 300 bytes long; file systems allow at most 255 per name"),
    (f"base_model: ~/{LONG_NAME}/model", "c.yml:1:13: error: base_model: a name in the path"),
    (f"base_model: /{'a/' * 2100}m", "c.yml:1:13: error: base_model: the path is 4,202 bytes long; a path holds "
                                     "at most 4,095"),
])
def test_a_path_past_the_file_system_limits_is_located(tmp_path: Path, line: str, expected: str) -> None:
    assert expected in refused(tmp_path, line + "\n" + BASE.split("\n", 1)[1])


@pytest.mark.parametrize("key", ["deepspeed", "output_dir", "dataset_prepared_path"])
def test_each_path_key_has_the_name_limit(tmp_path: Path, key: str) -> None:
    assert f"error: {key}: a name in the path" in refused(tmp_path, BASE + f"{key}: ./{LONG_NAME}\n")


def test_a_dataset_path_past_the_name_limit_is_located(tmp_path: Path) -> None:
    text = BASE.replace("path: d.jsonl", f"path: data/{LONG_NAME}.jsonl")
    assert "c.yml:2:19: error: datasets[0].path: a name in the path" in refused(tmp_path, text)


def test_a_target_file_name_past_the_limit_is_no_target(tmp_path: Path) -> None:
    err = refused(tmp_path, BASE, "--target", f"./{LONG_NAME}.yml")
    assert "is neither a built-in name nor a file" in err


def test_node_counts_have_an_upper_bound(tmp_path: Path) -> None:
    assert "--nodes must be at most 100,000" in refused(tmp_path, BASE, "--gpu", "h100-80gb", "--nodes",
                                                        "1" + "0" * 20)
    write(tmp_path / "t.yml", "gpu: h100-80gb\nnodes: 1000000000000\n")
    assert "t.yml:2:8: error: nodes: must be at most 100,000, got 1000000000000" in refused(
        tmp_path, BASE, "--target", str(tmp_path / "t.yml"))


@pytest.mark.parametrize("value", ['"a\\rb"', '"a\\nb"', '"a\\0b"'])
def test_a_target_env_value_that_breaks_a_line_is_located(tmp_path: Path, value: str) -> None:
    """A carriage return once reached launch.sh's renderer: exit 3 instead of the target file's line."""
    write(tmp_path / "t.yml", f"gpu: h100-80gb\nenv:\n  FOO: {value}\n")
    err = refused(tmp_path, BASE, "--target", str(tmp_path / "t.yml"))
    assert "t.yml:3:8: error: env.FOO: environment values must be one line" in err, err


@pytest.mark.parametrize("section, expected", [
    ('{"zero_optimization": {"stage": -1}}', "zero_optimization.stage: must be 0, 1, 2 or 3 (got -1)"),
    ('{"zero_optimization": {"stage": 2.7}}', "zero_optimization.stage: must be 0, 1, 2 or 3 (got 2.7)"),
    ('{"zero_optimization": {"stage": true}}', "zero_optimization.stage: must be 0, 1, 2 or 3 (got true)"),
    ('{"zero_optimization": {"stage": "three"}}', 'zero_optimization.stage: must be 0, 1, 2 or 3 (got "three")'),
    ('{"zero_optimization": {"stage": null}}', "zero_optimization.stage: must be 0, 1, 2 or 3 (got null)"),
    ('{"zero_optimization": {"stage": 5}}', "zero_optimization.stage: must be 0, 1, 2 or 3 (got 5)"),
    ('{"zero_optimization": [1, 2]}', "zero_optimization: must be a mapping (got list)"),
    ('{"bf16": [1]}', "bf16: must be a mapping"),
    ('{"bf16": {"enabled": "yes"}}', 'bf16.enabled: must be true, false or "auto" (got "yes")'),
])
def test_deepspeed_sections_are_validated(tmp_path: Path, section: str, expected: str) -> None:
    write(tmp_path / "ds.json", section)
    err = refused(tmp_path, BASE + "deepspeed: ds.json\n", "--gpu", "h100-80gb", "--gpus-per-node", "2")
    assert "ds.json:1:" in err and expected in err, err


@pytest.mark.parametrize("value, shown", [("0", "0"), ("-64", "-64"), ("1e200", "1e+200"), ("true", "true")])
def test_a_local_config_json_with_impossible_sizes_is_named(tmp_path: Path, value: str, shown: str) -> None:
    shape = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
             "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 100}
    text = json.dumps(shape)[:-1] + f', "num_attention_heads": {value}}}'  # the last one counts, as in json.loads
    write(tmp_path / "model" / "config.json", text)
    err = refused(tmp_path, "base_model: model\ndatasets: [{path: d.jsonl, type: alpaca}]\n")
    assert f"config.json:1:1: error: num_attention_heads: must be a whole number from 1 to 100,000 (got {shown})" \
        in err, err


# --- `~`, the same for every path ----------------------------------------------------------------------------


def test_job_sbatch_expands_a_home_output_dir(tmp_path: Path) -> None:
    from compile_helpers import compiled

    files = compiled(tmp_path, BASE + "output_dir: ~/runs/out\n")
    assert "OUTPUT_DIR=\"$HOME\"/runs/out" in files["job.sbatch"]
    assert "OUTPUT_DIR=./model-out" in compiled(tmp_path, BASE)["job.sbatch"]


def test_the_runtime_expands_home_in_base_model_output_dir_and_adapter(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from tunefile.runtime.checkpoint import resume_candidates
    from tunefile.runtime.errors import RuntimeUserError
    from tunefile.runtime.model import resolve_model_source

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    assert resolve_model_source("~/models/tiny") == str(tmp_path / "models" / "tiny")
    with pytest.raises(RuntimeUserError, match="~/models/absent: not a model directory"):
        resolve_model_source("~/models/absent")
    checkpoint = tmp_path / "out" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text("3\n")
    assert resume_candidates(tmp_path / "out", resume_from="~/out/checkpoint-3", auto_resume=False) == [checkpoint]
