"""Compile speed: whole-process `tunefile compile` time (median of 20) and `tunefile check` over 100 configs.

Target (issues 2 and 13): under 0.3 s per compile on the 2-core CI machine, with no torch import.
Prints a table and writes bench/results/compile_speed.json.

tunefile's own modules are byte-compiled first, as `pip install` of a wheel does: an editable install under
PYTHONDONTWRITEBYTECODE=1 (this machine's environment sets it) would otherwise compile every module from source
in every process, which is most of a compile's time. The start of a bare Python (`python -c pass`) is measured
beside it, in the same run, as the machine's own reference.

    python bench/compile_speed.py [--runs 20] [--configs 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "tests" / "golden_configs" / "lora-single.yml"
RESULTS = REPO / "bench" / "results" / "compile_speed.json"
TARGET_SECONDS = 0.3


def tunefile_command() -> list[str]:
    """The installed console script, as users run it (falls back to the module)."""
    script = Path(sys.executable).parent / "tunefile"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tunefile.compiler.cli"]


def byte_compile_tunefile() -> list[str]:
    """Write the .pyc files of tunefile's packages (compileall writes them whatever PYTHONDONTWRITEBYTECODE says)."""
    code = ("import compileall, importlib, sys\n"
            "for name in ('compiler', 'runtime', 'schemas'):\n"
            "    for folder in importlib.import_module('tunefile.' + name).__path__:\n"
            "        compileall.compile_dir(folder, quiet=1)\n"
            "        print(folder)\n")
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return done.stdout.split()


def imports_torch(command: list[str], cwd: Path) -> bool:
    """Whether a compile imports torch (it must not: the compiler runs on login nodes without it)."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True, text=True)
    return any(line.split("|")[-1].strip() == "torch" for line in done.stderr.splitlines() if "|" in line)


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--configs", type=int, default=100)
    args = parser.parse_args()
    tunefile = tunefile_command()
    compiled = byte_compile_tunefile()

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        compile_command = [*tunefile, "compile", str(CONFIG), "--output", str(work / "bundle"), "--force"]
        timed(compile_command, work)  # warm the file cache
        torch_imported = imports_torch(compile_command, work)
        compile_times, python_times = [], []
        for _ in range(args.runs):  # interleaved, so that both see the same load
            compile_times.append(timed(compile_command, work))
            python_times.append(timed([sys.executable, "-c", "pass"], work))
        configs, golden = work / "configs", work / "golden"
        configs.mkdir()
        shutil.copytree(CONFIG.parent / "targets", configs / "targets")
        text = CONFIG.read_text(encoding="utf-8")
        for index in range(args.configs):
            (configs / f"case{index:03d}.yml").write_text(text.replace("lora_r: 32", f"lora_r: {index + 1}"))
        timed([*tunefile, "check", str(configs), "--golden", str(golden), "--update"], work)
        check_seconds = timed([*tunefile, "check", str(configs), "--golden", str(golden)], work)

    median = statistics.median(compile_times)
    python_median = statistics.median(python_times)
    result = {
        "benchmark": "compile_speed",
        "config": str(CONFIG.relative_to(REPO)),
        "runs": args.runs,
        "compile_median_s": round(median, 4),
        "compile_min_s": round(min(compile_times), 4),
        "compile_max_s": round(max(compile_times), 4),
        "python_start_median_s": round(python_median, 4),
        "compile_over_python_start": round(median / python_median, 2),
        "imports_torch": torch_imported,
        "bytecode": f"compiled first for {len(compiled)} package folder(s), as pip install of a wheel does",
        "check_configs": args.configs,
        "check_total_s": round(check_seconds, 3),
        "check_per_config_s": round(check_seconds / args.configs, 4),
        "target_compile_s": TARGET_SECONDS,
        "meets_target": median < TARGET_SECONDS and not torch_imported,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    rows = [
        ("compile, whole process (median)", f"{median:.3f} s", f"< {TARGET_SECONDS} s"),
        ("compile, min / max", f"{min(compile_times):.3f} / {max(compile_times):.3f} s", ""),
        ("python -c pass (the machine's reference)", f"{python_median:.3f} s", ""),
        ("compile imports torch", "yes" if torch_imported else "no", "no"),
        (f"check {args.configs} configs (one process)", f"{check_seconds:.2f} s", ""),
        ("check, per config", f"{check_seconds / args.configs * 1000:.1f} ms", ""),
    ]
    width = max(len(row[0]) for row in rows)
    print(f"{'measure':<{width}}  {'value':>16}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>16}  {target}")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
