"""Rendering: the file set per strategy, safe shell text, scripts that run as intended."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import jinja2
import pytest
import yaml
from click.testing import CliRunner

from helpers import GOLDEN_CONFIGS, MINIMAL, write
from tunefile.compiler.bundle import write_bundle
from tunefile.compiler.cli import cli
from tunefile.compiler.pipeline import TargetOptions, compile_config
from tunefile.compiler.render.scripts import render_template


def files_of(case: str, **flags: object) -> dict[str, str]:
    return compile_config(GOLDEN_CONFIGS / f"{case}.yml", TargetOptions(**flags)).files  # type: ignore[arg-type]


BASE = ["README.md", "accelerate.yaml", "config.yaml", "job.sbatch", "launch.sh", "manifest.json"]


@pytest.mark.parametrize("case, deepspeed", [("lora-single", False), ("ddp", False), ("fsdp2", False),
                                              ("zero2", True), ("zero3-user-json", True)])
def test_file_set(case: str, deepspeed: bool) -> None:
    assert sorted(files_of(case)) == sorted(BASE + (["deepspeed.json"] if deepspeed else []))


@pytest.mark.parametrize("case, distributed_type", [("lora-single", "NO"), ("ddp", "MULTI_GPU"), ("fsdp2", "FSDP"),
                                                     ("zero3", "DEEPSPEED"), ("cpu-ddp", "MULTI_CPU")])
def test_accelerate_distributed_type(case: str, distributed_type: str) -> None:
    config = yaml.safe_load(files_of(case)["accelerate.yaml"])
    assert config["distributed_type"] == distributed_type


def test_accelerate_fsdp2_keys() -> None:
    fsdp = yaml.safe_load(files_of("fsdp2")["accelerate.yaml"])["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert "fsdp_sharding_strategy" not in fsdp and "fsdp_use_orig_params" not in fsdp  # FSDP1-only keys


def test_accelerate_deepspeed_uses_the_standard_launcher() -> None:
    files = files_of("zero3")
    section = yaml.safe_load(files["accelerate.yaml"])["deepspeed_config"]
    assert section["deepspeed_multinode_launcher"] == "standard" and section["zero3_init_flag"] is True
    assert "--deepspeed_multinode_launcher standard" in files["launch.sh"]
    assert "pdsh" not in files["launch.sh"] + files["job.sbatch"].replace("never pdsh", "")


def test_config_yaml_is_resolved() -> None:
    config = yaml.safe_load(files_of("chat-template")["config.yaml"])
    dataset = config["datasets"][0]
    assert dataset["roles_to_train"] == ["assistant"] and dataset["train_on_eos"] == "turn"
    assert dataset["message_field_role"] == "role" and dataset["chat_template"] == "tokenizer_default"
    assert config["bf16"] is True and config["resolved"]["world_size"] == 1
    assert "target" not in config and "strategy" not in config
    qlora = yaml.safe_load(files_of("qlora-single")["config.yaml"])
    assert qlora["load_in_4bit"] is True and qlora["optimizer"] == "paged_adamw_8bit"


def test_manifest_hashes_every_other_file() -> None:
    files = files_of("zero2")
    manifest = json.loads(files["manifest.json"])
    assert sorted(manifest["files"]) == sorted(name for name in files if name != "manifest.json")
    assert "deepspeed" in manifest["required_packages"] and len(manifest["config_sha256"]) == 64


def test_sbatch_lines_hold_no_shell_variables() -> None:
    for case in ("multinode-slurm", "lora-single", "cpu-ddp"):
        sbatch_lines = [line for line in files_of(case)["job.sbatch"].splitlines() if line.startswith("#SBATCH")]
        assert sbatch_lines and not any("$" in line for line in sbatch_lines)
        assert "#SBATCH --ntasks-per-node=1" in sbatch_lines


def test_cpu_target_asks_for_no_gpus() -> None:
    assert "--gpus-per-node" not in files_of("cpu-ddp")["job.sbatch"]


def test_strict_undefined_catches_a_missing_value() -> None:
    with pytest.raises(jinja2.UndefinedError):
        render_template("launch.sh.j2", version="0")


def run_launch(bundle: Path, tmp_path: Path, env: dict[str, str] | None = None) -> dict:
    """Run launch.sh with a stand-in `accelerate` that records what it was given."""
    stub = write(tmp_path / "bin" / "accelerate",
                 "#!/usr/bin/env python3\nimport json, os, sys\n"
                 "json.dump({'argv': sys.argv[1:], 'env': dict(os.environ)}, sys.stdout)\n")
    stub.chmod(0o755)
    result = subprocess.run(["bash", str(bundle / "launch.sh")], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, **(env or {}), "PATH": f"{stub.parent}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_launch_sh_runs_accelerate_with_the_bundle(tmp_path: Path) -> None:
    bundle = tmp_path / "my bundle"  # a space in the path must not split arguments
    write_bundle(files_of("zero3"), bundle, force=False)
    record = run_launch(bundle, tmp_path)
    argv = record["argv"]
    assert argv[:2] == ["launch", "--config_file"] and argv[2] == f"{bundle}/accelerate.yaml"
    assert argv[argv.index("--num_processes") + 1] == "2" and argv[argv.index("--machine_rank") + 1] == "0"
    assert argv[argv.index("--deepspeed_config_file") + 1] == f"{bundle}/deepspeed.json"
    assert argv[-4:] == ["-m", "tunefile.runtime", "train", f"{bundle}/config.yaml"]


def test_launch_sh_takes_rank_and_rendezvous_from_the_environment(tmp_path: Path) -> None:
    write_bundle(files_of("multinode-slurm"), tmp_path / "b", force=False)
    record = run_launch(tmp_path / "b", tmp_path, {"NODE_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "23456"})
    argv = record["argv"]
    assert argv[argv.index("--machine_rank") + 1] == "1"
    assert argv[argv.index("--main_process_ip") + 1] == "node7"
    assert argv[argv.index("--main_process_port") + 1] == "23456"
    assert record["env"]["NCCL_DEBUG"] == "WARN" and record["env"]["HF_HOME"] == "/scratch/hf-cache"


def test_offline_variables_are_exported_before_python(tmp_path: Path) -> None:
    write_bundle(files_of("offline"), tmp_path / "b", force=False)
    env = run_launch(tmp_path / "b", tmp_path)["env"]
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"


def test_awkward_env_values_stay_one_word(tmp_path: Path) -> None:
    value = "it's \"quoted\" $HOME `date` ; echo pwned"
    config = write(tmp_path / "c.yml", MINIMAL + "target: t.yml\n")
    write(tmp_path / "t.yml", f"gpu: a100-80gb\nenv:\n  ODD: {json.dumps(value)}\n")
    write_bundle(compile_config(config, TargetOptions()).files, tmp_path / "b", force=False)
    assert run_launch(tmp_path / "b", tmp_path)["env"]["ODD"] == value


@pytest.mark.parametrize("setting, place, fragment", [
    ("partition: gpu; rm -rf /\n", "2:12", "partition: 'gpu; rm -rf /' cannot go on an #SBATCH line"),
    ("job_name: my job\n", "2:11", "job_name: 'my job' cannot go on an #SBATCH line"),
    ("env:\n  X: \"a\\nb\"\n", "3:6", "env.X: environment values must be one line"),
    ("time: soon\n", "2:7", "time: not a SLURM time limit"),
])
def test_unsafe_target_values_are_rejected_with_their_line(tmp_path: Path, setting: str, place: str,
                                                            fragment: str) -> None:
    config = write(tmp_path / "c.yml", MINIMAL + "target: t.yml\n")
    write(tmp_path / "t.yml", "gpu: a100-80gb\n" + setting)
    result = CliRunner().invoke(cli, ["compile", str(config), "--output", str(tmp_path / "b")])
    assert result.exit_code == 2 and f"{tmp_path / 't.yml'}:{place}: error: {fragment}" in result.stderr
    assert not (tmp_path / "b").exists()


def test_line_breaks_in_config_strings_are_rejected(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", MINIMAL.replace("base_model: meta-llama/Llama-3.1-8B",
                                                       'base_model: "x\\nrm -rf /"'))
    result = CliRunner().invoke(cli, ["validate", str(config)])
    assert result.exit_code == 2 and "base_model: must be a single line" in result.stderr
