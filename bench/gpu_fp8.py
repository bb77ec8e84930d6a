"""FP8 against bf16 on one GPU: the same full fine-tune, compiled and launched as a user's job is, once with
`fp8: true` (torchao's float8 linear layers, runtime/fp8.py) and once without.

    python bench/gpu_fp8.py --work /tmp/fp8 --results bench/results/gpu_fp8.json [--steps 30] [--timeout 240]

Needs a GPU of compute capability 8.9 or newer (the compiler targets it with `--target detect`), torchao, and no
network. The model is a random Llama of Llama 3.1 8B's layer width (hidden 4096, intermediate 14336) with 4 layers
and the tiny tokenizer's vocabulary, so the matmuls are large enough for float8 to matter and the output head,
which stays in bf16, is small; the data is bench/synthetic_data.py's. Each launch runs under its own timeout and is
killed with its process group when it overruns.

Writes --results: per-step losses of both runs (all must be finite), their tokens/s (median over the logged steps
after the first --warmup), peak GPU memory, and the fp8 run's runtime decisions: how many linear layers computed
in float8 (Float8Linear) and which stayed in bf16. Exits 1 when a run failed, a loss was not finite, or the fp8
run had no float8 layers.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from gpu_runs import BENCH, PYTHON, TUNEFILE, device_name, sh, stop_running_launch

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
             num_key_value_heads=8)
# Per layer: q, k, v, o, gate, up, down; the first (layer 0's q_proj) and the output head stay in bf16 (fp8.py).
EXPECTED_FLOAT8_LAYERS = 7 * SHAPE["num_hidden_layers"] - 1


def make_model(out: Path) -> None:
    """The random wide Llama with the tiny tokenizer, saved in bf16 (run in a child process: its GPU memory goes
    with it)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(out.parent / "tiny-model")
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **SHAPE)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters → {out}")


def ensure_inputs(work: Path) -> None:
    if not (work / "tiny-model" / "tokenizer.json").exists():
        subprocess.run([*TUNEFILE, "tiny-model", str(work / "tiny-model")], check=True)
    if not (work / "wide-model" / "config.json").exists():
        subprocess.run([PYTHON, __file__, "--make-model", str(work / "wide-model")], check=True)
    data = work / "data" / "synthetic.jsonl"
    if not data.exists():
        subprocess.run([PYTHON, str(BENCH / "synthetic_data.py"), str(data), "--rows", "2000"], check=True)


def config(name: str, steps: int, *, fp8: bool) -> dict[str, Any]:
    values: dict[str, Any] = {
        "base_model": "wide-model",
        "datasets": [{"path": "data/synthetic.jsonl", "type": "alpaca"}],
        "dataset_prepared_path": "prepared",
        "output_dir": f"runs/{name}",
        "sample_packing": True,
        "sequence_len": 2048,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "optimizer": "adamw_torch_fused",
        "lr_scheduler": "constant_with_warmup",
        "learning_rate": 1e-4,
        "warmup_steps": 3,
        "bf16": True,
        "tf32": True,
        "logging_steps": 1,
        "seed": 42,
    }
    return values | ({"fp8": True} if fp8 else {})


def execute(work: Path, name: str, steps: int, *, fp8: bool, timeout: float, warmup: int) -> dict[str, Any]:
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("", encoding="utf-8")
    (work / f"{name}.yml").write_text(yaml.safe_dump(config(name, steps, fp8=fp8), sort_keys=False),
                                      encoding="utf-8")
    output_dir = work / "runs" / name
    subprocess.run(["rm", "-rf", str(output_dir)], check=True)
    result: dict[str, Any] = {"run": name, "fp8": fp8, "steps": steps}
    code, _ = sh([*TUNEFILE, "compile", f"{name}.yml", "--target", "detect", "--gpus-per-node", "1", "--output",
                  f"bundles/{name}", "--force"], cwd=work, log=log)
    if code:
        return result | {"ok": False, "failed_at": "compile", "log_tail": tail(log)}
    code, wall = sh(["bash", str(work / "bundles" / name / "launch.sh")], cwd=work, log=log, timeout=timeout,
                    env={"CUDA_VISIBLE_DEVICES": "0", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
    result["wall_s"] = round(wall, 1)
    if code:
        return result | {"ok": False, "failed_at": "train" if code != 124 else "timeout", "exit_code": code,
                         "log_tail": tail(log)}
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    steps_logged = [r for r in records if "loss" in r]
    speeds = [r["tokens_per_s"] for r in steps_logged[warmup:]]
    summary = json.loads((output_dir / "train_summary.json").read_text(encoding="utf-8"))
    losses = [r["loss"] for r in steps_logged]
    return result | {
        "ok": True,
        "losses": losses,
        "all_losses_finite": len(losses) == steps and all(math.isfinite(loss) for loss in losses),
        "tokens_per_s": round(statistics.median(speeds)) if speeds else None,
        "peak_memory_gib": max((r.get("peak_memory_gib", 0) for r in records), default=None),
        "fp8_decisions": summary["runtime_decisions"].get("fp8"),
        "final_model_saved": any(output_dir.glob("*.safetensors")),
    }


def tail(log: Path, lines: int = 30) -> list[str]:
    return log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "torchao", "accelerate", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunefile-gpu-fp8"))
    parser.add_argument("--results", type=Path, default=BENCH / "results" / "gpu_fp8.json")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="logged steps left out of the tokens/s median")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per launch before it is killed")
    parser.add_argument("--make-model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_model:
        make_model(args.make_model)
        return 0
    signal.signal(signal.SIGTERM, stop_running_launch)
    args.work.mkdir(parents=True, exist_ok=True)
    ensure_inputs(args.work)
    runs = {}
    for name, fp8 in (("bf16", False), ("fp8", True)):
        print(f"== {name}", flush=True)
        runs[name] = execute(args.work, name, args.steps, fp8=fp8, timeout=args.timeout, warmup=args.warmup)
        print(json.dumps({k: v for k, v in runs[name].items() if k != "losses"}), flush=True)
    bf16, fp8 = runs["bf16"], runs["fp8"]
    decisions = fp8.get("fp8_decisions") or {}
    checks = {
        "both_runs_finished": bf16["ok"] and fp8["ok"],
        "all_losses_finite": bool(bf16.get("all_losses_finite") and fp8.get("all_losses_finite")),
        "float8_layers_active": bool(decisions.get("enabled")) and decisions.get("float8_layers", 0) > 0,
        "float8_layers_as_expected": decisions.get("float8_layers") == EXPECTED_FLOAT8_LAYERS,
    }
    speedup = (fp8["tokens_per_s"] / bf16["tokens_per_s"]) if fp8.get("tokens_per_s") and bf16.get(
        "tokens_per_s") else None
    result = {"device": device_name(), "versions": versions(), "shape": SHAPE, "steps": args.steps,
              "runs": runs, "fp8_over_bf16_tokens_per_s": round(speedup, 3) if speedup else None,
              "checks": checks, "ok": all(checks.values())}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{'run':5} {'ok':3} {'tok/s':>9} {'peak GiB':>8} {'loss first→last':>18} {'float8 layers':>13}")
    for name, r in runs.items():
        losses = r.get("losses") or []
        loss = f"{losses[0]:.4f}→{losses[-1]:.4f}" if losses else r.get("failed_at", "-")
        layers = (r.get("fp8_decisions") or {}).get("float8_layers", "-")
        print(f"{name:5} {'yes' if r['ok'] else 'NO':3} {r.get('tokens_per_s') or '-':>9} "
              f"{r.get('peak_memory_gib') or '-':>8} {loss:>18} {layers!s:>13}")
    print(f"fp8/bf16 tokens/s: {speedup:.3f}" if speedup else "fp8/bf16 tokens/s: -", "checks:", checks)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
