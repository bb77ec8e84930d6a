"""Peak memory of `preprocess` as the dataset grows: tokenisation streams rows into shards on disk, so
the peak should stay flat while the rows grow tenfold (the seed's "exit code -9 during preprocessing").

    python bench/preprocess_memory.py [--rows 10000 100000 300000] [--work /tmp/tunefile-preprocess-bench]

For each size: write a synthetic alpaca file (bench/synthetic_data.py), compile a CPU bundle for the tiny
model, run `python -m tunefile.runtime preprocess` in a fresh process and read that process's peak
resident memory (getrusage of the child). Prints a table and writes bench/results/preprocess_memory.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
PYTHON = sys.executable


def run(command: list[str], cwd: Path) -> None:
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def measure(work: Path, rows: int) -> dict[str, float | int]:
    case = work / f"rows-{rows}"
    case.mkdir(parents=True, exist_ok=True)
    data = case / "data.jsonl"
    if not data.exists():
        run([PYTHON, str(BENCH / "synthetic_data.py"), str(data), "--rows", str(rows)], cwd=case)
    config = {"base_model": str(work / "tiny-model"), "datasets": [{"path": "data.jsonl", "type": "alpaca"}],
              "dataset_prepared_path": "prepared", "output_dir": "out", "sequence_len": 2048,
              "sample_packing": True, "micro_batch_size": 1}
    (case / "cfg.yml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    run([PYTHON, "-m", "tunefile.compiler", "compile", "cfg.yml", "--target", "cpu", "--output", "bundle",
         "--force"], cwd=case)
    subprocess.run(["rm", "-rf", str(case / "prepared")], check=True)
    # A wrapper process per size: its RUSAGE_CHILDREN peak is that of the one preprocess it started.
    probe = ("import resource, subprocess, sys, time; start = time.perf_counter(); "
             "subprocess.run([sys.executable, '-m', 'tunefile.runtime', 'preprocess', 'bundle/config.yaml'], "
             "check=True, stdout=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - start)")
    out = subprocess.run([PYTHON, "-c", probe], cwd=case, check=True, capture_output=True, text=True).stdout
    peak_kib, seconds = out.split()
    stats = json.loads(next((case / "prepared").glob("*/stats.json")).read_text(encoding="utf-8"))
    tokens = stats["tokens"]
    return {"rows": rows, "tokens": int(tokens), "peak_rss_mib": round(int(peak_kib) / 1024, 1),
            "seconds": round(float(seconds), 1), "input_mib": round(data.stat().st_size / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10000, 100000, 300000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunefile-preprocess-bench"))
    parser.add_argument("--results", type=Path, default=BENCH / "results" / "preprocess_memory.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "tiny-model" / "tokenizer.json").exists():
        run([PYTHON, "-m", "tunefile.runtime", "tiny-model", str(args.work / "tiny-model")], cwd=args.work)
    results = [measure(args.work, rows) for rows in sorted(args.rows)]
    print(f"{'rows':>8} {'input MiB':>10} {'tokens':>12} {'peak RSS MiB':>13} {'seconds':>8}")
    for r in results:
        print(f"{r['rows']:>8,} {r['input_mib']:>10} {r['tokens']:>12,} {r['peak_rss_mib']:>13} {r['seconds']:>8}")
    growth = results[-1]["peak_rss_mib"] / results[0]["peak_rss_mib"]
    rows_growth = results[-1]["rows"] / results[0]["rows"]
    print(f"rows ×{rows_growth:g} → peak memory ×{growth:.2f}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({
        "benchmark": "preprocess_memory", "when": time.strftime("%Y-%m-%d"), "results": results,
        "rows_growth": rows_growth, "peak_memory_growth": round(growth, 3),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
    }, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
