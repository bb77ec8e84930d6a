"""`tunefile doctor [BUNDLE]` (runtime/doctor.py): one line per check, the fix for each miss, exit 1 on any."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from helpers import run_cli, write
from runtime_bundles import run_tunefile
from tunefile.runtime import doctor

CONFIG = """\
base_model: {model}
datasets:
  - path: data/alpaca.jsonl
    type: alpaca
micro_batch_size: 2
max_steps: 10
save_steps: 5
save_total_limit: 2
output_dir: out
"""


def bundle(tmp_path: Path, target: str, extra: str = "", model: str = "meta-llama/Llama-3.2-1B",
           name: str = "b") -> Path:
    write(tmp_path / "data" / "alpaca.jsonl", '{"instruction": "a", "output": "b"}\n')
    cfg = write(tmp_path / f"{name}.yml", CONFIG.format(model=model) + extra)
    code, _, err = run_cli("compile", str(cfg), "--target", target, "-o", str(tmp_path / name), "--force")
    assert code == 0, err
    return tmp_path / name


def by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {check.name: check for check in checks}


def test_cpu_bundle_passes_here_and_says_there_is_no_gpu(tmp_path: Path) -> None:
    cpu = bundle(tmp_path, "cpu")
    result = run_tunefile("doctor", str(cpu), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ok       python: 3.")
    gpu = next(line for line in lines if line.startswith("ok       gpu: "))
    assert "none needed (a CPU bundle" in gpu
    if shutil.which("nvidia-smi") is None:
        assert "no CUDA GPU visible" in gpu
    assert any(line.startswith("ok       torch: ") for line in lines)
    assert any(line.startswith("ok       tunefile.runtime: ") and "the bundle's archive" in line for line in lines)
    assert lines[-1] == f"this machine is ready for bundle {cpu}"
    assert "Traceback" not in result.stderr


def test_without_a_bundle_the_machine_in_general(tmp_path: Path) -> None:
    result = run_tunefile("doctor", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    names = [line.split(":")[0].split()[-1] for line in result.stdout.splitlines()[:-1]]
    assert {"python", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "flash-attn",
            "gpu", "tunefile.runtime"} <= set(names)
    assert result.stdout.splitlines()[-1] == "this machine is ready for training in general"


def test_a_qlora_bundle_without_bitsandbytes_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    qlora = bundle(tmp_path, "h100-80gb", "adapter: qlora\nload_in_4bit: true\nlora_r: 8\nlora_alpha: 16\n"
                   "lora_target_linear: true\n")
    real = doctor._installed
    monkeypatch.setattr(doctor, "_installed", lambda name: None if name == "bitsandbytes" else real(name))
    checks = by_name(doctor.diagnose(qlora))
    missing = checks["bitsandbytes"]
    assert missing.line() == "MISSING  bitsandbytes: not installed (the bundle needs >=0.43); fix: pip install " \
                             "'tunefile[qlora]'"
    assert checks["peft"].status == "ok"


def test_a_gpu_bundle_on_a_machine_without_one_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu = bundle(tmp_path, "a100-80gb")
    check = by_name(doctor.diagnose(gpu))["gpu"]
    assert check.status == "MISSING" and "the bundle trains on 1 GPU(s) per node; no CUDA GPU visible" in check.detail
    assert check.fix


def test_a_full_disk_is_reported_with_the_estimate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = bundle(tmp_path, "cpu")
    monkeypatch.chdir(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 1 << 20))
    check = by_name(doctor.diagnose(full))["disk"]
    assert check.status == "MISSING", check.line()
    # 1.24 B parameters, full fine-tune: 2 kept checkpoints × (4 B weights + 8 B AdamW) + the final 4 B weights
    assert "1.0 MiB free at" in check.detail and "2 checkpoint(s) × " in check.detail
    assert "save_total_limit" in check.fix
    need, how = doctor.checkpoint_bytes(doctor.read_bundle(full)[0])
    parameters = doctor.read_bundle(full)[0].model.parameters
    assert need == 2 * parameters * 12 + parameters * 4 and "AdamW state" in how
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 50, 0, 1 << 50))
    assert by_name(doctor.diagnose(full))["disk"].status == "ok"


def test_an_offline_bundle_whose_model_is_not_cached_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_offline_preflight import fake_model

    compile_cache, run_cache = tmp_path / "hf-compile", tmp_path / "hf-here"
    fake_model(compile_cache / "hub", "meta-llama/Llama-3.2-1B")
    monkeypatch.setenv("HF_HOME", str(compile_cache))
    offline = bundle(tmp_path, "cpu", "offline: true\n")
    monkeypatch.chdir(tmp_path)
    assert by_name(doctor.diagnose(offline))["offline base_model"].status == "ok"
    monkeypatch.setenv("HF_HOME", str(run_cache))
    checks = by_name(doctor.diagnose(offline))
    missing = checks["offline base_model"]
    assert missing.status == "MISSING" and f"nor in the Hugging Face cache at {run_cache}/hub" in missing.detail
    assert "`hf download meta-llama/Llama-3.2-1B`" in missing.fix
    assert checks["offline dataset data/alpaca.jsonl"].status == "ok"
    result = run_tunefile("doctor", str(offline), cwd=tmp_path, env={"HF_HOME": str(run_cache)})
    assert result.returncode == 1 and "MISSING  offline base_model: meta-llama/Llama-3.2-1B" in result.stdout
    assert result.stdout.splitlines()[-1] == f"1 missing: this machine is not ready for bundle {offline}"


def test_not_a_bundle_is_one_line(tmp_path: Path) -> None:
    result = run_tunefile("doctor", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("tunefile runtime: ") and "not a bundle" in result.stderr
