"""The memory estimate against what the GPU measured (bench/results/vs_hf_*.json, one H200): `tunefile explain`
should tell a user whether a run fits before it is queued, with LoRA's dropout, the fused kernels and selective
checkpointing counted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import write
from tunefile.compiler.pipeline import TargetOptions, compile_config

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
H200 = TargetOptions(gpu="h200")
BASE_MODELS = {"B": "meta-llama/Llama-3.1-8B", "A": "meta-llama/Llama-3.2-1B"}  # the shapes bench/vs_hf.py builds


def measured_runs() -> list[tuple[str, str, dict[str, Any], float]]:
    """(file, workload, the run's config keys, peak allocated GiB) of every tunefile run of the vs_hf records."""
    runs = []
    for name in ("vs_hf_B_first.json", "vs_hf_B.json", "vs_hf_A.json"):
        record = json.loads((RESULTS / name).read_text(encoding="utf-8"))
        runs += [(name, run["workload"], run["config"], run["peak_allocated_gib"]) for run in record["runs"]
                 if run["side"] == "tunefile" and run["ok"]]
    return runs


def estimate(tmp_path: Path, workload: str, extra: dict[str, Any], *, replayed: bool) -> float:
    config = {"base_model": BASE_MODELS[workload], "datasets": [{"path": "data.jsonl", "type": "pretokenized"}],
              "adapter": "lora", "lora_r": 32, "lora_alpha": 64, "lora_dropout": 0.05, "lora_target_linear": True,
              "sequence_len": 4096 if workload == "B" else 2048, "sample_packing": workload == "A",
              "micro_batch_size": 1 if workload == "B" else 4, "bf16": True,
              "lora_dropout_recompute": replayed} | extra
    memory = compile_config(write(tmp_path / "cfg.yml", yaml.safe_dump(config)), H200).plan.memory
    return memory.total - memory.overhead  # the GPU figure is allocated memory: no CUDA context


# The first B call ran before replayed dropout existed (peft's dropout); the later calls replay it by default.
CASES = [(file, workload, config, measured) for file, workload, config, measured in measured_runs()]


@pytest.mark.parametrize("file, workload, config, measured", CASES,
                         ids=[f"{c[0]}:{c[1]}:{sorted(c[2]) or 'defaults'}" for c in CASES])
def test_the_estimate_is_near_the_measured_peak(tmp_path: Path, file: str, workload: str, config: dict[str, Any],
                                                measured: float) -> None:
    got = estimate(tmp_path, workload, config, replayed=file != "vs_hf_B_first.json")
    assert got == pytest.approx(measured, rel=0.10), f"estimated {got:.1f} GiB, measured {measured:.1f} GiB"


def test_every_lever_lowers_the_estimate_in_the_measured_order(tmp_path: Path) -> None:
    fused = {"plugins": ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin",
                         "axolotl.integrations.liger.LigerPlugin"], "cut_cross_entropy": True,
             "liger_rms_norm": True, "liger_glu_activation": True}
    plain = estimate(tmp_path, "B", {}, replayed=False)
    with_kernels = estimate(tmp_path, "B", fused, replayed=False)
    replayed = estimate(tmp_path, "B", fused, replayed=True)
    no_dropout = estimate(tmp_path, "B", fused | {"lora_dropout": 0.0}, replayed=False)
    assert plain > with_kernels > replayed == no_dropout  # replaying keeps what no dropout keeps
