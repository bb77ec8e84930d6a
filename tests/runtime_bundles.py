"""Helpers for the runtime's end-to-end tests: build the tiny model, write a config, compile it into a
bundle with the real CLI, run the bundle's launch.sh from the config's directory, read the metrics.

Everything runs as a user would: `tunefile compile` then `bash bundle/launch.sh`, in a subprocess. Each
subprocess runs through helpers.run_process_tree: on timeout it kills the launcher and every rank it started,
and fails the test with the output's tail."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from helpers import run_process_tree

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
EXAMPLE_DATA = REPO / "examples" / "data"

# Small, fast and still learnable in ~30 steps on the tiny model; each test overrides what it studies.
BASE = {
    "sequence_len": 128,
    "micro_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_steps": 30,
    "learning_rate": 3e-3,
    "lr_scheduler": "constant_with_warmup",
    "warmup_steps": 3,
    "optimizer": "adamw_torch",
    "logging_steps": 1,
    "seed": 7,
    # The resume tests relaunch the same bundle, as a requeued job does (Axolotl's default is off).
    "auto_resume_from_checkpoints": True,
}

DATASETS = {
    "alpaca": {"path": "data/alpaca.jsonl", "type": "alpaca"},
    "chat_template": {"path": "data/chat.jsonl", "type": "chat_template"},
    "completion": {"path": "data/corpus.jsonl", "type": "completion", "field": "text"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_model(directory: Path, arch: str = "llama") -> Path:
    from tunefile.runtime.tiny_model import build_tiny_model as build

    if not (directory / "config.json").exists():
        build(directory, arch=arch, seed=0)
    return directory


def workspace(tmp: Path, model_dir: Path) -> Path:
    """A directory laid out like a user's project: the model and the example data beside the config."""
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    for source in EXAMPLE_DATA.glob("*.jsonl"):
        shutil.copy(source, tmp / "data" / source.name)
    link = tmp / "tiny-model"
    if not link.exists():
        link.symlink_to(model_dir, target_is_directory=True)
    return tmp


def write_config(tmp: Path, name: str = "cfg.yml", *, fmt: str = "alpaca", **overrides: Any) -> Path:
    values: dict[str, Any] = {"base_model": "tiny-model", "datasets": [DATASETS[fmt]],
                              "dataset_prepared_path": "prepared", "output_dir": "out"}
    values.update(BASE)
    values.update(overrides)
    path = tmp / name
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return path


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment tests run tunefile and bundles in: this venv first on PATH, offline, a free port."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra or {})
    return env


def compile_bundle(config: Path, bundle: str = "bundle", *, gpus_per_node: int | None = None,
                   target: str = "cpu") -> Path:
    # `python -m tunefile.compiler`: the console script may not be on PATH (a GPU machine's --target install).
    command = [sys.executable, "-m", "tunefile.compiler", "compile", config.name, "--output", bundle,
               "--target", target, "--force"]
    if gpus_per_node:
        command += ["--gpus-per-node", str(gpus_per_node)]
    result = run_process_tree(command, cwd=config.parent, env=subprocess_env(), timeout=120)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return config.parent / bundle


def launch(bundle: Path, *, env: dict[str, str] | None = None, check: bool = True,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`bash bundle/launch.sh` from the directory the config's relative paths start at."""
    result = run_process_tree(["bash", str(bundle / "launch.sh")], cwd=bundle.parent, env=subprocess_env(env),
                              timeout=timeout)
    if check:
        assert result.returncode == 0, f"launch.sh exited {result.returncode}:\n{result.stdout[-4000:]}\n" \
                                       f"{result.stderr[-6000:]}"
    return result


def metrics(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_losses(output_dir: Path) -> list[float]:
    return [record["loss"] for record in metrics(output_dir) if "loss" in record]


def summary(output_dir: Path) -> dict[str, Any]:
    return json.loads((output_dir / "train_summary.json").read_text(encoding="utf-8"))


def safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def run_tunefile(*args: str, cwd: Path, stdin: str | None = None, env: dict[str, str] | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The installed `tunefile` console script, as a user runs it, in ``cwd``; ``env`` adds to the defaults."""
    return run_process_tree([str(VENV_BIN / "tunefile"), *args], cwd=cwd, env=subprocess_env(env), input=stdin,
                            timeout=timeout)

