"""bench/vs_hf.py: its --smoke run on the CPU (both sides train the tiny model and the record says so), a run that
hits its time limit is recorded and the call goes on, and the FLOP count of the MFU estimate is the model's."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from runtime_bundles import compile_bundle, workspace, write_config

sys.path.insert(0, str(REPO / "bench"))

import vs_hf  # noqa: E402 - the bench scripts are not a package


def test_the_smoke_run_trains_both_sides_and_records_them(tmp_path: Path, tiny_model_dir: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "tiny-model").symlink_to(tiny_model_dir, target_is_directory=True)  # made once per test session
    results = tmp_path / "vs_hf.json"
    command = [sys.executable, str(REPO / "bench" / "vs_hf.py"), "--smoke", "--work", str(work), "--results",
               str(results), "--workloads", "A", "--steps", "4", "--warmup", "1",
               # A configuration stopped by its own time limit long before its first step: a hung run.
               "--hf", "A:name=hf-stopped,rows=8,timeout=1"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # one run did not finish
    record = json.loads(results.read_text(encoding="utf-8"))
    runs = {run["name"]: run for run in record["runs"]}
    assert sorted(runs) == ["hf-sdpa-flat8", "hf-stopped", "tf-A-mb2"]

    hf, tunefile = runs["hf-sdpa-flat8"], runs["tf-A-mb2"]
    assert (hf["side"], tunefile["side"]) == ("hf", "tunefile")
    for run in (hf, tunefile):
        assert run["ok"] and run["status"] == "ok" and run["steps_done"] == 4, run
        assert len(run["losses"]) == 4 and all(math.isfinite(loss) for loss in run["losses"])
        assert run["tokens_per_s"] > 0
    assert tunefile["runtime_decisions"]["device"] == "cpu"
    assert tunefile["startup"]["measured_from"] == "launch.sh started"
    assert 0 < tunefile["startup"]["seconds_to_first_step"] < tunefile["wall_s"]
    stopped = runs["hf-stopped"]
    assert stopped["status"] == "TIMEOUT" and not stopped["ok"] and stopped["steps_done"] == 0
    assert "TIMEOUT" in done.stdout  # in the table

    # The ratio is against the Hugging Face run that finished; the stopped one is no candidate.
    assert record["ratios"]["A"]["best_hf"] == "hf-sdpa-flat8"
    ratio = record["ratios"]["A"]["tunefile"]["tf-A-mb2"]["tokens_per_s"]
    assert ratio == pytest.approx(tunefile["tokens_per_s"] / hf["tokens_per_s"], abs=1e-3)
    # The analytic LoRA size of the FLOP count is what peft built on the Hugging Face side.
    assert record["flops_per_token"]["A"]["n_lora"] == hf["trainable_parameters"]
    assert record["matmul_ceiling"]["tflops"] > 0 and hf["mfu"] > 0
    assert record["smoke"] is True and record["versions"]["torch"] and record["settings"]["steps"] == 4


def test_the_frozen_matmul_count_is_the_llama_shaped_models(tmp_path: Path) -> None:
    """Every nn.Linear weight of the 1B shape (built on the meta device: no memory) is one frozen matmul weight."""
    import torch
    from llama_shaped_model import SHAPES
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, tie_word_embeddings=False, **SHAPES["1b"])
    (tmp_path / "config.json").write_text(config.to_json_string(), encoding="utf-8")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    flops = vs_hf.flops_per_token(tmp_path, [100, 300], r=32)
    assert flops["n_frozen_matmul"] == linear
    # Causal attention: 6 · layers · width · Σn² / Σn per token.
    assert flops["attention"] == pytest.approx(6 * 16 * 2048 * (100**2 + 300**2) / 400)
    assert flops["total"] == pytest.approx(4 * linear + 6 * flops["n_lora"] + flops["attention"])


@pytest.mark.parametrize("kind, leaf, whole", [("per-module", None, False), ("partitioned", "LlamaDecoderLayer", False),
                                              (None, "LlamaDecoderLayer", True)])
def test_workload_zs_zero3_runs_gather_as_they_say(tmp_path: Path, tiny_model_dir: Path, kind: str | None,
                                                   leaf: str | None, whole: bool) -> None:
    """The variants' JSON files compile (a device call is too dear to find out there): per-module to DeepSpeed's
    own gathering, partitioned to whole decoder layers over a partitioned base; the built-in preset (kind None)
    keeps the tiny base whole."""
    root = workspace(tmp_path, tiny_model_dir)
    for name, config in ((vs_hf.ZERO3_PARTITIONED, vs_hf.ZERO3_PARTITIONED_CONFIG),
                         (vs_hf.ZERO3_PER_MODULE, vs_hf.ZERO3_PER_MODULE_CONFIG)):
        (root / name).write_text(json.dumps(config), encoding="utf-8")
    extra = vs_hf.Z_VARIANTS[kind] if kind else vs_hf.ZERO3
    bundle = compile_bundle(write_config(root, adapter="lora", lora_target_linear=True, **extra),
                            target="h100-80gb", gpus_per_node=2)
    plan = yaml.safe_load((bundle / "config.yaml").read_text(encoding="utf-8"))
    assert plan["distribution"]["deepspeed"] == {"stage": 3, "config_file": "deepspeed.json",
                                                 "leaf_module_class": leaf, "frozen_base_whole": whole}
    zero = json.loads((bundle / "deepspeed.json").read_text(encoding="utf-8"))["zero_optimization"]
    assert zero.get("stage3_module_granularity_threshold") == (0 if kind == "per-module" else None)
    # Whole: a threshold of the model's size, so every parameter persists; else the one the hidden size gives.
    hidden = json.loads((tiny_model_dir / "config.json").read_text(encoding="utf-8"))["hidden_size"]
    assert zero["stage3_param_persistence_threshold"] == (205_120 if whole else 10 * hidden)
    # Whole, every weight ZeRO-3 holds is whole between steps: torch's own linear, not DeepSpeed's replacement.
    assert zero.get("memory_efficient_linear") == (False if whole else None)
    accelerate = yaml.safe_load((bundle / "accelerate.yaml").read_text(encoding="utf-8"))
    assert accelerate["deepspeed_config"]["zero3_init_flag"] is not whole  # a whole base loads whole


def test_command_line_configurations_are_read_or_refused() -> None:
    scope, config = vs_hf.parse_hf_config("A:name=flex,attn=flex_attention,rows=16,gc=1,timeout=300")
    assert scope == "A" and config == vs_hf.HfConfig("flex", attn="flex_attention", rows=16, gc=True, timeout=300.0)
    assert vs_hf.parse_hf_config("attn=eager")[0] is None
    with pytest.raises(ValueError, match="not key=value"):
        vs_hf.parse_hf_config("rowz=3")
    with pytest.raises(ValueError, match="collator"):
        vs_hf.parse_hf_config("collator=zip")
    assert vs_hf.parse_variant("B:gc={gradient_checkpointing: true}") == ("B", "gc", {"gradient_checkpointing": True})
    assert vs_hf.parse_extra("plugins=[a.B]") == {"plugins": ["a.B"]}
    with pytest.raises(ValueError, match="mapping"):
        vs_hf.parse_variant("cce=[1, 2]")


def test_a_non_finite_loss_fails_the_run_whatever_its_speed() -> None:
    finished = {"losses": [7.1, 6.9, 6.8], "tokens_per_s": 1e9}
    assert vs_hf.verdict(finished, 0, steps=3)["status"] == "ok"
    poisoned = vs_hf.verdict(finished | {"losses": [7.1, float("nan"), 6.8]}, 0, steps=3)
    assert not poisoned["ok"] and poisoned["status"] == "FAILED (non-finite loss at logged step 2)"
    assert vs_hf.verdict(finished | {"losses": [7.1]}, 0, steps=3)["status"] == "FAILED (1 of 3 losses logged)"
    assert vs_hf.verdict(finished, 124, steps=3)["status"] == "TIMEOUT"
    assert vs_hf.verdict(finished | {"losses": [float("inf")]}, 1, steps=3)["status"] == \
        "FAILED (exit 1), non-finite loss at logged step 1"
