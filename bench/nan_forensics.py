"""Where does a packed LoRA run turn NaN? A step-by-step replay of the runtime's maths with probes.

    python bench/nan_forensics.py prepare --work W          # tokenizer, random 1B Llama, lognormal data
    python bench/nan_forensics.py replay --work W [--packing torch_varlen|block_mask] [--steps N] ...

The workload is the one issue 10 measured: a random Llama-3.2-1B-shaped model, LoRA r=32 α=64 dropout 0.05
on every linear layer, `pretokenized` rows of random ids whose lengths follow
``min(2048, max(16, int(exp(5.3 + 0.7·z))))``, sequence_len 2048, packing, micro batch 4, lr 2e-4 cosine,
2 warm-up steps, fused AdamW, bf16 autocast. ``replay`` plans and collates batches with the runtime's own
functions (plan_batches, collate, packing_forward_kwargs, token_loss_sum) and trains in a bare loop, checking
the loss and the gradient of every step. At the first non-finite value it reports the step, the rows and their
segment lengths, the first module whose forward output is non-finite (or, when the forward is finite, the
parameters whose gradients are), and replays that batch under the other packing mode and on fresh weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
DEVICE_TYPE = "cuda"  # replay sets it to "cpu" for a dry run on a machine without a GPU


def lognormal_data(rows: int, seed: int, sequence_len: int) -> tuple[Any, Any]:
    """(lengths, ids of all rows back to back): lengths ``min(L, max(16, int(exp(5.3 + 0.7·z))))``, ids uniform
    below 128,000, from one numpy generator."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.minimum(sequence_len, np.maximum(16, np.exp(5.3 + 0.7 * rng.standard_normal(rows)).astype(np.int64)))
    return lengths, rng.integers(0, 128000, size=int(lengths.sum()))


def pad_first_steps(lengths: Any, ids: Any, *, pad_id: int, micro_batch_size: int, sequence_len: int,
                    steps: int) -> list[int]:
    """The optimizer steps (1-based; seed 42, one GPU, packing) whose micro-batches hold an example that begins
    with the pad id: the trigger of issue 10's NaN."""
    import numpy as np

    from tunefile.runtime.data.batching import plan_batches

    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pad_first = set(np.nonzero(ids[starts] == pad_id)[0].tolist())
    plan = plan_batches(lengths, micro_batch_size=micro_batch_size, sequence_len=sequence_len, sample_packing=True,
                        seed=42, epoch=0)
    return [s + 1 for s, mb in enumerate(plan[:steps]) if any(i in pad_first for row in mb for i in row)]


def prepare(work: Path, rows: int, sequence_len: int, shape: str, data_seed: int) -> None:
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "tiny-model" / "tokenizer.json").exists():
        subprocess.run([sys.executable, "-m", "tunefile.runtime", "tiny-model", str(work / "tiny-model")], check=True)
    if not (work / "llama-1b" / "config.json").exists():
        subprocess.run([sys.executable, str(BENCH / "llama_shaped_model.py"), str(work / "tiny-model"),
                        str(work / "llama-1b"), "--shape", shape], check=True)
    data = work / "lognormal.jsonl"
    lengths, ids = lognormal_data(rows, data_seed, sequence_len)
    if not data.exists():
        with data.open("w", encoding="utf-8") as out:
            at = 0
            for length in lengths.tolist():
                out.write(json.dumps({"input_ids": ids[at:at + length].tolist()}) + "\n")
                at += length
    from transformers import AutoTokenizer

    pad = AutoTokenizer.from_pretrained(work / "tiny-model").pad_token_id
    for micro_batch_size in (4, 8):
        found = pad_first_steps(lengths, ids, pad_id=pad, micro_batch_size=micro_batch_size,
                                sequence_len=sequence_len, steps=200)
        print(f"data seed {data_seed}: micro batch {micro_batch_size}: steps holding an example that begins with "
              f"the pad id ({pad}): {found}")
    print(f"inputs in {work}")


def nonfinite(t: Any) -> bool:
    import torch

    return isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())


def first_nonfinite_forward(model: Any, inputs: dict[str, Any]) -> str | None:
    """The first module (in execution order) whose output holds a non-finite value."""
    import torch

    found: list[str] = []
    hooks = []

    def hook_for(name: str):
        def hook(module: Any, args: Any, output: Any) -> None:
            outs = output if isinstance(output, tuple) else (output,)
            if not found and any(nonfinite(o) for o in outs):
                inputs_bad = any(nonfinite(a) for a in (args if isinstance(args, tuple) else (args,)))
                found.append(f"{name} ({type(module).__name__}; input already non-finite: {inputs_bad})")
        return hook

    for name, module in model.named_modules():
        hooks.append(module.register_forward_hook(hook_for(name)))
    try:
        with torch.no_grad(), torch.autocast(DEVICE_TYPE, dtype=torch.bfloat16, enabled=DEVICE_TYPE == "cuda"):
            model(**inputs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else None


def replay(args: argparse.Namespace) -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunefile.runtime import attention
    from tunefile.runtime.data.batching import collate, plan_batches
    from tunefile.runtime.losses import token_loss_sum
    from tunefile.runtime.optim import lr_multiplier

    work = args.work
    rows = [json.loads(line) for line in (work / "lognormal.jsonl").read_text(encoding="utf-8").splitlines()]
    examples = [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in rows]
    lengths = [len(r["input_ids"]) for r in rows]
    plan = plan_batches(lengths, micro_batch_size=args.micro_batch_size, sequence_len=args.sequence_len,
                        sample_packing=True, seed=42, epoch=0)
    global DEVICE_TYPE
    DEVICE_TYPE = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(DEVICE_TYPE)

    def fresh_model(attn: str) -> Any:
        model = AutoModelForCausalLM.from_pretrained(work / "llama-1b", attn_implementation=attn,
                                                     dtype=torch.bfloat16 if DEVICE_TYPE == "cuda" else torch.float32)
        model.config.use_cache = False
        config = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules="all-linear", bias="none",
                            task_type="CAUSAL_LM")
        return get_peft_model(model, config).to(device)

    def mode_and_attn(packing: str) -> tuple[str, str]:
        if packing == "torch_varlen":
            return "torch_varlen", attention.register_torch_varlen()
        return "block_mask", "sdpa"

    def forward_inputs(micro_batch: list[list[int]], packing: str, attn: str) -> tuple[dict[str, Any], Any]:
        batch = collate(examples, micro_batch, pad_token_id=0, sequence_len=args.sequence_len,
                        pad_to_sequence_len=False, packed=True)
        batch = {k: v.to(device) for k, v in batch.items()}
        extra = attention.packing_forward_kwargs(packing, batch["position_ids"], attn_implementation=attn,
                                                 dtype=torch.bfloat16)
        inputs = {k: v for k, v in batch.items() if k != "labels"} | extra
        return inputs, batch["labels"]

    def loss_and_grads(model: Any, micro_batch: list[list[int]], packing: str, attn: str) -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        inputs, labels = forward_inputs(micro_batch, packing, attn)
        with torch.autocast(DEVICE_TYPE, dtype=torch.bfloat16, enabled=DEVICE_TYPE == "cuda"):
            logits = model(**inputs, use_cache=False).logits
        loss_sum, count = token_loss_sum(logits, labels)
        (loss_sum / count.clamp(min=1)).backward()
        params = [p for p in model.parameters() if p.requires_grad]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        return float(loss_sum / count.clamp(min=1)), float(norm)

    def probe(model: Any, micro_batch: list[list[int]]) -> dict[str, Any]:
        """The failing batch again: under the other packing mode, row by row, and on fresh weights."""
        other = "block_mask" if packing == "torch_varlen" else "torch_varlen"
        other_mode, other_attn = mode_and_attn(other)
        probes = {
            f"same_weights_{other}": lambda: loss_and_grads(model, micro_batch, other_mode, other_attn),
            "same_weights_per_row": lambda: [loss_and_grads(model, [row], packing, attn) for row in micro_batch],
            "fresh_weights_same_mode": lambda: loss_and_grads(fresh_model(attn), micro_batch, packing, attn),
        }
        found: dict[str, Any] = {}
        for name, run in probes.items():
            model.base_model.model.config._attn_implementation = other_attn if other in name else attn
            try:
                found[name] = run()
            except Exception as exc:  # a probe that cannot run here (varlen on a CPU) is reported, not fatal
                found[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
        model.base_model.model.config._attn_implementation = attn
        return found

    packing, attn = mode_and_attn(args.packing)
    model = fresh_model(attn)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, fused=DEVICE_TYPE == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier("cosine", total_steps=args.total_steps,
                                                                           warmup=2))
    report: dict[str, Any] = {"packing": packing, "micro_batch_size": args.micro_batch_size, "steps": []}
    start = time.perf_counter()
    for step in range(min(args.steps, len(plan))):
        micro_batch = plan[step]
        loss, norm = loss_and_grads(model, micro_batch, packing, attn)
        report["steps"].append({"step": step + 1, "loss": loss, "grad_norm": norm})
        print(f"step {step + 1:4d} loss {loss:.4f} grad_norm {norm:.4g}", flush=True)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            segments = [[lengths[i] for i in row] for row in micro_batch]
            inputs, _ = forward_inputs(micro_batch, packing, attn)
            bad_grads = [name for name, p in model.named_parameters()
                         if p.requires_grad and p.grad is not None and nonfinite(p.grad)]
            first = {
                "step": step + 1, "rows": micro_batch, "segment_lengths": segments,
                "first_nonfinite_forward": first_nonfinite_forward(model, inputs),
                "nonfinite_grad_params": bad_grads[:8], "nonfinite_grad_param_count": len(bad_grads),
                "weights_finite": all(torch.isfinite(p).all().item() for p in params),
            }
            first |= probe(model, micro_batch)
            report["first_nonfinite"] = first
            print(json.dumps(first, indent=1, default=str), flush=True)
            break
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
    report["wall_s"] = round(time.perf_counter() - start, 1)
    if args.report:
        args.report.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    return 0


def probe_cases(args: argparse.Namespace) -> int:
    """Fresh weights, one forward and backward per hand-made micro-batch: which kind of row is non-finite?"""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunefile.runtime import attention
    from tunefile.runtime.data.batching import collate
    from tunefile.runtime.losses import token_loss_sum

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    pad = AutoTokenizer.from_pretrained(args.work / "tiny-model").pad_token_id
    rng = random.Random(7)
    L = args.sequence_len

    def example(n: int, first: int | None = None) -> dict[str, list[int]]:
        ids = [rng.randrange(3, 128000) for _ in range(n)]
        if first is not None:
            ids[0] = first
        return {"input_ids": ids, "labels": ids}

    def full_row(first: int | None = None) -> list[dict[str, list[int]]]:
        sizes = [300, 200, 500, 250, 400, L - 1650]
        return [example(n, first if i == 2 else None) for i, n in enumerate(sizes)]

    cases = {
        "typical": [full_row() for _ in range(4)],
        "pad_id_starts_an_example": [full_row(first=pad)] + [full_row() for _ in range(3)],
        "pad_id_inside_an_example": [[example(300), {"input_ids": [5, pad, 7] * 100, "labels": [5, pad, 7] * 100}]]
        + [full_row() for _ in range(3)],
        "one_example_of_sequence_len": [[example(L)]] + [full_row() for _ in range(3)],
        "sparse_row_34_tokens": [[example(34)]] + [full_row() for _ in range(3)],
        "many_16_token_examples": [[example(16) for _ in range(L // 16)]] + [full_row() for _ in range(3)],
    }
    results = []
    for packing, attn in (("torch_varlen", None), ("block_mask", "sdpa")):
        if packing == "torch_varlen":
            if device_type != "cuda":
                continue
            attn = attention.register_torch_varlen()
        base = AutoModelForCausalLM.from_pretrained(
            args.work / "llama-1b", attn_implementation=attn,
            dtype=torch.bfloat16 if device_type == "cuda" else torch.float32)
        model = get_peft_model(base, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules="all-linear",
                                                task_type="CAUSAL_LM")).to(device_type)
        for name, rows in cases.items():
            dataset = [e for row in rows for e in row]
            micro_batch, at = [], 0
            for row in rows:
                micro_batch.append(list(range(at, at + len(row))))
                at += len(row)
            batch = collate(dataset, micro_batch, pad_token_id=pad, sequence_len=L, pad_to_sequence_len=False,
                            packed=True)
            batch = {k: v.to(device_type) for k, v in batch.items()}
            extra = attention.packing_forward_kwargs(packing, batch["position_ids"], attn_implementation=attn,
                                                     dtype=torch.bfloat16)
            model.zero_grad(set_to_none=True)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
                logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                               **extra).logits
            loss_sum, count = token_loss_sum(logits, batch["labels"])
            (loss_sum / count).backward()
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
            results.append({"packing": packing, "case": name, "loss": float(loss_sum / count), "grad_norm": norm})
            print(f"{packing:13} {name:28} loss {float(loss_sum / count):9.4f} grad_norm {norm:.4g}", flush=True)
        del model, base
    if args.report:
        args.report.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("prepare", "replay", "probe"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/nan-forensics"))
    parser.add_argument("--rows", type=int, default=40000)
    parser.add_argument("--sequence-len", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--packing", choices=("torch_varlen", "block_mask"), default="torch_varlen")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--total-steps", type=int, default=200, help="the schedule's length")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--report", type=Path)
    parser.add_argument("--data-seed", type=int, default=7,
                        help="prepare: 7 puts an example that begins with the pad id into step 54 (micro batch 4), "
                        "near where the reported run turned NaN (49)")
    parser.add_argument("--shape", default="1b", help="prepare: the model's shape (tiny for a CPU dry run)")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.work, args.rows, args.sequence_len, args.shape, args.data_seed)
        return 0
    if args.command == "probe":
        return probe_cases(args)
    return replay(args)


if __name__ == "__main__":
    sys.exit(main())
