"""Rendering: the file set per strategy, the structured files' keys, safe shell text, scripts that
run as intended. Plans come from plan_factory, so these tests do not depend on resolve()."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from helpers import require_module, write
from plan_factory import VARIANTS, make_plan, render
from tunefile.compiler.render import render_bundle

BASE = ["README.md", "accelerate.yaml", "config.yaml", "job.sbatch", "launch.sh", "manifest.json"]
# --- the file set and determinism ---------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_file_set(variant: str) -> None:
    expected = BASE + (["deepspeed.json"] if variant == "deepspeed" else [])
    assert list(render(variant)) == sorted(expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_plan_same_bytes(variant: str) -> None:
    first, second = render(variant), render_bundle(make_plan(variant))
    assert first == second
    for name, text in first.items():
        assert str(Path.cwd()) not in text and str(Path.home()) not in text, f"{name} holds an absolute path"


# --- config.yaml (the run plan: tests/test_run_plan.py) -----------------------------------------

def test_awkward_dataset_paths_survive_the_yaml() -> None:
    path = "data/my data's \"best\" $set: #1.jsonl"
    config = yaml.safe_load(render("single", spec={"datasets": [{"path": path, "type": "alpaca"}]})["config.yaml"])
    assert config["data"]["datasets"][0]["path"] == path


# --- accelerate.yaml and deepspeed.json ---------------------------------------------------------

@pytest.mark.parametrize("variant, distributed_type, machines, processes, precision, use_cpu", [
    ("single", "NO", 1, 1, "bf16", False),
    ("ddp", "MULTI_GPU", 1, 4, "bf16", False),
    ("fsdp", "FSDP", 1, 4, "bf16", False),
    ("deepspeed", "DEEPSPEED", 1, 2, "bf16", False),
    ("slurm", "FSDP", 2, 16, "bf16", False),
    ("cpu", "MULTI_GPU", 1, 2, "no", True),  # see test_cpu_ddp_starts_torchrun
])
def test_accelerate_yaml_per_strategy(variant: str, distributed_type: str, machines: int, processes: int,
                                      precision: str, use_cpu: bool) -> None:
    config = yaml.safe_load(render(variant)["accelerate.yaml"])
    assert config["distributed_type"] == distributed_type and config["use_cpu"] is use_cpu
    assert config["num_machines"] == machines and config["num_processes"] == processes
    # DeepSpeed takes precision from deepspeed.json; accelerate refuses a config file that sets it here too.
    assert config.get("mixed_precision") == (None if variant == "deepspeed" else precision)
    assert config["machine_rank"] == 0
    assert config["compute_environment"] == "LOCAL_MACHINE" and config["rdzv_backend"] == "static"
    assert config["main_process_port"] == 29500 and config["downcast_bf16"] == "no"
    assert ("fsdp_config" in config) is (distributed_type == "FSDP")
    assert ("deepspeed_config" in config) is (distributed_type == "DEEPSPEED")


def test_cpu_ddp_starts_torchrun(tmp_path: Path) -> None:
    """accelerate launch starts torchrun only for MULTI_GPU; MULTI_CPU would start one process."""
    text = render("cpu")["accelerate.yaml"]
    assert "distributed_type: MULTI_GPU" in text and "use_cpu: true" in text and "torchrun" in text
    launch = require_module("accelerate.commands.launch", "make install")
    args = launch.launch_command_parser().parse_args(
        ["--config_file", str(write(tmp_path / "accelerate.yaml", text)), "-m", "tunefile.runtime"])
    args, _, _ = launch._validate_launch_command(args)
    assert args.multi_gpu and not args.cpu and args.use_cpu  # → multi_gpu_launcher (torchrun), on the CPU


def test_accelerate_yaml_explains_the_batch() -> None:
    text = render("ddp")["accelerate.yaml"]
    assert "# Batch: 2 micro batch × 4 accumulation × 4 GPUs = 32 sequences per optimizer step" in text


def test_accelerate_fsdp2_keys() -> None:
    fsdp = yaml.safe_load(render("fsdp")["accelerate.yaml"])["fsdp_config"]
    assert fsdp == {
        "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "fsdp_offload_params": False,
        "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_reshard_after_forward": True,
        "fsdp_cpu_ram_efficient_loading": True, "fsdp_activation_checkpointing": False,
    }  # no FSDP1-only keys: accelerate warns that sync_module_states and use_orig_params are obsolete in FSDP2


def test_accelerate_fsdp1_keys() -> None:
    plan = make_plan("fsdp")
    plan = replace(plan, distribution=replace(plan.distribution, fsdp=replace(plan.distribution.fsdp, version=1)))
    fsdp = yaml.safe_load(render_bundle(plan)["accelerate.yaml"])["fsdp_config"]
    assert fsdp["fsdp_version"] == 1 and fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert fsdp["fsdp_sync_module_states"] is True  # rank 0 loads, the others receive a broadcast
    assert "fsdp_reshard_after_forward" not in fsdp  # FSDP1 takes a sharding strategy, not a bool
    assert yaml.safe_load(render_bundle(plan)["config.yaml"])["distribution"]["fsdp"]["version"] == 1


def test_accelerate_deepspeed_section_and_json() -> None:
    files = render("deepspeed")
    section = yaml.safe_load(files["accelerate.yaml"])["deepspeed_config"]
    assert section == {"deepspeed_config_file": "deepspeed.json", "deepspeed_multinode_launcher": "standard",
                       "zero3_init_flag": True}
    assert "launch.sh passes its absolute path" in files["accelerate.yaml"]
    assert json.loads(files["deepspeed.json"]) == make_plan("deepspeed").distribution.deepspeed_config
    assert files["deepspeed.json"].endswith("}\n") and '"auto"' not in files["deepspeed.json"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_accelerate_reads_the_config(variant: str, tmp_path: Path) -> None:
    config_args = require_module("accelerate.commands.config.config_args", "make install")
    path = write(tmp_path / "accelerate.yaml", render(variant)["accelerate.yaml"])
    config = config_args.load_config_from_file(str(path))
    assert config.num_processes == make_plan(variant).target.world_size


# --- manifest.json and README.md ----------------------------------------------------------------

def test_manifest_hashes_every_other_file() -> None:
    files = render("deepspeed")
    manifest = json.loads(files["manifest.json"])
    assert manifest["files"] == {name: hashlib.sha256(text.encode()).hexdigest()
                                 for name, text in files.items() if name != "manifest.json"}
    assert manifest["required_packages"] == sorted(manifest["required_packages"])
    assert "deepspeed" in manifest["required_packages"]
    assert manifest["config"] == "deepspeed.yml" and manifest["target"] == "a100-80gb-x2"
    assert manifest["config_sha256"] == "0" * 64 and manifest["target_sha256"] == "1" * 64
    assert manifest["tunefile_version"] == "0.1.0"


def test_readme_summarises_the_plan() -> None:
    plan = make_plan("slurm")
    plan = replace(plan, target=replace(plan.target, detected="8 × NVIDIA H100 80GB HBM3"))
    readme = render_bundle(plan)["README.md"]
    assert "**full fine-tune** of `meta-llama/Llama-3.1-8B`" in readme
    assert "- data: `data/chat.jsonl` (chat_template)" in readme
    assert "target `slurm-h100`: 2 node(s) × 8 × NVIDIA H100 80 GB (Hopper)" in readme
    assert "detected on the compiling machine: 8 × NVIDIA H100 80GB HBM3" in readme
    assert "| strategy | fsdp | chosen by the test's plan factory \\| with a pipe |" in readme
    assert "- `datasets[0].path`: file not found on this machine (it may exist on the cluster)" in readme
    assert "| **total** | **26.20** of 80 GiB |" in readme
    assert "2 micro batch × 4 accumulation × 16 GPUs = 128 sequences" in readme
    assert "bash path/to/bundle/launch.sh" in readme and "sbatch path/to/bundle/job.sbatch" in readme
    assert all(f"- `{name}`" in readme for name in BASE)


def test_readme_without_memory_estimate_or_warnings() -> None:
    readme = render("cpu", warnings=())["README.md"]
    assert "Memory estimate" not in readme and "## Warnings" not in readme
    assert "1 node(s) × 2 CPU process(es)" in readme


