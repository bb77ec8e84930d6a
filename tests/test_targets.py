"""Targets: the catalog, target files, overrides and detection."""

from __future__ import annotations

import os
from pathlib import Path

from click.testing import CliRunner

from helpers import MINIMAL, write
from tunefile.compiler.cli import cli
from tunefile.compiler.targets import GPU_CATALOG, apply_overrides, builtin_target, match_gpu, target_from_file_data

REQUIRED_GPUS = ("h100-80gb", "h200", "a100-80gb", "a100-40gb", "l40s", "rtx4090", "a10g", "v100-32gb", "t4")


def test_catalog_covers_the_issue_list() -> None:
    assert set(REQUIRED_GPUS) <= set(GPU_CATALOG)
    assert not GPU_CATALOG["v100-32gb"].bf16 and GPU_CATALOG["h100-80gb"].fp8
    assert builtin_target("cpu").on_cpu and builtin_target("cpu").gpu is None


def test_target_file_with_slurm_settings() -> None:
    data = {"gpu": "a100-80gb", "nodes": 4, "gpus_per_node": 8, "partition": "gpu", "modules": ["cuda/12.4"],
            "env": {"NCCL_DEBUG": "INFO", "Z": 1}}
    target, problems = target_from_file_data(data, "cluster", "cluster.yml")
    assert problems == []
    assert target.world_size == 32 and target.slurm.partition == "gpu" and target.slurm.modules == ("cuda/12.4",)
    assert target.env == (("NCCL_DEBUG", "INFO"), ("Z", "1"))


def test_target_file_problems() -> None:
    _, problems = target_from_file_data({"gpu": "h100", "nodes": 0, "partiton": "x"}, "t", "t.yml")
    messages = {problem.path: problem.message for problem in problems}
    assert "did you mean partition?" in messages[("partiton",)]
    assert "≥ 1" in messages[("nodes",)]


def test_flags_override_the_file() -> None:
    target, _ = target_from_file_data({"gpu": "a100-80gb", "nodes": 4}, "t", "t.yml")
    target = apply_overrides(target, nodes=1, gpus_per_node=2, gpu="h100-80gb")
    assert (target.nodes, target.gpus_per_node, target.gpu.name) == (1, 2, "h100-80gb")


def test_match_gpu_names_from_nvidia_smi() -> None:
    assert match_gpu("NVIDIA H100 80GB HBM3", 81559 / 1024, "9.0").name == "h100-80gb"
    assert match_gpu("NVIDIA A100-SXM4-40GB", 40960 / 1024, "8.0").name == "a100-40gb"
    assert match_gpu("NVIDIA A100-SXM4-80GB", 81920 / 1024, "8.0").name == "a100-80gb"
    assert match_gpu("Tesla V100-SXM2-32GB", 32768 / 1024, "7.0").name == "v100-32gb"
    unknown = match_gpu("NVIDIA RTX 6000 Ada Generation", 48, "8.9")
    assert unknown.compute_capability == (8, 9) and unknown.bf16 and unknown.memory_gib == 48


def test_detect_records_what_it_found(tmp_path: Path) -> None:
    """With a stand-in nvidia-smi, detection reads its answer and the bundle README records it."""
    smi = write(tmp_path / "bin" / "nvidia-smi", "#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559, 9.0'\n"
                "echo 'NVIDIA H100 80GB HBM3, 81559, 9.0'\n")
    smi.chmod(0o755)
    config = write(tmp_path / "c.yml", MINIMAL + "adapter: lora\n")
    runner = CliRunner(env={"PATH": f"{smi.parent}:{os.environ['PATH']}"})
    result = runner.invoke(cli, ["compile", str(config), "--target", "detect", "--output", str(tmp_path / "b")])
    assert result.exit_code == 0, result.stderr
    readme = (tmp_path / "b" / "README.md").read_text()
    assert "detected on the compiling machine: 2 × NVIDIA H100 80GB HBM3 (80 GiB, compute capability 9.0)" in readme
    assert "| strategy | ddp |" in readme


def test_detect_without_gpus_is_the_cpu(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", MINIMAL + "adapter: lora\n")
    runner = CliRunner(env={"PATH": str(tmp_path / "empty")})
    result = runner.invoke(cli, ["explain", str(config), "--target", "detect"])
    assert result.exit_code == 0 and "no nvidia-smi on PATH: CPU only" in result.stdout
