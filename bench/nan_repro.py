"""Issue 10's NaN repro through a compiled bundle, as a user runs it; one JSON record per run.

    python bench/nan_forensics.py prepare --work W            # the 1B-shaped model and the lognormal data
    python bench/nan_repro.py --work W --label fixed --steps 200 [--micro-batch-size 4] --results OUT.json

Compiles bench/nan_repro.yml with `--target detect` (`python -m tunefile.compiler`, whichever tunefile is on
PYTHONPATH: run it once with the fixed code and once with an old checkout to compare), runs launch.sh, and
records the exit code, the logged losses (first non-finite step), tokens/s and the watchdog's line if any.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=400)
    parser.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()
    config = yaml.safe_load((BENCH / "nan_repro.yml").read_text(encoding="utf-8"))
    name = f"{args.label}-mb{args.micro_batch_size}"
    config.update(max_steps=args.steps, micro_batch_size=args.micro_batch_size, output_dir=f"runs/{name}",
                  save_steps=10_000)
    (args.work / f"{name}.yml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    subprocess.run(["rm", "-rf", str(args.work / "runs" / name)], check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONUNBUFFERED": "1"}
    subprocess.run([sys.executable, "-m", "tunefile.compiler", "compile", f"{name}.yml", "--target", "detect",
                    "--output", f"bundles/{name}", "--force"], cwd=args.work, env=env, check=True)
    start = time.perf_counter()
    try:
        run = subprocess.run(["bash", f"bundles/{name}/launch.sh"], cwd=args.work, env=env, capture_output=True,
                             text=True, timeout=args.timeout, start_new_session=True)
        code, text = run.returncode, run.stdout + run.stderr
    except subprocess.TimeoutExpired as exc:
        code, text = 124, str(exc.stdout or "") + str(exc.stderr or "")
    wall = time.perf_counter() - start
    (args.work / f"{name}.log").write_text(text, encoding="utf-8")
    metrics_path = args.work / "runs" / name / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    nonfinite = [step for step, loss in losses if not math.isfinite(loss)]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    result = {
        "label": args.label, "micro_batch_size": args.micro_batch_size, "steps_asked": args.steps, "exit_code": code,
        "wall_s": round(wall, 1), "logged_steps": len(losses), "first_nonfinite_step": nonfinite[0] if nonfinite
        else None, "ok": code == 0 and not nonfinite,
        # JSON holds no NaN: a non-finite loss is null here, and the run is a failed one (ok: false).
        "loss_first": finite_or_none(losses[0][1]) if losses else None,
        "loss_last": finite_or_none(losses[-1][1]) if losses else None,
        "tokens_per_s_median": round(statistics.median(speeds)) if speeds else None,
        "watchdog": next((line for line in text.splitlines() if "watchdog: step" in line), None),
        "adapter_saved": (args.work / "runs" / name / "adapter_model.safetensors").exists(),
        "runtime_decisions": next((r["runtime_decisions"] for r in records if "runtime_decisions" in r), None),
    }
    print(json.dumps(result), flush=True)
    results = json.loads(args.results.read_text()) if args.results.exists() else []
    args.results.write_text(json.dumps(results + [result], indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
