"""ZeRO-3 on one GPU: the built-in zero3 bundle run as one process, beside a plain one-GPU run (a smoke run of the
ZeRO-3 code where only one-GPU machines are lent, and a measure of DeepSpeed's own per-step work).

    python bench/zero3_one_process_smoke.py [--work /tmp/vs] [--steps 20]

The bundle is compiled for 2 GPUs (tunefile refuses DeepSpeed on one) and edited to one process: accelerate.yaml's
and launch.sh's process count, and deepspeed.json's train_batch_size. With one process ZeRO-3 communicates nothing,
so its gap to the plain run is DeepSpeed's hooks and bookkeeping. Prints both runs; the results of 2026-11-29 are in
bench/results/zero3_one_process_smoke.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vs_hf  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vs"))
    parser.add_argument("--steps", type=int, default=20)
    options = parser.parse_args()
    work = options.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    workload = vs_hf.WORKLOADS["A"]
    model_dir = vs_hf.ensure_model(work, "1b")
    data, _ = vs_hf.ensure_data(work, workload, vs_hf.rows_needed(workload, options.steps), model_dir)
    args = argparse.Namespace(work=work, steps=options.steps, learning_rate=2e-4, smoke=False, extra={}, warmup=6,
                              timeout=150, device="cuda")
    single = vs_hf.run_tunefile(vs_hf.TunefileRun("s-1b-single", workload, {}), data, model_dir, args)
    print("single", single["status"], single["tokens_per_s"], single["peak_allocated_gib"],
          json.dumps(single["startup"]))

    run = vs_hf.TunefileRun("s-1b-zero3", workload, {"deepspeed": "zero3"}, gpus=2)
    (work / f"{run.name}.yml").write_text(yaml.safe_dump(vs_hf.tunefile_config(run, data, model_dir, args),
                                                         sort_keys=False), encoding="utf-8")
    subprocess.run([*vs_hf.TUNEFILE, "compile", f"{run.name}.yml", "--target", "detect", "--gpus-per-node", "2",
                    "--output", f"bundles/{run.name}", "--force"], cwd=work, check=True)
    bundle = work / "bundles" / run.name
    for name, two, one in (("accelerate.yaml", "num_processes: 2", "num_processes: 1"),
                           ("launch.sh", "--num_processes 2", "--num_processes 1")):
        (bundle / name).write_text((bundle / name).read_text(encoding="utf-8").replace(two, one), encoding="utf-8")
    deepspeed = json.loads((bundle / "deepspeed.json").read_text(encoding="utf-8"))
    deepspeed["train_batch_size"] //= 2
    (bundle / "deepspeed.json").write_text(json.dumps(deepspeed), encoding="utf-8")
    subprocess.run(["rm", "-rf", str(work / "runs" / run.name)], check=True)
    done = subprocess.run(["bash", str(bundle / "launch.sh")], cwd=work, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
    (work / "logs" / f"{run.name}.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    measured = vs_hf.read_run(work / "runs" / run.name, warmup=args.warmup)
    print("zero3, one process: exit", done.returncode, "tokens/s", measured["tokens_per_s"], "peak GiB",
          measured["peak_allocated_gib"], "losses", measured["losses"])
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
