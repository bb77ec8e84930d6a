"""Hostile configs (issue 14): whole-process `tunefile compile` wall time and peak memory on each.

Target: every config of at most 1 MB finishes (exit 0 or a located exit 2, never 3) in under 2 s and 300 MB,
including the process start. Each case runs in a child whose own peak RSS is read with wait4, under a 4 GB
address-space limit so that a regression fails here instead of taking the machine down.
Prints a table and writes bench/results/hostile_input.json.

    python bench/hostile_input.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "hostile_input.json"
TARGET_SECONDS = 2.0
TARGET_MB = 300
ADDRESS_SPACE_LIMIT = 4 * 1024**3
ONE_MB = 1_000_000

MINIMAL = "base_model: meta-llama/Llama-3.1-8B\ndatasets:\n  - path: data/alpaca.jsonl\n    type: alpaca\n"


def alias_bomb(levels: int, width: int) -> str:
    lines = [MINIMAL.rstrip("\n"), "a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]" for level in range(1, levels)]
    return "\n".join(lines) + "\n"


def up_to(limit: int, head: str, line_of: Callable[[int], str]) -> str:
    """``head`` plus as many numbered lines as fit in ``limit`` characters: the largest file of that shape."""
    parts, size, index = [head], len(head), 0
    while size + len(line_of(index)) <= limit:
        parts.append(line_of(index))
        size += len(parts[-1])
        index += 1
    return "".join(parts)


def cases() -> dict[str, str]:
    datasets = "base_model: meta-llama/Llama-3.1-8B\ndatasets:\n"
    return {
        "valid minimal config (baseline)": MINIMAL,
        "alias bomb 9 x 9 (550 bytes)": alias_bomb(9, 9),
        "alias bomb 10 x 10": alias_bomb(10, 10),
        "recursive alias": MINIMAL + "loop: &l [*l]\n",
        "nesting 990 deep": MINIMAL + "deep: " + "[" * 990 + "]" * 990 + "\n",
        "nesting 400,000 deep (800 KB)": MINIMAL + "deep: " + "[" * 400_000 + "]" * 400_000 + "\n",
        "datasets entries up to 1 MB": up_to(ONE_MB, datasets, lambda i: f"  - {{path: d{i}.jsonl, type: alpaca}}\n"),
        "unknown keys up to 1 MB": up_to(ONE_MB, MINIMAL, lambda i: f"unknown_key_{i}: 1\n"),
        "one list up to 1 MB": up_to(ONE_MB, MINIMAL + "lora_target_modules:\n", lambda i: "  - q\n"),
        "one 1 MB value": MINIMAL + "chat_template_jinja: " + "x" * (ONE_MB - 200) + "\n",
        "dataset entries at the bound (256)": datasets + "".join(
            f"  - {{path: d{i}.jsonl, type: alpaca}}\n" for i in range(256)),
        "unknown keys at the bound (1,000 keys)": MINIMAL + "".join(f"unknown_key_{i}: 1\n" for i in range(998)),
        "values near the bound (9,000 in lists)": MINIMAL + "".join(
            f"extra_{i}: [" + ", ".join(["q"] * 999) + "]\n" for i in range(9)),
    }


def limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def run_once(config: Path, out: Path) -> tuple[float, float, int, str]:
    """(wall seconds, peak RSS in MB, exit code, last stderr line) of one `tunefile compile`."""
    command = [sys.executable, "-m", "tunefile.compiler", "compile", str(config), "-o", str(out)]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=limit_address_space)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    first = next((line for line in stderr.splitlines() if "error" in line), stderr.strip()[-200:])
    return wall, usage.ru_maxrss / 1024, child.returncode, first[:160]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for number, (name, text) in enumerate(cases().items()):
            config = Path(folder) / f"hostile-{number}.yml"
            config.write_text(text, encoding="utf-8")
            runs = [run_once(config, Path(folder) / f"bundle-{number}-{index}") for index in range(args.runs)]
            wall = statistics.median(run[0] for run in runs)
            peak = max(run[1] for run in runs)
            codes = sorted({run[2] for run in runs})
            rows.append({"case": name, "bytes": len(text.encode()), "median_s": round(wall, 3),
                         "peak_mb": round(peak, 1), "exit_codes": codes, "message": runs[0][3],
                         "within_target": wall < TARGET_SECONDS and peak < TARGET_MB and set(codes) <= {0, 2}})
    print(f"{'case':<38} {'bytes':>9} {'median s':>9} {'peak MB':>8} {'exit':>5}  ok")
    for row in rows:
        print(f"{row['case']:<38} {row['bytes']:>9,} {row['median_s']:>9.2f} {row['peak_mb']:>8.1f} "
              f"{','.join(map(str, row['exit_codes'])):>5}  {'yes' if row['within_target'] else 'NO'}")
        print(f"    {row['message']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "target": {"seconds": TARGET_SECONDS, "peak_mb": TARGET_MB, "exit_codes": [0, 2]},
        "runs_per_case": args.runs,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "results": rows,
    }, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
