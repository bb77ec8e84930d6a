"""Compile speed: whole-process `tunefile compile` time (median of 20) and `tunefile check` over 100 configs.

Target (issue 2): under 0.3 s per compile on the 2-core CI machine, with no torch import.
Prints a table and writes bench/results/compile_speed.json.

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

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        timed([*tunefile, "compile", str(CONFIG), "--output", str(work / "warm"), "--force"], work)  # warm caches
        compile_times = [
            timed([*tunefile, "compile", str(CONFIG), "--output", str(work / "bundle"), "--force"], work)
            for _ in range(args.runs)
        ]
        configs, golden = work / "configs", work / "golden"
        configs.mkdir()
        shutil.copytree(CONFIG.parent / "targets", configs / "targets")
        text = CONFIG.read_text(encoding="utf-8")
        for index in range(args.configs):
            (configs / f"case{index:03d}.yml").write_text(text.replace("lora_r: 32", f"lora_r: {index + 1}"))
        timed([*tunefile, "check", str(configs), "--golden", str(golden), "--update"], work)
        check_seconds = timed([*tunefile, "check", str(configs), "--golden", str(golden)], work)

    median = statistics.median(compile_times)
    result = {
        "benchmark": "compile_speed",
        "config": str(CONFIG.relative_to(REPO)),
        "runs": args.runs,
        "compile_median_s": round(median, 4),
        "compile_min_s": round(min(compile_times), 4),
        "compile_max_s": round(max(compile_times), 4),
        "check_configs": args.configs,
        "check_total_s": round(check_seconds, 3),
        "check_per_config_s": round(check_seconds / args.configs, 4),
        "target_compile_s": TARGET_SECONDS,
        "meets_target": median < TARGET_SECONDS,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    rows = [
        ("compile, whole process (median)", f"{median:.3f} s", f"< {TARGET_SECONDS} s"),
        ("compile, min / max", f"{min(compile_times):.3f} / {max(compile_times):.3f} s", ""),
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
