"""Axolotl's data features from YAML to a finished run on the tiny model: streamed SFT datasets (streaming: true
with datasets), dataset_exact_deduplication with group_by_length, and the instruction types alpaca:chat,
alpaca:phi and jeopardy as `preprocess --show` renders them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import require_module

require_module("torch", "make install")

from runtime_bundles import compile_bundle, launch, train_losses, workspace, write_config  # noqa: E402
from tunefile.compiler.pipeline import TargetOptions, compile_config  # noqa: E402
from tunefile.runtime.config import load_run_plan  # noqa: E402
from tunefile.runtime.data.preprocess import run_preprocess  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"


def test_a_streamed_sft_run_trains_max_steps(tmp_path: Path, tiny_model_dir: Path) -> None:
    """examples/streaming/sft.yaml in small: alpaca rows streamed, formatted, masked and packed as training goes."""
    root = workspace(tmp_path, tiny_model_dir)
    config = write_config(root, fmt="alpaca", streaming=True, sample_packing=True, max_steps=5)
    bundle = compile_bundle(config)
    plan = load_run_plan(bundle / "config.yaml")
    assert plan.data.streaming and plan.data.datasets[0].type == "alpaca"
    launch(bundle)
    losses = train_losses(root / "out")
    assert len(losses) == 5 and all(math.isfinite(loss) for loss in losses)
    assert not (root / "prepared").exists()  # nothing prepared, nothing cached


def test_deduplicated_length_grouped_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    """examples/llama-3/lora-1b-deduplicate-sft.yml lists one dataset twice; with dataset_exact_deduplication the
    second copy adds nothing, and group_by_length (no packing) batches the rows by length."""
    root = workspace(tmp_path, tiny_model_dir)
    twice = [{"path": "data/alpaca.jsonl", "type": "alpaca:chat"}] * 2
    config = write_config(root, datasets=twice, dataset_exact_deduplication=True, group_by_length=True,
                          sample_packing=False, val_set_size=0.25, max_steps=3)
    bundle = compile_bundle(config)
    plan = load_run_plan(bundle / "config.yaml")
    assert plan.data.exact_deduplication and plan.data.group_by_length and plan.data.packing_attention is None
    launch(bundle)
    losses = train_losses(root / "out")
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    [stats_file] = (root / "prepared").glob("*/stats.json")
    stats = json.loads(stats_file.read_text(encoding="utf-8"))
    # 128 rows read; the 64 of the second copy are repeats, whichever split their first copy fell in.
    assert stats["rows"] == 128 and stats["dropped"] == {"duplicate": 64}
    assert stats["train"]["examples"] + stats["eval"]["examples"] == 64


class _Output:
    """A text sink that is not a terminal (so no colour)."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> None:
        self.text += text


def compiled(root: Path, model: Path, datasets: list[dict[str, Any]]) -> Path:
    config = {"base_model": str(model), "datasets": datasets, "sequence_len": 256, "micro_batch_size": 2,
              "dataset_prepared_path": str(root / "prepared"), "output_dir": str(root / "out"), "max_steps": 1}
    source = root / "cfg.yml"
    source.write_text(yaml.safe_dump(config), encoding="utf-8")
    path = root / "bundle" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(compile_config(source, TargetOptions(target="cpu")).files["config.yaml"], encoding="utf-8")
    return path


@pytest.mark.parametrize("type, prompt_marks", [
    ("alpaca:chat", ["SYSTEM: Below is an instruction", "\nUSER: Add the two numbers.\n25 + 49\nASSISTANT:[["]),
    ("alpaca:phi", ["<|system|>\nBelow is an instruction", "<|end|>25 + 49<|assistant|>[["]),
    ("jeopardy", ["### Instruction:\nThis planet is the largest.\n\n### Input:\nASTRONOMY\n\n### Response:\n"
                  "[[what is Jupiter"]),
])
def test_instruction_types_render_as_axolotl_prompts(tmp_path: Path, tiny_model_dir: Path, type: str,
                                                     prompt_marks: list[str]) -> None:
    if type == "jeopardy":
        rows = tmp_path / "jeopardy.jsonl"
        rows.write_text(json.dumps({"question": "This planet is the largest.", "category": "ASTRONOMY",
                                    "answer": "Jupiter"}) + "\n", encoding="utf-8")
    else:
        rows = EXAMPLES / "alpaca.jsonl"
    out = _Output()
    assert run_preprocess(compiled(tmp_path, tiny_model_dir, [{"path": str(rows), "type": type}]), show=1,
                          out=out) == 0
    for mark in prompt_marks:  # the prompt untrained, the response (from [[) trained
        assert mark in out.text
