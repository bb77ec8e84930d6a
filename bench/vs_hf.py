"""tunefile against Hugging Face's Trainer + PEFT, both sides in one call on the same GPU machine (issue 13).

    python bench/vs_hf.py --work /tmp/vs-hf                       # workloads A and B (and Z with 2 GPUs)
    python bench/vs_hf.py --work /tmp/vs-hf --workloads A --hf 'A:name=hf-flex,attn=flex_attention,timeout=300'
    python bench/vs_hf.py --work /tmp/vs-hf --tunefile-variant 'cce={plugins: [axolotl.integrations.\
cut_cross_entropy.CutCrossEntropyPlugin], cut_cross_entropy: true}' --tunefile-variant 'B:gc=@gc.yml'
    python bench/vs_hf.py --smoke --work /tmp/vs-hf-smoke         # tiny model, CPU, a few steps

Workloads (random Llama-shaped models from bench/llama_shaped_model.py; LoRA r=32 α=64 dropout 0.05 on every
linear layer of the decoder; bf16; fused AdamW, lr 2e-4 cosine with 5 warm-up steps; no gradient checkpointing
unless a configuration asks; the same number of optimizer steps on both sides):

- A: the 1B shape, `pretokenized` rows of random ids with lengths ``min(2048, max(16, int(exp(5.3 + 0.7·z))))``,
  sequence_len 2048. Hugging Face: padding-free (DataCollatorWithFlattening) + SDPA, 32 rows per micro-batch;
  tunefile: sample_packing, micro batch 4 (--micro-batch).
- B: the 8B shape, rows of exactly 4096 tokens, micro batch 1 on both sides.
- Z (with 2 GPUs or more; tunefile only): ZeRO-3 LoRA against DDP on 2 GPUs, at 1B on A's data and 8B on B's.
  tunefile's zero3 keeps a frozen base whole on every GPU, outside ZeRO-3, where it fits
  (compiler/resolve/deepspeed.py, runtime/zero3_gathering.py); with
  --z-variant KIND=SHAPES (e.g. partitioned=1b,8b) also, before that pair, so the pair starts from a warm data cache:
  - partitioned: the base partitioned and gathered a decoder layer at a time (a DeepSpeed JSON, which tunefile
    does not keep whole);
  - per-module: ZeRO-3 as DeepSpeed gathers by default, module by module (a JSON that also sets
    stage3_module_granularity_threshold: 0, which tunefile leaves to DeepSpeed);
  - zero2: the built-in zero2 preset.
  Every tunefile run also records its time to the first step (train_summary.json's `startup`: from launch.sh's
  start, phase by phase).

Ids are drawn below min(128,000, the vocabulary) and above every special token of the tokenizer: an example that
starts with the pad id turns the loss NaN in any trainer that does not strip it (issue 10), and this compares
speed on clean data. Every run is a subprocess with a time limit (--timeout; an `--hf` configuration may carry
its own): Hugging Face's flex-attention path hung at step 0 on an H200, and a run that times out is recorded as
TIMEOUT, not fatal. The matmul ceiling is measured first, in its own subprocess.

What is measured, per run:
- tokens/s: input tokens (padding excluded) over wall time, leaving out the first --warmup steps. Hugging Face:
  a callback timestamps each step's end (after a CUDA synchronise) and the collator counts each batch's tokens;
  rate = tokens of steps W+1..N / (end of step N − end of step W). tunefile logs every step (logging_steps 1)
  with that step's rate, from the end of the previous step's log to its own; rate = the harmonic mean of steps
  W+1..N, which is their tokens over their time when the steps carry equal tokens (packing fills every row to
  within a few per cent; B's rows are all the same length).
- peak GPU memory: torch.cuda.max_memory_allocated (both sides: Hugging Face's from the callback, tunefile's from
  what the runtime logs in metrics.jsonl) and max_memory_reserved (Hugging Face's only: the runtime logs
  allocated memory alone), and the peak memory.used nvidia-smi reports, sampled every 0.5 s from outside (the
  allocator's cache and the CUDA context included; the same yardstick for both sides).
- MFU against the bf16 matmul ceiling (the best TFLOP/s of large square bf16 GEMMs on this GPU, this call):
  model FLOPs per input token of LoRA training on a frozen base, recomputation (gradient checkpointing, the
  attention kernel's backward) not counted:
      F = 4·N_frozen + 6·N_lora + 6·L·d·Σn²/Σn
  N_frozen: the frozen weights that take part in a matmul (every linear layer of the decoder and the output head;
  the embedding is a lookup): 2 FLOPs per weight and token forward, 2 for the input gradient backward, and no
  weight gradient. N_lora: the adapters' A and B (r·(d_in + d_out) per adapted linear): forward, input gradient
  and weight gradient, 2 each. Attention: for a sample of n tokens, causal QKᵀ and PV cost d·n² each forward per
  layer (d = heads × head_dim), the backward twice that, so 6·d·n² per layer; per token, averaged over the
  data's samples (packing and padding-free attention keep samples apart). MFU = F × tokens/s per GPU / ceiling.
- time to first step (tunefile's runs): train_summary.json's `startup`. Where PYTHONDONTWRITEBYTECODE is set, the
  installed packages are byte-compiled first, as `pip install` leaves them (byte_compile_installed).
- every logged loss (one per step on both sides; Hugging Face's NaN filter is off); a run with a non-finite
  loss is FAILED whatever its speed.

The table goes to stdout; the call's record to --results (default bench/results/vs_hf.json; the smoke run's to
WORK/vs_hf_smoke.json): date, GPU, versions, ceiling, FLOPs per token, every run, and the ratios tunefile / the
fastest Hugging Face run that finished (and ZeRO-3 / DDP per GPU).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # the sibling bench scripts, also when this file is imported

from gpu_runs import DDP, PYTHON, TUNEFILE, ZERO3, device_name, ensure_inputs, sh, stop_running_launch  # noqa: E402
from nan_forensics import lognormal_data  # noqa: E402

WORKERS = BENCH / "vs_hf_workers.py"  # the Hugging Face run and the matmul ceiling, each in its own process
# The built-in zero3's settings as a user's JSON: tunefile keeps a frozen base whole only under the built-in preset,
# so this one stays partitioned (and is gathered a decoder layer at a time). Written into --work.
ZERO3_PARTITIONED = Path("zero3_partitioned.json")
ZERO3_PARTITIONED_CONFIG = {
    "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1_000_000_000,
                          "stage3_max_reuse_distance": 1_000_000_000,
                          "stage3_gather_16bit_weights_on_model_save": True},
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
}
# ... and as DeepSpeed gathers by default, one module at a time: a JSON that sets the granularity threshold is left
# to DeepSpeed (compiler/resolve/distribution.py), and 0 switches DeepSpeed's own grouping off.
ZERO3_PER_MODULE = Path("zero3_per_module.json")
ZERO3_PER_MODULE_CONFIG = {**ZERO3_PARTITIONED_CONFIG, "zero_optimization": {
    **ZERO3_PARTITIONED_CONFIG["zero_optimization"], "stage3_module_granularity_threshold": 0}}
Z_VARIANTS = {"partitioned": {"deepspeed": ZERO3_PARTITIONED.name}, "per-module": {"deepspeed": ZERO3_PER_MODULE.name},
              "zero2": {"deepspeed": "zero2"}}
LORA = {"r": 32, "alpha": 64, "dropout": 0.05}
GIB = 2**30


# --- what runs ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HfConfig:
    """One Hugging Face configuration: attention kernel, rows per micro-batch, how rows become a batch."""

    name: str
    attn: str = "sdpa"
    rows: int = 32
    collator: str = "flatten"  # flatten: DataCollatorWithFlattening; stack: equal rows; pad: pad to the longest
    gc: bool = False  # gradient checkpointing (non-reentrant)
    compile: bool = False  # TrainingArguments.torch_compile
    liger: bool = False  # TrainingArguments.use_liger_kernel
    timeout: float | None = None  # seconds; None: --timeout


@dataclass(frozen=True)
class Workload:
    name: str
    shape: str  # 1b | 8b | smoke (the tiny model of `tunefile tiny-model`)
    sequence_len: int
    fixed_length: bool  # every row exactly sequence_len tokens (else lognormal lengths)
    micro_batch: int  # tunefile's rows per micro-batch
    hf: tuple[HfConfig, ...]


WORKLOADS = {
    "A": Workload("A", "1b", 2048, False, 4, (HfConfig("hf-sdpa-flat32", rows=32),)),
    "B": Workload("B", "8b", 4096, True, 1, (HfConfig("hf-sdpa", rows=1, collator="stack"),)),
}
SMOKE_WORKLOADS = {
    "A": Workload("A", "smoke", 256, False, 2, (HfConfig("hf-sdpa-flat8", rows=8),)),
    "B": Workload("B", "smoke", 128, True, 1, (HfConfig("hf-sdpa", rows=1, collator="stack"),)),
}


@dataclass(frozen=True)
class TunefileRun:
    name: str
    workload: Workload
    extra: dict[str, Any] = field(default_factory=dict)  # config keys over the workload's
    gpus: int = 1
    label: str = ""  # the workload the record names: Z for the ZeRO-3 pair, else the workload's own name


def parse_hf_config(text: str) -> tuple[str | None, HfConfig]:
    """``[A:|B:]key=value,...`` → (its workload or None for both, the configuration)."""
    scope, text = split_scope(text)
    values: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        kind = HfConfig.__dataclass_fields__.get(key)
        if kind is None or not value:
            raise ValueError(f"--hf {text!r}: {item!r} is not key=value, key one of "
                             f"{', '.join(HfConfig.__dataclass_fields__)}")
        values[key] = (value in ("1", "true", "yes") if kind.type == "bool" else
                       int(value) if key == "rows" else float(value) if key == "timeout" else value)
    values.setdefault("name", "hf-" + "-".join(f"{k}{v}" for k, v in values.items()))
    if values.get("collator", "flatten") not in ("flatten", "stack", "pad"):
        raise ValueError(f"--hf {text!r}: collator is flatten, stack or pad")
    return scope, HfConfig(**values)


def parse_mapping(text: str, flag: str) -> dict[str, Any]:
    """YAML flow text, or ``@FILE`` for a YAML file: a mapping of config keys."""
    value = yaml.safe_load(Path(text[1:]).read_text(encoding="utf-8") if text.startswith("@") else text)
    if not isinstance(value, dict):
        raise ValueError(f"{flag} {text!r}: not a mapping of config keys")
    return value


def parse_extra(text: str) -> dict[str, Any]:
    """``KEY=YAML`` or ``@FILE``."""
    if text.startswith("@"):
        return parse_mapping(text, "--tunefile-extra")
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--tunefile-extra {text!r}: KEY=VALUE (VALUE in YAML) or @FILE")
    return {key: yaml.safe_load(value)}


def parse_variant(text: str) -> tuple[str | None, str, dict[str, Any]]:
    """``[A:|B:]NAME=MAPPING`` (YAML flow text or @FILE) → (workload or None, name, keys)."""
    scope, text = split_scope(text)
    name, sep, mapping = text.partition("=")
    if not sep or not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"--tunefile-variant {text!r}: NAME=MAPPING, e.g. gc='{{gradient_checkpointing: true}}'")
    return scope, name, parse_mapping(mapping, "--tunefile-variant")


def split_scope(text: str) -> tuple[str | None, str]:
    match = re.match(r"([AB]):(.*)", text, re.S)
    return (match.group(1), match.group(2)) if match else (None, text)


# --- inputs ---------------------------------------------------------------------------------------------------

def ensure_model(work: Path, shape: str) -> Path:
    """The model directory of ``shape``, made once (gpu_runs.ensure_inputs makes the Llama-shaped ones)."""
    if shape == "smoke":
        if not (work / "tiny-model" / "tokenizer.json").exists():
            subprocess.run([*TUNEFILE, "tiny-model", str(work / "tiny-model")], check=True)
        return work / "tiny-model"
    ensure_inputs(work, shape)
    return work / f"llama-{shape}"


def id_range(model_dir: Path) -> tuple[int, int]:
    """[low, high): above every special token of the tokenizer, below min(128,000, the vocabulary)."""
    added = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens", [])
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    low = 1 + max([t["id"] for t in added if t.get("special")] + [config.get("pad_token_id") or 0])
    return low, min(128_000, config["vocab_size"])


def rows_needed(workload: Workload, steps: int) -> int:
    """Enough rows that no run of ``steps`` steps starts a second epoch: the largest Hugging Face micro-batch, or
    tunefile's micro batch on 2 GPUs, each packed row holding up to sequence_len / 128 lognormal samples."""
    per_packed_row = 1 if workload.fixed_length else workload.sequence_len // 128
    return steps * max(2 * workload.micro_batch * per_packed_row, *(c.rows for c in workload.hf)) + 64


def ensure_data(work: Path, workload: Workload, rows: int, model_dir: Path) -> tuple[Path, list[int]]:
    """(the workload's pretokenized JSONL, its row lengths), written once per row count."""
    import numpy as np

    if workload.fixed_length:
        lengths = np.full(rows, workload.sequence_len)
        ids = np.random.default_rng(7).integers(0, 128_000, size=rows * workload.sequence_len)
    else:
        lengths, ids = lognormal_data(rows, 7, workload.sequence_len)  # the lengths of issue 10's repro
    low, high = id_range(model_dir)
    ids = low + ids % (high - low)
    path = work / "data" / f"{workload.name}-{workload.shape}-{rows}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        with path.open("w", encoding="utf-8") as out:
            for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
                out.write(json.dumps({"input_ids": ids[start:start + length].tolist()}) + "\n")
    return path, [int(n) for n in lengths]


# --- FLOPs ----------------------------------------------------------------------------------------------------

def flops_per_token(model_dir: Path, lengths: list[int], r: int) -> dict[str, float]:
    """The docstring's F = 4·N_frozen + 6·N_lora + 6·L·d·Σn²/Σn, from config.json and the data's lengths."""
    c = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    hidden, layers, inner = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, c.get("num_key_value_heads", heads) * head_dim
    linears = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, inner), (hidden, inner), (inner, hidden)]
    frozen = layers * sum(i * o for i, o in linears) + hidden * c["vocab_size"]
    lora = layers * sum(r * (i + o) for i, o in linears)
    attention = 6 * layers * q * sum(n * n for n in lengths) / sum(lengths)
    return {"n_frozen_matmul": frozen, "n_lora": lora, "attention": attention,
            "total": 4 * frozen + 6 * lora + attention}


# --- measuring ------------------------------------------------------------------------------------------------

class DeviceMemorySampler:
    """The peak memory.used of the given GPUs (the largest of them) as nvidia-smi reports it, sampled from a
    thread while a run runs."""

    def __init__(self, gpus: list[int], interval: float = 0.5) -> None:
        self.gpus, self.interval, self.peak_mib = gpus, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        query = ["nvidia-smi", f"--id={','.join(map(str, self.gpus))}", "--query-gpu=memory.used",
                 "--format=csv,noheader,nounits"]
        while not self._stop.wait(self.interval):
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
                self.peak_mib = max([self.peak_mib, *(float(v) for v in out.split() if v.strip())])
            except subprocess.TimeoutExpired:  # a busy driver: the next sample
                continue
            except (OSError, ValueError):  # no nvidia-smi, or output it cannot read: no figure rather than a wrong one
                self.peak_mib = 0.0
                return

    def __enter__(self) -> DeviceMemorySampler:
        if self.gpus:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def peak_gib(self) -> float | None:
        return round(self.peak_mib * 2**20 / GIB, 2) if self.peak_mib else None


def verdict(record: dict[str, Any], code: int, steps: int) -> dict[str, Any]:
    """ok, or why not: a timeout, an exit code, a non-finite loss (whatever the speed), missing steps."""
    losses = record["losses"]
    bad = next((i + 1 for i, loss in enumerate(losses) if loss is None or not math.isfinite(loss)), None)
    status = ("TIMEOUT" if code == 124 else f"FAILED (exit {code})" if code else
              f"FAILED (non-finite loss at logged step {bad})" if bad else
              f"FAILED ({len(losses)} of {steps} losses logged)" if len(losses) < steps else "ok")
    if bad and code:
        status += f", non-finite loss at logged step {bad}"
    return record | {"ok": status == "ok", "status": status}


def harmonic_mean(rates: list[float]) -> float | None:
    return len(rates) / sum(1 / r for r in rates) if rates and all(r > 0 for r in rates) else None


def log_tail(log: Path, lines: int = 20) -> list[str]:
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    return text.splitlines()[-lines:]


# --- the tunefile side ----------------------------------------------------------------------------------------

def tunefile_config(run: TunefileRun, data: Path, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    workload = run.workload
    values: dict[str, Any] = {
        "base_model": model_dir.name,
        "datasets": [{"path": str(data.relative_to(args.work)), "type": "pretokenized"}],
        "dataset_prepared_path": f"prepared-{workload.name}-{workload.shape}",
        "output_dir": f"runs/{run.name}",
        "sequence_len": workload.sequence_len,
        "sample_packing": not workload.fixed_length,
        "micro_batch_size": workload.micro_batch,
        "gradient_accumulation_steps": 1,
        "max_steps": args.steps,
        "adapter": "lora", "lora_r": LORA["r"], "lora_alpha": LORA["alpha"], "lora_dropout": LORA["dropout"],
        "lora_target_linear": True,
        "learning_rate": args.learning_rate, "lr_scheduler": "cosine", "warmup_steps": 5,
        "optimizer": "adamw_torch" if args.smoke else "adamw_torch_fused",
        "bf16": "auto" if args.smoke else True,
        "logging_steps": 1,
        "save_steps": 100_000,  # no checkpoint inside the measured steps
        "seed": 42,
    }
    return values | args.extra | run.extra


def read_run(output_dir: Path, *, warmup: int) -> dict[str, Any]:
    """What a tunefile run left in OUTPUT_DIR: metrics.jsonl's steps (the rate over steps after WARMUP, the peak
    memory, every loss and gradient norm, the runtime decisions) and train_summary.json's time to first step."""
    metrics_file = output_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if metrics_file.exists() else []
    steps = [r for r in records if "loss" in r]
    peaks = [r["peak_memory_gib"] for r in records if "peak_memory_gib" in r]
    summary_file = output_dir / "train_summary.json"
    return {"steps_done": steps[-1]["step"] if steps else 0,
            "tokens_per_s": harmonic_mean([r["tokens_per_s"] for r in steps if r["step"] > warmup]),
            "peak_allocated_gib": max(peaks) if peaks else None, "losses": [r["loss"] for r in steps],
            "grad_norms": [r.get("grad_norm") for r in steps],
            "runtime_decisions": next((r["runtime_decisions"] for r in records if "runtime_decisions" in r), None),
            "startup": json.loads(summary_file.read_text(encoding="utf-8")).get("startup")
            if summary_file.exists() else None}


def run_tunefile(run: TunefileRun, data: Path, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    work, log = args.work, args.work / "logs" / f"{run.workload.name}-{run.name}.log"
    log.write_text("", encoding="utf-8")
    config = work / f"{run.name}.yml"
    config.write_text(yaml.safe_dump(tunefile_config(run, data, model_dir, args), sort_keys=False), encoding="utf-8")
    output_dir = work / "runs" / run.name
    subprocess.run(["rm", "-rf", str(output_dir)], check=True)
    record: dict[str, Any] = {"workload": run.label or run.workload.name, "side": "tunefile", "name": run.name,
                              "gpus": run.gpus, "config": args.extra | run.extra, "losses": []}
    code, _ = sh([*TUNEFILE, "compile", config.name, "--target", "detect", "--gpus-per-node", str(run.gpus),
                  "--output", f"bundles/{run.name}", "--force"], cwd=work, log=log)
    if code:
        return record | {"ok": False, "status": f"FAILED (compile, exit {code})", "log_tail": log_tail(log)}
    env = {"PYTHONUNBUFFERED": "1", "MASTER_PORT": str(29500 + len(run.name) + 10 * run.gpus)}
    gpus = list(range(run.gpus)) if args.device == "cuda" else []
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    with DeviceMemorySampler(gpus) as sampler:
        code, wall = sh(["bash", str(work / "bundles" / run.name / "launch.sh")], cwd=work, env=env, log=log,
                        timeout=args.timeout)
    measured = read_run(output_dir, warmup=args.warmup)
    rate = measured["tokens_per_s"]
    record |= {"wall_s": round(wall, 1), **measured, "tokens_per_s_per_gpu": rate / run.gpus if rate else None,
               "peak_reserved_gib": None, "device_used_gib": sampler.peak_gib}
    record = verdict(record, code, args.steps)
    return record if record["ok"] else record | {"log_tail": log_tail(log)}


# --- the Hugging Face side ------------------------------------------------------------------------------------

def run_hf(workload: Workload, config: HfConfig, data: Path, model_dir: Path,
           args: argparse.Namespace) -> dict[str, Any]:
    log = args.work / "logs" / f"{workload.name}-{config.name}.log"
    log.write_text("", encoding="utf-8")
    steps_file = args.work / "runs" / f"{workload.name}-{config.name}.steps.jsonl"
    steps_file.parent.mkdir(parents=True, exist_ok=True)
    steps_file.write_text("", encoding="utf-8")
    spec = {"model_dir": str(model_dir), "data": str(data), "device": args.device, "steps": args.steps,
            "learning_rate": args.learning_rate, "steps_file": str(steps_file), "config": asdict(config),
            "output_dir": str(args.work / "runs" / f"hf-{workload.name}-{config.name}")}
    spec_file = steps_file.with_suffix(".spec.json")
    spec_file.write_text(json.dumps(spec), encoding="utf-8")
    gpus = [0] if args.device == "cuda" else []
    env = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"} | ({"CUDA_VISIBLE_DEVICES": "0"} if gpus else {})
    with DeviceMemorySampler(gpus) as sampler:
        code, wall = sh([PYTHON, str(WORKERS), "hf", str(spec_file)], cwd=args.work, env=env, log=log,
                        timeout=config.timeout or args.timeout)
    lines = [json.loads(line) for line in steps_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    ends = {r["step"]: r for r in lines if "t" in r}
    losses = [r["loss"] for r in lines if "loss" in r]
    rate = None
    done = max(ends, default=0)
    if done > args.warmup:
        tokens = sum(ends[s]["tokens"] for s in range(args.warmup + 1, done + 1))
        rate = tokens / (ends[done]["t"] - ends[args.warmup]["t"])
    summary = next((r for r in lines if r.get("done")), {})
    record = {"workload": workload.name, "side": "hf", "name": config.name, "gpus": 1, "config": asdict(config),
              "wall_s": round(wall, 1), "steps_done": done, "tokens_per_s": rate, "tokens_per_s_per_gpu": rate,
              "peak_allocated_gib": max((r["allocated_gib"] for r in ends.values() if "allocated_gib" in r),
                                        default=None),
              "peak_reserved_gib": max((r["reserved_gib"] for r in ends.values() if "reserved_gib" in r), default=None),
              "device_used_gib": sampler.peak_gib, "losses": losses,
              "grad_norms": [r.get("grad_norm") for r in lines if "loss" in r],
              "trainable_parameters": summary.get("trainable"), "parameters": summary.get("total")}
    record = verdict(record, code, args.steps)
    return record if record["ok"] else record | {"log_tail": log_tail(log)}


# --- the matmul ceiling ---------------------------------------------------------------------------------------

def measure_ceiling(args: argparse.Namespace) -> dict[str, Any]:
    out, log = args.work / "ceiling.json", args.work / "logs" / "ceiling.log"
    env = {"CUDA_VISIBLE_DEVICES": "0"} if args.device == "cuda" else {}
    code, _ = sh([PYTHON, str(WORKERS), "ceiling", str(out), args.device], cwd=args.work, env=env, log=log,
                 timeout=300)
    return json.loads(out.read_text(encoding="utf-8")) if code == 0 else {"tflops": None, "error": log_tail(log)}


# --- the machine ------------------------------------------------------------------------------------------------

def byte_compile_installed() -> dict[str, Any] | None:
    """Where PYTHONDONTWRITEBYTECODE is set (the lent GPU machines set it), write the .pyc files of the installed
    packages, as `pip install` does: else every run compiles torch, transformers and the rest from source, some 6 s
    of each launch seen on an H200 machine, and time to first step measures the machine's setting instead. The
    bundle's runtime archive is left as it is: zipimport compiles it in every launch, on every cluster."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE"):
        return None
    import torch

    folders = [os.path.dirname(os.path.dirname(torch.__file__))]
    folders += [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if os.path.isdir(entry)]
    started = time.perf_counter()
    subprocess.run([PYTHON, "-m", "compileall", "-q", "-j", "0", *folders], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    return {"folders": folders, "seconds": round(time.perf_counter() - started, 1)}


# --- the report -----------------------------------------------------------------------------------------------

def add_mfu(record: dict[str, Any], flops: dict[str, float], ceiling: float | None) -> dict[str, Any]:
    """The record with its model FLOPs per token and MFU (the docstring's formula) against ``ceiling`` TFLOP/s."""
    rate = record.get("tokens_per_s_per_gpu")
    mfu = round(flops["total"] * rate / (ceiling * 1e12), 4) if rate and ceiling else None
    return record | {"flops_per_token": flops["total"], "mfu": mfu}


def ratios(records: list[dict[str, Any]]) -> dict[str, Any]:
    """tunefile / the fastest Hugging Face run that finished, per workload; ZeRO-3 / DDP per GPU."""
    out: dict[str, Any] = {}
    for workload in sorted({r["workload"] for r in records if r["workload"] != "Z"}):
        hf = [r for r in records if r["workload"] == workload and r["side"] == "hf" and r["ok"]]
        best = max(hf, key=lambda r: r["tokens_per_s"] or 0, default=None)
        if best is None or not best["tokens_per_s"]:
            out[workload] = {"best_hf": None}
            continue
        out[workload] = {"best_hf": best["name"], "tunefile": {
            r["name"]: {"tokens_per_s": round(r["tokens_per_s"] / best["tokens_per_s"], 3),
                        "peak_allocated": round(r["peak_allocated_gib"] / best["peak_allocated_gib"], 3)
                        if r["peak_allocated_gib"] and best["peak_allocated_gib"] else None}
            for r in records if r["workload"] == workload and r["side"] == "tunefile" and r["ok"]}}
    z = {r["name"]: r for r in records if r["workload"] == "Z" and r["ok"]}
    for shape in ("1b", "8b"):
        ddp = z.get(f"z-{shape}-ddp")
        for kind in ("zero3", "partitioned", "per-module", "zero2"):
            zero3 = z.get(f"z-{shape}-{kind}")
            if ddp and zero3 and ddp["tokens_per_s_per_gpu"] and zero3["tokens_per_s_per_gpu"]:
                out.setdefault("Z", {})[f"{shape} {kind}/ddp per GPU"] = round(
                    zero3["tokens_per_s_per_gpu"] / ddp["tokens_per_s_per_gpu"], 3)
    return out


def table(records: list[dict[str, Any]]) -> str:
    def number(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    head = (f"{'wl':3} {'side':8} {'run':22} {'status':26} {'tok/s':>9} {'tok/s/gpu':>9} {'MFU':>6} "
            f"{'alloc GiB':>9} {'resv GiB':>8} {'smi GiB':>7} {'steps':>5} {'loss first→last':>17} {'1st step s':>10}")
    lines = [head, "-" * len(head)]
    for r in records:
        losses = r.get("losses") or []
        loss = f"{losses[0]:.4g}→{losses[-1]:.4g}" if losses else "-"
        lines.append(f"{r['workload']:3} {r['side']:8} {r['name'][:22]:22} {r['status'][:26]:26} "
                     f"{number(r.get('tokens_per_s')):>9} {number(r.get('tokens_per_s_per_gpu')):>9} "
                     f"{number(100 * r['mfu'] if r.get('mfu') is not None else None, 1):>6} "
                     f"{number(r.get('peak_allocated_gib'), 1):>9} {number(r.get('peak_reserved_gib'), 1):>8} "
                     f"{number(r.get('device_used_gib'), 1):>7} {r.get('steps_done', 0):>5} {loss:>17} "
                     f"{number((r.get('startup') or {}).get('seconds_to_first_step'), 1):>10}")
    return "\n".join(lines)


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for package in ("torch", "transformers", "peft", "accelerate", "tunefile", "deepspeed", "liger-kernel",
                    "cut-cross-entropy", "flash-attn"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


# --- the call -------------------------------------------------------------------------------------------------

def plan_runs(args: argparse.Namespace) -> tuple[list[Workload], list[TunefileRun]]:
    """The workloads A and B asked for, each with its Hugging Face configurations; and the tunefile runs: per
    workload the base run and the variants, then Z's pairs (on A's and B's data) when Z is asked for."""
    catalogue = SMOKE_WORKLOADS if args.smoke else WORKLOADS
    workloads = []
    for name in ("A", "B"):
        workload = catalogue[name]
        if name == "A" and args.micro_batch:
            workload = replace(workload, micro_batch=args.micro_batch)
        extra_hf = tuple(config for scope, config in args.hf if scope in (None, name))
        workloads.append(replace(workload, hf=workload.hf + extra_hf))
    runs = []
    for workload in workloads:
        if workload.name in args.workloads:
            if not args.skip_base:
                runs.append(TunefileRun(f"tf-{workload.name}-mb{workload.micro_batch}", workload))
            runs += [TunefileRun(f"tf-{workload.name}-{name}", workload, extra) for scope, name, extra in args.variants
                     if scope in (None, workload.name)]
    if "Z" in args.workloads and not args.smoke:
        for w in (w for w in workloads if w.shape in args.z_shapes):
            runs += [TunefileRun(f"z-{w.shape}-{kind}", w, Z_VARIANTS[kind], gpus=2, label="Z")
                     for kind, shapes in args.z_variants if w.shape in shapes]
            runs += [TunefileRun(f"z-{w.shape}-{kind}", w, dist, gpus=2, label="Z")
                     for kind, dist in (("ddp", DDP), ("zero3", ZERO3))]
    return [w for w in workloads if w.name in args.workloads], runs


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunefile-vs-hf"))
    parser.add_argument("--results", type=Path, default=None,
                        help="default bench/results/vs_hf.json; with --smoke WORK/vs_hf_smoke.json")
    parser.add_argument("--workloads", default="A,B,Z", help="comma-separated: A, B, Z (Z runs with 2 GPUs or more)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 60; smoke 6)")
    parser.add_argument("--warmup", type=int, default=None, help="first steps left out of the rate (10; smoke 2)")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run (default 900; smoke 300)")
    parser.add_argument("--micro-batch", type=int, default=None, help="tunefile's micro batch for A (default 4)")
    parser.add_argument("--hf", action="append", default=[], metavar="[A:|B:]KEY=VALUE,...",
                        help="one more Hugging Face configuration; keys: " + ", ".join(HfConfig.__dataclass_fields__))
    parser.add_argument("--tunefile-extra", action="append", default=[], metavar="KEY=YAML|@FILE",
                        help="config keys for every tunefile run")
    parser.add_argument("--tunefile-variant", action="append", default=[], metavar="[A:|B:]NAME=MAPPING|@FILE",
                        help="one more tunefile run: the workload's config plus these keys")
    parser.add_argument("--z-shapes", default="1b,8b", help="the shapes Z runs (comma-separated: 1b, 8b)")
    parser.add_argument("--z-variant", action="append", default=[], metavar="KIND=SHAPES",
                        help=f"one more Z run per shape (1b, 8b, comma-separated); KIND: {', '.join(Z_VARIANTS)}")
    parser.add_argument("--skip-base", action="store_true",
                        help="run only the --tunefile-variant runs, not tunefile's defaults (saves device time)")
    parser.add_argument("--smoke", action="store_true", help="the tiny model on the CPU, a few steps")
    args = parser.parse_args()
    try:
        args.hf = [parse_hf_config(text) for text in args.hf]
        args.extra = {k: v for text in args.tunefile_extra for k, v in parse_extra(text).items()}
        args.variants = [parse_variant(text) for text in args.tunefile_variant]
    except (ValueError, OSError, yaml.YAMLError) as exc:
        parser.error(str(exc))
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.z_shapes = {shape.strip() for shape in args.z_shapes.split(",") if shape.strip()}
    if not args.z_shapes or args.z_shapes - {"1b", "8b"}:
        parser.error(f"--z-shapes: 1b, 8b or both, not {args.z_shapes}")
    args.z_variants = []
    for text in args.z_variant:
        kind, _, shapes = text.partition("=")
        wanted = {shape.strip() for shape in shapes.split(",") if shape.strip()}
        if kind not in Z_VARIANTS or not wanted or wanted - {"1b", "8b"}:
            parser.error(f"--z-variant: KIND=SHAPES with KIND one of {', '.join(Z_VARIANTS)} and shapes 1b, 8b; "
                         f"not {text!r}")
        args.z_variants.append((kind, wanted))
    if set(args.workloads) - {"A", "B", "Z"}:
        parser.error(f"--workloads: A, B or Z, not {args.workloads}")
    args.steps = args.steps or (6 if args.smoke else 60)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.smoke else 10)
    if not 1 <= args.warmup < args.steps:
        parser.error("--warmup: at least 1 (the rate starts at a step's end) and fewer than --steps")
    args.timeout = args.timeout or (300 if args.smoke else 900)
    args.gpu = device_name()
    args.device = "cpu" if args.smoke else "cuda"
    if not args.smoke and args.gpu == "cpu":
        parser.error("no GPU here (nvidia-smi found none); --smoke runs the tiny model on the CPU")
    args.gpu_count = len(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.splitlines()) \
        if args.gpu != "cpu" else 0
    args.work = args.work.resolve()
    args.results = args.results or (args.work / "vs_hf_smoke.json" if args.smoke else BENCH / "results" / "vs_hf.json")
    return args


def run_all(args: argparse.Namespace, ceiling: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(every run's record, the FLOPs per token of each workload): A's runs, B's, then Z's."""
    workloads, tunefile_runs = plan_runs(args)
    inputs: dict[str, tuple[Path, Path, dict[str, float]]] = {}
    records: list[dict[str, Any]] = []

    def prepare(workload: Workload) -> tuple[Path, Path, dict[str, float]]:
        """(data, model directory, FLOPs per token) of a workload, made once."""
        if workload.name not in inputs:
            model_dir = ensure_model(args.work, workload.shape)
            data, lengths = ensure_data(args.work, workload, rows_needed(workload, args.steps), model_dir)
            inputs[workload.name] = data, model_dir, flops_per_token(model_dir, lengths, LORA["r"])
        return inputs[workload.name]

    def report(record: dict[str, Any], flops: dict[str, float]) -> None:
        records.append(add_mfu(record, flops, ceiling.get("tflops")))
        print(json.dumps({k: v for k, v in records[-1].items() if k not in ("losses", "grad_norms")}), flush=True)

    for workload in workloads:
        data, model_dir, flops = prepare(workload)
        for config in workload.hf:
            print(f"== {workload.name} hf {config.name}", flush=True)
            report(run_hf(workload, config, data, model_dir, args), flops)
        for run in (run for run in tunefile_runs if run.workload.name == workload.name and not run.label):
            print(f"== {workload.name} tunefile {run.name}", flush=True)
            report(run_tunefile(run, data, model_dir, args), flops)
    for run in (run for run in tunefile_runs if run.label == "Z" and run.gpus <= args.gpu_count):
        print(f"== Z tunefile {run.name}", flush=True)
        data, model_dir, flops = prepare(run.workload)
        report(run_tunefile(run, data, model_dir, args), flops)
    return records, {name: flops for name, (_, _, flops) in inputs.items()}


def main() -> int:
    args = parse_arguments()
    signal.signal(signal.SIGTERM, stop_running_launch)
    (args.work / "logs").mkdir(parents=True, exist_ok=True)
    for name, config in ((ZERO3_PARTITIONED, ZERO3_PARTITIONED_CONFIG), (ZERO3_PER_MODULE, ZERO3_PER_MODULE_CONFIG)):
        (args.work / name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    byte_compiled = None if args.smoke else byte_compile_installed()
    if byte_compiled:
        print(f"byte-compiled the installed packages (PYTHONDONTWRITEBYTECODE is set): {byte_compiled}", flush=True)
    ceiling = measure_ceiling(args)
    print(f"matmul ceiling: {ceiling}", flush=True)
    records, flops = run_all(args, ceiling)
    z_skipped = "Z" in args.workloads and not args.smoke and args.gpu_count < 2
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": args.gpu, "gpu_count": args.gpu_count, "versions": versions(), "smoke": args.smoke,
        "settings": {"steps": args.steps, "warmup_steps_excluded": args.warmup, "learning_rate": args.learning_rate,
                     "lora": LORA, "tunefile_extra": args.extra, "byte_compiled": byte_compiled,
                     "workload_z_skipped": f"Z needs 2 GPUs, this machine has {args.gpu_count}" if z_skipped else None},
        "matmul_ceiling": ceiling, "flops_per_token": flops, "runs": records, "ratios": ratios(records),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(table(records))
    print(json.dumps({"ratios": result["ratios"], "matmul_ceiling_tflops": ceiling.get("tflops")}, indent=1))
    for r in records:
        if not r["ok"]:
            print(f"--- {r['workload']} {r['name']}: {r['status']}\n" + "\n".join(r.get("log_tail", [])))
    print(f"results: {args.results}")
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
