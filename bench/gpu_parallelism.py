"""N-D parallelism on GPUs (HSDP, tensor and context parallelism), each run against the plain run that trains on
the same data.

    python bench/gpu_parallelism.py [--work DIR] [--results FILE] [--steps 20] [--timeout 300] [RUN ...]
    python bench/gpu_parallelism.py --list

With no RUN, every run that fits the GPUs this machine has (torch.cuda.device_count()). Each run goes the way a
user's job goes: a config, `tunefile compile --target detect --gpus-per-node N`, then `timeout T bash
bundle/launch.sh` with CUDA_VISIBLE_DEVICES picking the first N GPUs. The model is `tunefile tiny-model` (Llama:
4 attention heads, 2 key/value heads, MLP width 128, untied embeddings, so tensor parallelism of 2 divides it);
the data is bench/synthetic_data.py's variable-length alpaca rows (16 to ~1,100 tokens), so a sequence of up to
1,024 tokens is sliced between the context-parallel ranks. Nothing is downloaded.

Every run trains in fp32 with TF32 off, so that a parallel layout and its reference differ only by the order of
floating-point sums. The reference of a run is the plain run with the same number of data-parallel shares (the
same micro-batches each step): one GPU for context parallelism over every GPU, DDP over 2 or 4 GPUs otherwise. A
run passes when every logged loss is finite and each step's loss is within --tolerance of the reference's (and
the evaluation losses too). The `-packed` runs pack samples: their one-GPU reference isolates them with PyTorch's
varlen kernel, which computes in bf16 even in an fp32 run, so their tolerance is --packed-tolerance. The
`-resume` runs are killed after step 10 (what a preempted job leaves) and launched again; they must resume from
the checkpoint of step 10 and still match.

Results go to --results (bench/results/gpu_parallelism.json): per run, the per-step losses, the reference's,
the largest |difference|, and what the runtime decided (its mesh, attention). The table is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
PYTHON = sys.executable
TUNEFILE = [PYTHON, "-m", "tunefile.compiler"]  # works where the console script is not on PATH
PATH = os.pathsep.join([str(Path(PYTHON).parent), os.environ.get("PATH", "")])  # launch.sh's `accelerate`

FSDP2 = {"fsdp_version": 2, "fsdp_config": {"auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                            "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                                            "reshard_after_forward": True,
                                            "state_dict_type": "SHARDED_STATE_DICT"}}
DDP = {"strategy": "ddp"}


@dataclass(frozen=True)
class Run:
    gpus: int
    reference: str | None  # the run it must match; None: a reference itself
    keys: dict[str, Any] = field(default_factory=dict)
    packed: bool = False
    resume_at: int | None = None  # kill after this step, launch again (checkpoints every SAVE_STEPS)


SAVE_STEPS = 10
RUNS: dict[str, Run] = {
    # References: plain data parallelism over 1, 2 and 4 data shares.
    "single": Run(1, None),
    "single-packed": Run(1, None, packed=True),
    "ddp2": Run(2, None, DDP),
    "ddp4": Run(4, None, DDP),
    # Context parallelism: every row sliced between 2 GPUs (one data share).
    "cp2": Run(2, "single", {"context_parallel_size": 2}),
    "cp2-packed": Run(2, "single-packed", {"context_parallel_size": 2}, packed=True),
    "cp2-resume": Run(2, "single", {"context_parallel_size": 2}, resume_at=SAVE_STEPS),
    # 4 GPUs.
    "hsdp2x2": Run(4, "ddp4", {**FSDP2, "dp_replicate_size": 2, "dp_shard_size": 2}),
    "tp2-fsdp2": Run(4, "ddp2", {**FSDP2, "tensor_parallel_size": 2}),
    "tp2-fsdp2-resume": Run(4, "ddp2", {**FSDP2, "tensor_parallel_size": 2}, resume_at=SAVE_STEPS),
    "cp2-fsdp2": Run(4, "ddp2", {**FSDP2, "context_parallel_size": 2}),
    "cp2-ddp2": Run(4, "ddp2", {**DDP, "context_parallel_size": 2}),
    "tp2-cp2-fsdp2": Run(4, "single", {**FSDP2, "tensor_parallel_size": 2, "context_parallel_size": 2}),
}

RUNNING: list[subprocess.Popen] = []


def stop_running_launch(signum: int, frame: Any) -> None:
    """Stopped from outside: take the launch in progress (and its GPU processes) with us."""
    for process in RUNNING:
        os.killpg(process.pid, signal.SIGKILL)
    sys.exit(128 + signum)


def sh(command: list[str], *, cwd: Path, log: Path, env: dict[str, str] | None = None,
       timeout: float = 600) -> tuple[int, float]:
    """``command`` under coreutils' `timeout` in its own process group (killed whole if it overruns)."""
    start = time.perf_counter()
    with log.open("a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        process = subprocess.Popen(["timeout", "--kill-after=20", str(int(timeout)), *command], cwd=cwd,
                                   env={**os.environ, "PATH": PATH, **(env or {})}, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        RUNNING.append(process)
        try:
            code = process.wait(timeout=timeout + 60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
        finally:
            RUNNING.remove(process)
    return code, time.perf_counter() - start


def ensure_inputs(work: Path) -> None:
    if not (work / "tiny-model" / "config.json").exists():
        subprocess.run([*TUNEFILE, "tiny-model", str(work / "tiny-model")], check=True)
    data = work / "data" / "synthetic.jsonl"
    if not data.exists():
        subprocess.run([PYTHON, str(BENCH / "synthetic_data.py"), str(data), "--rows", "800"], check=True)


def config_for(name: str, run: Run, steps: int) -> dict[str, Any]:
    return {
        "base_model": "tiny-model",
        "datasets": [{"path": "data/synthetic.jsonl", "type": "alpaca"}],
        "dataset_prepared_path": "prepared",
        "output_dir": f"runs/{name}",
        "sequence_len": 1024,
        "sample_packing": run.packed,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": steps,
        "optimizer": "adamw_torch",
        "lr_scheduler": "cosine",
        "learning_rate": 3e-3,
        "warmup_steps": 2,
        "bf16": False,
        "tf32": False,
        "attn_implementation": "sdpa",
        "val_set_size": 0.05,
        "eval_steps": SAVE_STEPS,
        "logging_steps": 1,
        "save_steps": SAVE_STEPS,
        "seed": 11,
        **run.keys,
    }


def records_of(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def losses_by_step(records: list[dict[str, Any]], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in records if key in r}


def execute(work: Path, name: str, run: Run, *, steps: int, timeout: float, logs: Path) -> dict[str, Any]:
    log = logs / f"{name}.log"
    log.write_text("", encoding="utf-8")
    (work / f"{name}.yml").write_text(yaml.safe_dump(config_for(name, run, steps), sort_keys=False), encoding="utf-8")
    output_dir = work / "runs" / name
    subprocess.run(["rm", "-rf", str(output_dir)], check=True)
    result: dict[str, Any] = {"run": name, **{k: v for k, v in asdict(run).items()}}
    code, _ = sh([*TUNEFILE, "compile", f"{name}.yml", "--target", "detect", "--gpus-per-node", str(run.gpus),
                  "--output", f"bundles/{name}", "--force"], cwd=work, log=log, timeout=120)
    if code:
        return result | {"ok": False, "failed_at": "compile", "log_tail": tail(log)}
    plan = yaml.safe_load((work / "bundles" / name / "config.yaml").read_text(encoding="utf-8"))
    result["plan_parallelism"] = plan["distribution"].get("parallelism")
    result["plan_strategy"] = plan["distribution"]["strategy"]
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(run.gpus))), "PYTHONUNBUFFERED": "1",
           "MASTER_PORT": str(29400 + len(name)), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    launch = ["bash", str(work / "bundles" / name / "launch.sh")]
    walls = []
    if run.resume_at:
        code, wall = sh(launch, cwd=work, log=log, timeout=timeout,
                        env=env | {"TUNEFILE_FAULT_AFTER_STEP": str(run.resume_at)})
        walls.append(round(wall, 1))
        if code == 0:
            return result | {"ok": False, "failed_at": "the fault injection did not stop the run", "wall_s": walls}
    code, wall = sh(launch, cwd=work, log=log, timeout=timeout, env=env)
    walls.append(round(wall, 1))
    result["wall_s"] = walls
    if run.resume_at:
        text = log.read_text(encoding="utf-8", errors="replace")
        result["resumed"] = f"resumed from runs/{name}/checkpoint-{run.resume_at}" in text
    if code:
        return result | {"ok": False, "failed_at": "timeout" if code in (124, 137) else "train", "exit_code": code,
                         "log_tail": tail(log)}
    records = records_of(output_dir)
    summary = json.loads((output_dir / "train_summary.json").read_text(encoding="utf-8"))
    losses = losses_by_step(records, "loss")
    result |= {"losses": losses, "eval_losses": losses_by_step(records, "eval_loss"),
               "finite": all(math.isfinite(v) for v in losses.values()) and len(losses) == steps,
               "distributed_type": summary["distributed_type"], "world_size": summary["world_size"],
               "runtime_decisions": summary["runtime_decisions"],
               "peak_memory_gib": max((r.get("peak_memory_gib", 0) for r in records), default=None),
               "final_model_saved": any((output_dir / n).exists() for n in ("model.safetensors",
                                                                          "model.safetensors.index.json"))}
    return result


def compare(result: dict[str, Any], reference: dict[str, Any] | None, tolerance: float) -> dict[str, Any]:
    """The largest |loss − reference loss| over the steps (and evaluations) both logged, and the verdict."""
    if reference is None or not reference.get("losses"):
        return result | {"ok": False, "failed_at": "no reference run"} if result.get("ok", True) else result
    steps = sorted(set(result["losses"]) & set(reference["losses"]))
    diff = max((abs(result["losses"][s] - reference["losses"][s]) for s in steps), default=math.inf)
    evals = sorted(set(result["eval_losses"]) & set(reference["eval_losses"]))
    eval_diff = max((abs(result["eval_losses"][s] - reference["eval_losses"][s]) for s in evals), default=0.0)
    ok = (result["finite"] and len(steps) == len(reference["losses"]) and diff <= tolerance
          and eval_diff <= tolerance and result.get("resumed", True) and result["final_model_saved"])
    return result | {"reference_losses": reference["losses"], "max_abs_loss_diff": diff,
                     "max_abs_eval_loss_diff": eval_diff, "tolerance": tolerance, "ok": ok}


def tail(log: Path, lines: int = 30) -> list[str]:
    text = log.read_text(encoding="utf-8", errors="replace").splitlines()
    errors = [line for line in text if "Error" in line or "error:" in line]
    return list(dict.fromkeys(errors[:10])) + text[-lines:]


def table(results: list[dict[str, Any]]) -> str:
    head = f"{'run':18} {'ok':3} {'gpus':>4} {'reference':14} {'max |Δloss|':>12} {'max |Δeval|':>12} {'wall s':>12}"
    lines = [head, "-" * len(head)]
    for r in results:
        diff = r.get("max_abs_loss_diff")
        eval_diff = r.get("max_abs_eval_loss_diff")
        lines.append(f"{r['run']:18} {'yes' if r.get('ok') else 'NO':3} {r['gpus']:>4} {r.get('reference') or '-':14} "
                     f"{'-' if diff is None else f'{diff:.2e}':>12} "
                     f"{'-' if eval_diff is None else f'{eval_diff:.2e}':>12} {str(r.get('wall_s', '-')):>12}"
                     + (f"  {r['failed_at']}" if r.get("failed_at") else ""))
    return "\n".join(lines)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run names (default: every run that fits the GPUs)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunefile-gpu-parallelism"))
    parser.add_argument("--results", type=Path, default=BENCH / "results" / "gpu_parallelism.json")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per launch before it is stopped")
    parser.add_argument("--tolerance", type=float, default=2e-3, help="largest |loss difference| that passes")
    parser.add_argument("--packed-tolerance", type=float, default=3e-2)
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, stop_running_launch)
    if args.list:
        for name, run in RUNS.items():
            print(f"{name:18} {run.gpus} GPU  reference {run.reference or '-':14} {run.keys}")
        return 0
    available = gpu_count()
    names = args.runs or [name for name, run in RUNS.items() if run.gpus <= available]
    unknown = [name for name in names if name not in RUNS]
    if unknown:
        parser.error(f"unknown runs: {', '.join(unknown)}")
    too_big = [name for name in names if RUNS[name].gpus > available]
    if too_big:
        parser.error(f"{', '.join(too_big)} need more than the {available} GPU(s) here")
    # Each reference before the runs compared with it.
    wanted = list(dict.fromkeys([RUNS[n].reference for n in names if RUNS[n].reference] + names))
    args.work.mkdir(parents=True, exist_ok=True)
    ensure_inputs(args.work)
    logs = args.work / "logs"
    logs.mkdir(exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    for name in wanted:
        run = RUNS[name]
        print(f"== {name}", flush=True)
        result = execute(args.work, name, run, steps=args.steps, timeout=args.timeout, logs=logs)
        if result.get("ok", True) and run.reference:
            result = compare(result, done.get(run.reference),
                             args.packed_tolerance if run.packed else args.tolerance)
        elif result.get("ok", True):
            result["ok"] = result["finite"] and result["final_model_saved"]
        done[name] = result
        print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "reference_losses",
                                                                       "eval_losses")}), flush=True)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"device": device_name(), "gpus": available, "steps": args.steps,
                                            "runs": list(done.values())}, indent=2) + "\n", encoding="utf-8")
    print(table(list(done.values())))
    return 0 if all(r.get("ok") for r in done.values()) else 1


def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, check=True).stdout.split("\n")[0].strip()
        return out or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "cpu"


if __name__ == "__main__":
    sys.exit(main())
