"""Two processes on CPU (gloo), started by the bundle's own launch.sh."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import require_module
from runtime_bundles import build_tiny_model, compile_bundle, launch, summary, train_losses, workspace, write_config


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-model")


def test_two_process_ddp_ends_with_identical_weights_on_both_ranks(tmp_path: Path, tiny_model: Path) -> None:
    root = workspace(tmp_path, tiny_model)
    bundle = compile_bundle(write_config(root, adapter="lora", lora_target_linear=True, max_steps=12,
                                         gradient_accumulation_steps=2), gpus_per_node=2)
    launch(bundle)
    result = summary(root / "out")
    assert result["distributed_type"] == "MULTI_CPU"
    digests = result["rank_weight_digests"]
    assert len(digests) == 2, f"expected 2 ranks, got {digests} (did accelerate start one process?)"
    assert digests[0] == digests[1]
    assert (root / "out" / "adapter_model.safetensors").exists()
    assert len(train_losses(root / "out")) == 12


def test_fsdp2_on_cpu_runs_unsharded_because_accelerate_has_no_cpu_fsdp(tmp_path: Path, tiny_model: Path) -> None:
    """PyTorch's fully_shard works on CPU with gloo, but accelerate 1.15 switches FSDP on only for
    GPU-family process groups (AcceleratorState: the FSDP branch is under MULTI_GPU/…; CPU is
    MULTI_CPU). The runtime says so and trains data-parallel. When accelerate gains CPU FSDP this
    test fails, and the README's note should go."""
    root = workspace(tmp_path, tiny_model)
    bundle = compile_bundle(write_config(root, adapter="lora", lora_target_linear=True, max_steps=6,
                                         fsdp_config={}), gpus_per_node=2)
    assert "distributed_type: FSDP" in (bundle / "accelerate.yaml").read_text()
    run = launch(bundle)
    assert "strategy fsdp requested but accelerate runs MULTI_CPU" in run.stdout + run.stderr
    result = summary(root / "out")
    assert result["distributed_type"] == "MULTI_CPU"
    assert result["rank_weight_digests"][0] == result["rank_weight_digests"][1]


def test_accelerate_accepts_a_deepspeed_bundle_and_it_resumes(tmp_path: Path, tiny_model: Path) -> None:
    """The compiler emits DeepSpeed only for GPUs (two or more). This test compiles a two-GPU ZeRO-2
    bundle and points it at one CPU process, so `accelerate launch` reads the bundle's accelerate.yaml and
    deepspeed.json as on a GPU node and builds its DeepSpeed plugin from them; that is where accelerate
    refuses a config file that also sets mixed_precision (seen on the GPU machine, fixed in the renderer).
    On a CPU process group accelerate then trains plain data parallel (MULTI_CPU); the DeepSpeed engine
    itself runs in bench/gpu_runs.py on GPUs. The kill and resume go through the same launch."""
    require_module("deepspeed", "make install adds it")
    root = workspace(tmp_path, tiny_model)
    bundle = compile_bundle(write_config(root, adapter="lora", lora_target_linear=True, max_steps=6, save_steps=2,
                                         deepspeed="zero2", micro_batch_size=2),
                            target="h100-80gb", gpus_per_node=2)
    assert "\nmixed_precision:" not in (bundle / "accelerate.yaml").read_text()
    # The CPU edits: one process, fp32 (DeepSpeed's CPU path has no bf16 here), device cpu.
    accelerate_yaml = bundle / "accelerate.yaml"
    accelerate_yaml.write_text(accelerate_yaml.read_text().replace("num_processes: 2", "num_processes: 1"))
    deepspeed_json = bundle / "deepspeed.json"
    ds = json.loads(deepspeed_json.read_text())
    ds |= {"train_batch_size": 2, "bf16": {"enabled": False}}
    deepspeed_json.write_text(json.dumps(ds))
    config_yaml = bundle / "config.yaml"
    config_yaml.write_text(config_yaml.read_text().replace("device: cuda", "device: cpu")
                           .replace("precision: bf16", "precision: fp32"))
    launch_sh = bundle / "launch.sh"
    launch_sh.write_text(launch_sh.read_text().replace("--num_processes 2", "--num_processes 1"))

    killed = launch(bundle, env={"TUNEFILE_FAULT_AFTER_STEP": "3"}, check=False)
    assert killed.returncode != 0
    resumed = launch(bundle)
    assert "resumed from out/checkpoint-2" in resumed.stdout + resumed.stderr
    assert summary(root / "out")["distributed_type"] == "MULTI_CPU"
    assert [step for step, _ in enumerate(train_losses(root / "out"), 1)] == [1, 2, 3, 4, 5, 6]
    assert (root / "out" / "adapter_model.safetensors").exists()
