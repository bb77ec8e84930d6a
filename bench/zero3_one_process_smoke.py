"""ZeRO-3 on one GPU: the built-in zero3 bundle run as one process, beside a plain one-GPU run (a smoke run of the
ZeRO-3 code where only one-GPU machines are lent, and a measure of DeepSpeed's own per-step work).

    python bench/zero3_one_process_smoke.py [--work /tmp/vs] [--steps 20] [--profile-dir DIR]

The bundle is compiled for 2 GPUs (tunefile refuses DeepSpeed on one) and edited to one process: accelerate.yaml's
and launch.sh's process count, and deepspeed.json's train_batch_size. With one process ZeRO-3 communicates nothing,
so its gap to the plain run is DeepSpeed's hooks and bookkeeping. With --profile-dir, both runs profile steps 8-13
(bench/step_profile/sitecustomize.py: torch.profiler, then cProfile) into DIR/single and DIR/zero3. Prints both
runs; the results of 2026-11-29 are in bench/results/zero3_one_process_smoke.json.
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


def profile_into(folder: Path | None, run: str) -> None:
    """The runs launched from here on profile a few steps into FOLDER/RUN (nothing when FOLDER is None)."""
    if folder is None:
        return
    (folder / run).mkdir(parents=True, exist_ok=True)
    os.environ["TUNEFILE_STEP_PROFILE_DIR"] = str((folder / run).resolve())
    hook = str(Path(__file__).resolve().parent / "step_profile")
    if hook not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (hook, os.environ.get("PYTHONPATH"))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vs"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile-dir", type=Path, default=None, help="profile steps 8-13 of each run into DIR")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help='one more one-process launch, edited: {"deepspeed": {zero_optimization keys}, '
                             '"accelerate": {deepspeed_config keys}, "env": {variables}}')
    options = parser.parse_args()
    work = options.work.resolve()
    profile_into(options.profile_dir, "single")
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
    plain = launch_one_process(args, run.name, {}, profile_dir=options.profile_dir)
    code = plain["exit"]
    for variant in options.variant:
        name, _, edits = variant.partition("=")
        launch_one_process(args, run.name, json.loads(edits), variant=name, profile_dir=options.profile_dir)
    return code


def launch_one_process(args: argparse.Namespace, name: str, edits: dict, *, variant: str | None = None,
                       profile_dir: Path | None = None) -> dict:
    """Launch a copy of bundles/NAME edited to one process (and by EDITS: "deepspeed" keys merged into
    deepspeed.json's zero_optimization, "accelerate" keys into accelerate.yaml's deepspeed_config, "env"
    variables for the launch); prints and returns its exit code, rate, peak and losses."""
    work, label = args.work, f"{name}-{variant}" if variant else name
    compiled, bundle = work / "bundles" / name, work / "bundles" / f"one-{label}"
    subprocess.run(["rm", "-rf", str(bundle)], check=True)
    subprocess.run(["cp", "-a", str(compiled), str(bundle)], check=True)
    accelerate = yaml.safe_load((bundle / "accelerate.yaml").read_text(encoding="utf-8"))
    accelerate["num_processes"] = 1
    accelerate["deepspeed_config"].update(edits.get("accelerate", {}))
    (bundle / "accelerate.yaml").write_text(yaml.safe_dump(accelerate), encoding="utf-8")
    launch = bundle / "launch.sh"
    launch.write_text(launch.read_text(encoding="utf-8").replace("--num_processes 2", "--num_processes 1"),
                      encoding="utf-8")
    deepspeed = json.loads((bundle / "deepspeed.json").read_text(encoding="utf-8"))
    deepspeed["train_batch_size"] //= 2
    deepspeed["zero_optimization"].update(edits.get("deepspeed", {}))
    (bundle / "deepspeed.json").write_text(json.dumps(deepspeed), encoding="utf-8")
    output_dir = work / "runs" / name  # the compiled config's output_dir
    subprocess.run(["rm", "-rf", str(output_dir)], check=True)
    if profile_dir is not None:
        profile_into(profile_dir, f"zero3-{variant}" if variant else "zero3")
    done = subprocess.run(["bash", str(launch)], cwd=work, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "0", **edits.get("env", {})})
    (work / "logs" / f"one-{label}.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    measured = vs_hf.read_run(output_dir, warmup=args.warmup)
    print(f"zero3, one process{', ' + variant if variant else ''}: exit", done.returncode, "tokens/s",
          measured["tokens_per_s"], "peak GiB", measured["peak_allocated_gib"], "first step s",
          (measured["startup"] or {}).get("seconds_to_first_step"), "losses", measured["losses"], flush=True)
    return {"exit": done.returncode, **measured}


if __name__ == "__main__":
    sys.exit(main())
