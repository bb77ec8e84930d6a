"""Review tools: diff, verify and check."""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers import GOLDEN_CONFIGS, MINIMAL, write
from helpers import run_cli as run


def test_diff_of_two_configs_shows_the_changed_lines(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yml", MINIMAL + "adapter: lora\nmicro_batch_size: 2\n")
    b = write(tmp_path / "b.yml", MINIMAL + "adapter: lora\nmicro_batch_size: 4\n")
    code, out, _ = run("diff", str(a), str(b), "--gpu", "h100-80gb")
    assert code == 1
    assert f"--- {a}/config.yaml" in out and f"+++ {b}/config.yaml" in out
    assert "-  micro_batch_size: 2" in out and "+  micro_batch_size: 4" in out  # data.micro_batch_size


def test_diff_of_identical_inputs_is_empty(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yml", MINIMAL)
    assert run("diff", str(a), str(a)) == (0, "", "")


def test_diff_of_two_bundle_directories(tmp_path: Path) -> None:
    for name, gpu in (("one", "a100-80gb"), ("two", "v100-32gb")):
        assert run("compile", str(GOLDEN_CONFIGS / "lora-single.yml"), "--output", str(tmp_path / name),
                   "--gpu", gpu)[0] == 0
    code, out, _ = run("diff", str(tmp_path / "one"), str(tmp_path / "two"))
    assert code == 1 and "-  precision: bf16" in out and "+  precision: fp16" in out  # model.precision


def test_verify_names_the_changed_file(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    run("compile", str(GOLDEN_CONFIGS / "zero2.yml"), "--output", str(out))
    code, stdout, _ = run("verify", str(out))
    assert code == 0 and "matches" in stdout
    with (out / "deepspeed.json").open("a") as handle:
        handle.write(" ")
    (out / "README.md").unlink()
    code, _, err = run("verify", str(out))
    assert code == 1 and "deepspeed.json" in err and "README.md" in err


def test_check_compares_a_folder_of_configs_with_golden_bundles(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copy(GOLDEN_CONFIGS / "lora-single.yml", configs / "mine.yml")
    golden = tmp_path / "golden"

    code, out, err = run("check", str(configs), "--golden", str(golden))
    assert code == 1 and "missing  mine" in out and "--update" in err

    code, out, _ = run("check", str(configs), "--golden", str(golden), "--update")
    assert code == 0 and "updated  mine" in out and (golden / "mine" / "launch.sh").is_file()

    code, out, _ = run("check", str(configs), "--golden", str(golden))
    assert code == 0 and "same  mine" in out

    (configs / "mine.yml").write_text((configs / "mine.yml").read_text().replace("lora_r: 32", "lora_r: 16"))
    code, out, err = run("check", str(configs), "--golden", str(golden))
    assert code == 1 and "different  mine" in out
    assert "-    r: 32" in out and "+    r: 16" in out  # model.lora.r
    assert f"tunefile check {configs} --golden {golden} --update" in err


def test_check_reports_invalid_configs_with_their_lines(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    write(configs / "broken.yml", MINIMAL + "lora_alpah: 1\n")
    code, out, _ = run("check", str(configs), "--golden", str(tmp_path / "golden"))
    assert code == 1 and "invalid  broken" in out and "broken.yml:5:1: lora_alpah: unknown key" in out
