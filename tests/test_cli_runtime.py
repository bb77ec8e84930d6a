"""The one-command front door the Axolotl tutorial promises: `tunefile train`, `tunefile preprocess` and
`tunefile tiny-model`, run as a user runs them (the installed console script, in a subprocess)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from runtime_bundles import build_tiny_model, metrics, run_tunefile, workspace, write_config


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-model")


def tunefile(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # PATH without the virtual environment, as when a user runs .venv/bin/tunefile without activating it.
    return run_tunefile(*args, cwd=cwd, env={"NO_COLOR": "1", "PATH": "/usr/local/bin:/usr/bin:/bin"})


def test_train_compiles_into_output_dir_bundle_and_runs_it(tmp_path: Path, tiny_model: Path) -> None:
    root = workspace(tmp_path, tiny_model)
    write_config(root, adapter="lora", lora_target_linear=True, max_steps=4, sample_packing=True)
    result = tunefile("train", "cfg.yml", cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    bundle = root / "out" / "bundle"
    assert (bundle / "manifest.json").exists() and (bundle / "launch.sh").exists()
    # No target flag: the local hardware was detected (CPU on a machine without nvidia-smi) and recorded.
    assert "detected on the compiling machine:" in (bundle / "README.md").read_text(encoding="utf-8")
    assert [record["step"] for record in metrics(root / "out") if "loss" in record] == [1, 2, 3, 4]
    assert (root / "out" / "adapter_model.safetensors").exists()
    assert tunefile("verify", str(bundle), cwd=root).returncode == 0

    # A second `train` recompiles over its own bundle (no --force needed) and finds the run complete.
    again = tunefile("train", "cfg.yml", cwd=root)
    assert again.returncode == 0, again.stderr[-3000:]


def test_train_reports_config_errors_without_running(tmp_path: Path, tiny_model: Path) -> None:
    root = workspace(tmp_path, tiny_model)
    write_config(root, lora_rr=8)
    result = tunefile("train", "cfg.yml", cwd=root)
    assert result.returncode == 2
    assert "cfg.yml:" in result.stderr and "lora_rr" in result.stderr and "lora_r" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (root / "out").exists()


def test_preprocess_summarises_and_shows_trained_tokens(tmp_path: Path, tiny_model: Path) -> None:
    root = workspace(tmp_path, tiny_model)
    write_config(root, sample_packing=True, train_on_inputs=False)
    result = tunefile("preprocess", "cfg.yml", "--show", "1", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rows" in result.stdout and "tokens" in result.stdout and "packing efficiency" in result.stdout
    # Not a terminal: trained tokens are bracketed. With train_on_inputs false only the answer is trained,
    # and the first alpaca row's answer is "74".
    assert "[" in result.stdout and "74" in result.stdout.split("[", 1)[1]
    assert any((root / "prepared").iterdir())
    assert not (root / "out" / "bundle").exists()  # a temporary bundle: the run's record stays untouched


def test_preprocess_names_a_missing_data_file(tmp_path: Path, tiny_model: Path) -> None:
    root = workspace(tmp_path, tiny_model)
    write_config(root)
    (root / "data" / "alpaca.jsonl").unlink()
    result = tunefile("preprocess", "cfg.yml", cwd=root)
    assert result.returncode == 2
    assert "alpaca.jsonl" in result.stderr and "Traceback" not in result.stderr


def test_tiny_model_command_saves_a_hub_style_checkpoint(tmp_path: Path) -> None:
    result = tunefile("tiny-model", str(tmp_path / "m"), "--arch", "mistral", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == ""  # nothing else's chatter either (DeepSpeed, when installed, names its accelerator)
    config = json.loads((tmp_path / "m" / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "mistral"
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert (tmp_path / "m" / "tokenizer.json").exists()
    assert "chat_template" in (tmp_path / "m" / "tokenizer_config.json").read_text(encoding="utf-8") or \
        (tmp_path / "m" / "chat_template.jinja").exists()
