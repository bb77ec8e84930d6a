"""The command line: located errors, exit codes, no tracebacks, nothing half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import GOLDEN_CONFIGS, MINIMAL, REPO, write
from helpers import run_cli as run


@pytest.fixture
def bad_config(tmp_path: Path) -> Path:
    return write(tmp_path / "config.yml", MINIMAL + "lora_alpah: 64\nfsdp_config:\n  ofload_params: true\n"
                 "deepspeed: zero2\n")


def test_errors_are_file_line_col_key_message(bad_config: Path, tmp_path: Path) -> None:
    code, out, err = run("compile", str(bad_config), "--output", str(tmp_path / "bundle"))
    assert code == 2
    assert f"{bad_config}:5:1: error: lora_alpah: unknown key; did you mean lora_alpha?" in err
    assert f"{bad_config}:7:3: error: fsdp_config.ofload_params: unknown key; did you mean offload_params?" in err
    assert "Traceback" not in err and "nothing was written" in err
    assert not (tmp_path / "bundle").exists()


def test_yaml_syntax_errors_are_located(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "base_model: x\ndatasets:\n  - path: a\n   type: alpaca\n")
    code, _, err = run("validate", str(config))
    assert code == 2 and f"{config}:4:" in err and "YAML syntax error" in err


def test_debug_shows_the_traceback(bad_config: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "tunefile.compiler.cli", "--debug", "validate", str(bad_config)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_hints_follow_the_error(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", MINIMAL + "deepspeed: zero2\n")
    code, _, err = run("validate", str(config), "--target", "h100-80gb")
    assert code == 2
    assert "error: deepspeed: DeepSpeed needs at least 2 GPUs in total" in err
    assert "hint: remove the `deepspeed:` line" in err


def test_validate_prints_warnings_and_passes(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", MINIMAL + "adapter: lora\ngradient_checkpointing: true\nflash_attention: true\n")
    code, out, err = run("validate", str(config), "--gpu", "v100-32gb")
    assert code == 0 and "valid (1 warning)" in out
    assert f"{config}:7:18: warning: flash_attention:" in err


def test_explain_gives_a_reason_for_each_choice() -> None:
    code, out, _ = run("explain", str(GOLDEN_CONFIGS / "fsdp2.yml"))
    assert code == 0
    for topic in ("precision", "attention", "strategy", "fsdp layer", "batch", "memory"):
        assert f"  {topic}" in out
    assert "because derived from the architecture LlamaForCausalLM" in out
    assert "2 micro batch × 4 accumulation × 4 GPUs = 32 sequences" in out


def test_flags_override_the_target() -> None:
    code, out, _ = run("explain", str(GOLDEN_CONFIGS / "lora-single.yml"), "--gpu", "a100-40gb",
                       "--gpus-per-node", "2", "--nodes", "2")
    assert code == 0 and "2 node(s) × 2 × NVIDIA A100 40 GB" in out


def test_unknown_gpu_flag(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", MINIMAL)
    code, _, err = run("validate", str(config), "--gpu", "h100")
    assert code == 2 and "tunefile: error: --gpu: unknown GPU 'h100'; did you mean h100-80gb?" in err


def test_target_file_errors_are_located_in_the_target_file(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", MINIMAL + "target: cluster.yml\n")
    write(tmp_path / "cluster.yml", "gpu: h100-80gb\npartiton: gpu\n")
    code, _, err = run("validate", str(config))
    assert code == 2 and "cluster.yml:2:1: error: partiton: unknown target setting; did you mean partition?" in err


def test_missing_deepspeed_file_lists_presets_and_axolotls_stock_files(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", MINIMAL + "deepspeed: deepspeed_configs/zero9.json\n")
    code, _, err = run("validate", str(config), "--gpus-per-node", "2")
    assert code == 2 and "no such file: deepspeed_configs/zero9.json" in err
    assert "built-in presets: zero1" in err and "zero3_bf16_cpuoffload_params.json" in err


def test_compile_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    config = GOLDEN_CONFIGS / "lora-single.yml"
    assert run("compile", str(config), "--output", str(out))[0] == 0
    (out / "launch.sh").write_text("edited\n")
    code, _, err = run("compile", str(config), "--output", str(out))
    assert code == 2 and "--force" in err
    assert (out / "launch.sh").read_text() == "edited\n"
    assert run("compile", str(config), "--output", str(out), "--force")[0] == 0
    assert (out / "launch.sh").read_text() != "edited\n"


def test_compile_default_output_is_under_output_dir(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", MINIMAL + f"output_dir: {tmp_path / 'outputs'}\n")
    assert run("compile", str(config))[0] == 0
    assert (tmp_path / "outputs" / "bundle" / "launch.sh").is_file()


def test_schema_check_and_targets() -> None:
    code, out, _ = run("schema", "--check", str(REPO / "schemas" / "tunefile.schema.json"))
    assert code == 0 and "current" in out
    code, out, _ = run("targets")
    assert code == 0 and "h100-80gb" in out and "v100-32gb" in out and "detect" in out


def test_compile_imports_neither_torch_nor_the_runtime(tmp_path: Path) -> None:
    # The bundle carries the runtime's files, which the compiler reads without running tunefile.runtime's code.
    program = (
        "import sys\n"
        "from tunefile.compiler.cli import main\n"
        f"sys.argv = ['tunefile', 'compile', {str(GOLDEN_CONFIGS / 'zero3.yml')!r}, '--output', "
        f"{str(tmp_path / 'b')!r}]\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'accelerate', 'deepspeed', 'peft') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "runtime = sorted(m for m in sys.modules if m.startswith('tunefile.runtime'))\n"
        "assert not runtime, runtime\n"
        "print('no heavy imports')\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "no heavy imports" in result.stdout


def test_deepspeed_json_problems_point_into_the_json(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", MINIMAL + "deepspeed: ds.json\n")
    write(tmp_path / "ds.json", '{\n  "zero_optimization": {"stage": 2},\n  "train_micro_batch_size_per_gpu": 4,\n'
          '  "sub_group_size": "auto"\n}\n')
    code, _, err = run("validate", str(config), "--gpus-per-node", "2")
    assert code == 2
    assert f"{tmp_path / 'ds.json'}:3:37: error: train_micro_batch_size_per_gpu: 4 contradicts" in err
    assert f"{tmp_path / 'ds.json'}:4:21: error: sub_group_size: still \"auto\"" in err
