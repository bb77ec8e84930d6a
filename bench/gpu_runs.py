"""Bundle-driven training runs on a GPU machine: the GPU smoke run and the multi-GPU strategy matrix.

    python bench/gpu_runs.py --work /tmp/gpu-work --results bench/results/gpu_runs.json RUN [RUN ...]
    python bench/gpu_runs.py --list

On a host with more GPUs than a run needs, `--first-gpu N` gives it GPUs N, N+1, …, so two lanes of runs can
share the host (their own --results and --tails files; make the inputs first with --inputs-only, since
two lanes making the same model at once would race).

Every run goes the way a user's job goes: write a config, `tunefile compile --target detect`, then
`bash bundle/launch.sh` with CUDA_VISIBLE_DEVICES picking the GPUs. Runs with a `resume_at` step are
killed right after that step (TUNEFILE_FAULT_AFTER_STEP, no cleanup: what a preempted job leaves) and
launched again, which must resume from the newest complete checkpoint. LoRA runs end with
`tunefile merge-lora` from what the strategy saved.

The models are random Llama-shaped ones (bench/llama_shaped_model.py, Llama 3.2 1B / 3.1 8B layer shapes
and vocabulary) with the tiny tokenizer of `tunefile tiny-model`; the data is a synthetic alpaca set of
variable length (bench/synthetic_data.py). Nothing is downloaded.

Each finished run appends one JSON object to --results and a row to the table printed at the end:
tokens/s (input tokens, all GPUs, median over logged windows after the first), tokens/s per GPU, peak
GPU memory of rank 0, first and last logged loss, wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
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
# launch.sh starts `accelerate` from PATH: this interpreter's scripts first.
PATH = os.pathsep.join([str(Path(PYTHON).parent), os.environ.get("PATH", "")])


@dataclass(frozen=True)
class Run:
    shape: str  # 1b | 8b
    gpus: int
    distribution: dict[str, Any] = field(default_factory=dict)  # config keys choosing the strategy
    adapter: str | None = "lora"
    steps: int = 50
    resume_at: int | None = None  # kill after this step, then relaunch (checkpoints every save_steps)
    save_steps: int = 25
    merge: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


DDP = {"strategy": "ddp"}
FSDP2 = {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"}}
FSDP2_OFFLOAD = {"fsdp_version": 2, "fsdp_config": {"offload_params": True, "reshard_after_forward": True,
                                                    "state_dict_type": "SHARDED_STATE_DICT"}}
ZERO2 = {"deepspeed": "zero2"}
ZERO3 = {"deepspeed": "zero3"}

RUNS: dict[str, Run] = {
    # A dry run of this script on a CPU machine: the tiny shape, kill and resume, merge.
    "tiny-lora-cpu": Run("tiny", 1, {}, steps=12, resume_at=7, save_steps=5, extra={"bf16": "auto", "tf32": False,
                                                                                  "optimizer": "adamw_torch"}),
    # The runtime issue's GPU smoke run: one GPU, bf16 LoRA, packing through the varlen kernel.
    "1b-lora-single": Run("1b", 1, {}, resume_at=30),
    "1b-qlora-single": Run("1b", 1, {}, adapter="qlora", steps=30, merge=True,
                           extra={"load_in_4bit": True, "optimizer": "paged_adamw_8bit"}),
    # Strategy matrix, 2 GPUs, LoRA.
    "1b-lora-ddp": Run("1b", 2, DDP, resume_at=30),
    "1b-lora-fsdp2": Run("1b", 2, FSDP2, resume_at=30),
    "1b-lora-fsdp2-offload": Run("1b", 2, FSDP2_OFFLOAD, resume_at=30),
    "1b-lora-zero2": Run("1b", 2, ZERO2, resume_at=30),
    "1b-lora-zero3": Run("1b", 2, ZERO3, resume_at=30),
    # Scaling baselines: the same LoRA workload on one GPU under each strategy's launcher.
    "1b-lora-fsdp2-1gpu": Run("1b", 1, FSDP2, merge=False),
    # Scaling on one host: the 1B LoRA workload, 30 steps, on 1, 2 and 4 GPUs under DDP and FSDP2.
    **{f"scale-1b-lora-{kind}-{gpus}gpu": Run("1b", gpus, {} if kind == "ddp" and gpus == 1 else dist, steps=30,
                                              merge=False)
       for kind, dist in (("ddp", DDP), ("fsdp2", FSDP2)) for gpus in (1, 2, 4)},
    # Full fine-tuning of the 1B shape.
    "1b-full-fsdp2": Run("1b", 2, FSDP2, adapter=None, steps=30, merge=False, extra={"learning_rate": 2e-5}),
    "1b-full-zero3": Run("1b", 2, ZERO3, adapter=None, steps=30, merge=False, extra={"learning_rate": 2e-5}),
    # The 8B shape.
    "8b-lora-single": Run("8b", 1, {}, steps=30, merge=False),
    "8b-lora-ddp": Run("8b", 2, DDP, resume_at=30),
    "8b-lora-fsdp2": Run("8b", 2, FSDP2, resume_at=30),
    "8b-lora-fsdp2-offload": Run("8b", 2, FSDP2_OFFLOAD, resume_at=30),
    "8b-lora-zero2": Run("8b", 2, ZERO2, resume_at=30),
    "8b-lora-zero3": Run("8b", 2, ZERO3, resume_at=30),
}

SHAPE_BATCH = {"tiny": {"micro_batch_size": 2, "sequence_len": 512},
               "1b": {"micro_batch_size": 4, "sequence_len": 2048},
               "8b": {"micro_batch_size": 2, "sequence_len": 2048, "gradient_checkpointing": True}}


RUNNING: list[subprocess.Popen] = []  # the launch in progress, stopped with this script


def stop_running_launch(signum: int, frame: Any) -> None:
    """A lane stopped by `timeout` takes its launch's process group with it, so the GPUs come free."""
    for process in RUNNING:
        os.killpg(process.pid, signal.SIGKILL)
    sys.exit(128 + signum)


def sh(command: list[str], *, cwd: Path, env: dict[str, str] | None = None, log: Path | None = None,
       timeout: float = 900) -> tuple[int, float]:
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") if log else open(os.devnull, "w") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        # Its own process group, so a timeout stops accelerate's workers too and frees the GPUs.
        process = subprocess.Popen(command, cwd=cwd, env={**os.environ, "PATH": PATH, **(env or {})}, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        RUNNING.append(process)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = 124
        finally:
            RUNNING.remove(process)
    return code, time.perf_counter() - start


def ensure_inputs(work: Path, shape: str) -> None:
    """The tokenizer, the random model of this shape and the synthetic data, each made once."""
    if not (work / "tiny-model" / "tokenizer.json").exists():
        subprocess.run([*TUNEFILE, "tiny-model", str(work / "tiny-model")], check=True)
    model_dir = work / f"llama-{shape}"
    if not (model_dir / "config.json").exists():
        subprocess.run([PYTHON, str(BENCH / "llama_shaped_model.py"), str(work / "tiny-model"), str(model_dir),
                        "--shape", shape], check=True)
    data = work / "data" / "synthetic.jsonl"
    if not data.exists():
        subprocess.run([PYTHON, str(BENCH / "synthetic_data.py"), str(data), "--rows", "6000"], check=True)


def config_for(name: str, run: Run, first_gpu: int = 0) -> dict[str, Any]:
    values: dict[str, Any] = {
        "base_model": f"llama-{run.shape}",
        "datasets": [{"path": "data/synthetic.jsonl", "type": "alpaca"}],
        # Shared by the runs of one lane: the second run onwards reuses the cache. Lanes running side by side
        # each have their own, so two never write the same cache at once.
        "dataset_prepared_path": f"prepared-gpu{first_gpu}" if first_gpu else "prepared",
        "output_dir": f"runs/{name}",
        "sample_packing": True,
        "gradient_accumulation_steps": 1,
        "max_steps": run.steps,
        "optimizer": "adamw_torch_fused",
        "lr_scheduler": "cosine",
        "learning_rate": 1e-3,
        "warmup_steps": 5,
        "bf16": True,
        "tf32": True,
        "logging_steps": 5,
        "save_steps": run.save_steps,
        "save_total_limit": 2,
        "seed": 42,
    }
    values.update(SHAPE_BATCH[run.shape])
    if run.adapter:
        values.update({"adapter": run.adapter, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                       "lora_target_linear": True})
    values.update(run.distribution)
    values.update(run.extra)
    return values


def throughput(records: list[dict[str, Any]]) -> float | None:
    """Median tokens/s over the logged windows, leaving out the first (warm-up, compilation)."""
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    return statistics.median(speeds) if speeds else None


def execute(work: Path, name: str, run: Run, logs: Path, *, timeout: float, first_gpu: int = 0) -> dict[str, Any]:
    ensure_inputs(work, run.shape)
    log = logs / f"{name}.log"
    log.write_text("", encoding="utf-8")
    config = work / f"{name}.yml"
    config.write_text(yaml.safe_dump(config_for(name, run, first_gpu), sort_keys=False), encoding="utf-8")
    output_dir = work / "runs" / name
    subprocess.run(["rm", "-rf", str(output_dir)], check=True)
    result: dict[str, Any] = {"run": name, **{k: v for k, v in asdict(run).items() if k != "extra"},
                              "extra": run.extra}
    code, _ = sh([*TUNEFILE, "compile", config.name, "--target", "detect", "--gpus-per-node",
                  str(run.gpus), "--output", f"bundles/{name}", "--force"], cwd=work, log=log)
    if code:
        return result | {"ok": False, "failed_at": "compile"}
    bundle = work / "bundles" / name
    gpus = ",".join(str(i) for i in range(first_gpu, first_gpu + run.gpus))
    port = 29500 + 100 * first_gpu + len(name)  # lanes side by side never share a rendezvous port
    env = {"CUDA_VISIBLE_DEVICES": gpus, "PYTHONUNBUFFERED": "1", "MASTER_PORT": str(port)}
    walls = []
    if run.resume_at:
        code, wall = sh(["bash", str(bundle / "launch.sh")], cwd=work, log=log, timeout=timeout,
                        env=env | {"TUNEFILE_FAULT_AFTER_STEP": str(run.resume_at)})
        walls.append(wall)
        result["killed_exit_code"] = code
        if code == 0:
            return result | {"ok": False, "failed_at": "fault injection (the run was not interrupted)"}
    code, wall = sh(["bash", str(bundle / "launch.sh")], cwd=work, env=env, log=log, timeout=timeout)
    walls.append(wall)
    text = log.read_text(encoding="utf-8", errors="replace")
    if run.resume_at:
        result["resumed"] = next((line.split("resumed from ", 1)[1].split(" at step")[0].strip()
                                  for line in text.splitlines() if "resumed from " in line), None)
    if code:
        return result | {"ok": False, "failed_at": "train", "exit_code": code, "wall_s": walls}
    metrics_path = output_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r]
    speed = throughput(records)
    summary = json.loads((output_dir / "train_summary.json").read_text(encoding="utf-8"))
    result |= {
        "ok": True, "wall_s": [round(w, 1) for w in walls], "final_step": summary["step"],
        "distributed_type": summary["distributed_type"], "world_size": summary.get("world_size"),
        "tokens_per_s": round(speed) if speed else None,
        "tokens_per_s_per_gpu": round(speed / run.gpus) if speed else None,
        "peak_memory_gib": max((r.get("peak_memory_gib", 0) for r in records), default=None),
        "loss_first": round(losses[0], 4) if losses else None, "loss_last": round(losses[-1], 4) if losses else None,
        "logged_steps": [r["step"] for r in records if "loss" in r],
        "checkpoint_mib": checkpoint_mib(output_dir),
    }
    if run.merge and run.adapter:
        # The same target as the training run (DeepSpeed configs need two GPUs to compile); the merge uses one.
        code, wall = sh([*TUNEFILE, "merge-lora", config.name, "--target", "detect", "--gpus-per-node",
                         str(run.gpus)], cwd=work, env={"CUDA_VISIBLE_DEVICES": str(first_gpu)}, log=log)
        merged = output_dir / "merged"
        result["merged"] = {"exit_code": code, "wall_s": round(wall, 1),
                           "files": sorted(p.name for p in merged.glob("*"))[:12] if merged.exists() else []}
    return result


def checkpoint_mib(output_dir: Path) -> float | None:
    """Disk size of the newest checkpoint: what each save costs (for an adapter run, ideally the adapter and
    its optimizer state, not the frozen base)."""
    found = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not found:
        return None
    return round(sum(f.stat().st_size for f in found[-1].rglob("*") if f.is_file()) / 2**20, 1)


def table(results: list[dict[str, Any]]) -> str:
    head = f"{'run':24} {'ok':3} {'gpus':>4} {'tok/s':>9} {'tok/s/gpu':>9} {'peak GiB':>8} {'loss':>15} " \
           f"{'resumed from':>18} {'merge':>5} {'ckpt MiB':>9}"
    lines = [head, "-" * len(head)]
    for r in results:
        loss = f"{r.get('loss_first', '-')}→{r.get('loss_last', '-')}" if r.get("ok") else r.get("failed_at", "")
        resumed = Path(r["resumed"]).name if r.get("resumed") else "-"
        merge = r.get("merged", {}).get("exit_code", "-")
        lines.append(f"{r['run']:24} {'yes' if r.get('ok') else 'NO':3} {r['gpus']:>4} "
                     f"{r.get('tokens_per_s') or '-':>9} {r.get('tokens_per_s_per_gpu') or '-':>9} "
                     f"{r.get('peak_memory_gib') or '-':>8} {loss:>15} {resumed:>18} {merge!s:>5} "
                     f"{r.get('checkpoint_mib') or '-':>9}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run names (see --list)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunefile-gpu-runs"))
    parser.add_argument("--results", type=Path, default=BENCH / "results" / "gpu_runs.json")
    parser.add_argument("--logs", type=Path, default=None, help="folder for each run's log (default WORK/logs)")
    parser.add_argument("--tails", type=Path, default=None,
                        help="append the last lines of each run's log to this one file (what a GPU lease sends back)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per launch before it is stopped")
    parser.add_argument("--first-gpu", type=int, default=0, help="the runs use GPUs from this one on")
    parser.add_argument("--inputs-only", action="store_true", help="make the named runs' model, data and tokenizer")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, stop_running_launch)
    if args.list or not args.runs:
        for name, run in RUNS.items():
            print(f"{name:24} {run.shape} × {run.gpus} GPU  {run.adapter or 'full'}  {run.distribution}")
        return 0
    unknown = [name for name in args.runs if name not in RUNS]
    if unknown:
        parser.error(f"unknown runs: {', '.join(unknown)}")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.inputs_only:
        for shape in dict.fromkeys(RUNS[name].shape for name in args.runs):
            ensure_inputs(args.work, shape)
        return 0
    logs = args.logs or args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.results.read_text()) if args.results.exists() else []
    done = []
    for name in args.runs:
        print(f"== {name}", flush=True)
        result = execute(args.work, name, RUNS[name], logs, timeout=args.timeout, first_gpu=args.first_gpu)
        if args.tails:
            lines = [line for line in (logs / f"{name}.log").read_text(encoding="utf-8", errors="replace")
                     .splitlines() if not line.startswith("step ")]
            errors = list(dict.fromkeys(line for line in lines if "Error" in line or "error:" in line))
            with args.tails.open("a", encoding="utf-8") as tails:
                tails.write(f"===== {name}\n" + "\n".join(errors[:15] + ["..."] + lines[-25:]) + "\n")
        result["device"] = device_name()
        print(json.dumps(result), flush=True)
        results = [r for r in results if not (r["run"] == name and r.get("device") == result["device"])] + [result]
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        done.append(result)
    print(table(done))
    return 0 if all(r.get("ok") for r in done) else 1


def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, check=True).stdout.split("\n")[0].strip()
        return out or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "cpu"


if __name__ == "__main__":
    sys.exit(main())
