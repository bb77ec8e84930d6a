"""The subprocesses bench/vs_hf.py starts, each on its own so that the parent can time it out and read what it left:

    python bench/vs_hf_workers.py hf SPEC.json          # one Hugging Face Trainer + PEFT run as the spec says
    python bench/vs_hf_workers.py ceiling OUT.json cuda  # the best TFLOP/s of square matmuls on this device
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench scripts

from vs_hf import GIB, LORA, HfConfig  # noqa: E402


def hf_worker(spec_file: Path) -> int:
    """One Hugging Face Trainer + PEFT run as the spec says (in its own process: the parent times it out)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    config, cuda = HfConfig(**spec["config"]), spec["device"] == "cuda"
    with open(spec["data"], encoding="utf-8") as data:
        rows = [json.loads(line)["input_ids"] for line in data]

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict[str, list[int]]:
            return {"input_ids": rows[i], "labels": rows[i]}

    def pad(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros(len(features), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, f in enumerate(features):
            ids[i, :len(f["input_ids"])], mask[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"]), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    collate = {"flatten": DataCollatorWithFlattening(), "stack": default_data_collator, "pad": pad}[config.collator]
    batch_tokens: list[int] = []  # in the order the batches are made, which is the order the steps take them

    def counting_collator(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch_tokens.append(sum(len(f["input_ids"]) for f in features))
        return collate(features)

    def write(record: dict[str, Any]) -> None:
        """One line per event, flushed: a run killed at its time limit still leaves what it did."""
        with open(spec["steps_file"], "a", encoding="utf-8") as steps_out:
            steps_out.write(json.dumps(record) + "\n")

    class Measure(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            memory = {}
            if cuda:
                torch.cuda.synchronize()
                memory = {"allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
                          "reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3)}
            write({"step": state.global_step, "t": time.perf_counter(), "tokens": batch_tokens[state.global_step - 1],
                   **memory})

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if logs and "loss" in logs:
                write({"step": state.global_step, "loss": logs["loss"], "grad_norm": logs.get("grad_norm")})

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation=config.attn)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable, total = model.get_nb_trainable_parameters()
    arguments = TrainingArguments(
        output_dir=spec["output_dir"], per_device_train_batch_size=config.rows, gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=spec["learning_rate"], lr_scheduler_type="cosine", warmup_steps=5,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused" if cuda else "adamw_torch", bf16=cuda,
        use_cpu=not cuda, logging_steps=1, logging_nan_inf_filter=False, save_strategy="no", report_to="none",
        seed=42, dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
        gradient_checkpointing=config.gc, gradient_checkpointing_kwargs={"use_reentrant": False} if config.gc else None,
        torch_compile=config.compile, use_liger_kernel=config.liger)
    Trainer(model=model, args=arguments, train_dataset=Rows(), data_collator=counting_collator,
            callbacks=[Measure()]).train()
    write({"done": True, "trainable": trainable, "total": total})
    return 0


def ceiling_worker(out: Path, device: str) -> int:
    """The best TFLOP/s of square matmuls (bf16 on a GPU; fp32 in the CPU smoke run), over a few sizes."""
    import torch

    cuda = device == "cuda"
    dtype, sizes, iters = (torch.bfloat16, (4096, 8192, 16384), 20) if cuda else (torch.float32, (256, 512), 5)
    best: dict[str, Any] = {"tflops": 0.0}
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        for _ in range(3):
            a @ b
        for _ in range(3):  # best of three timings of `iters` matmuls
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(iters):
                a @ b
            if cuda:
                torch.cuda.synchronize()
            tflops = 2 * n**3 * iters / (time.perf_counter() - start) / 1e12
            if tflops > best["tflops"]:
                best = {"tflops": round(tflops, 3), "n": n, "dtype": str(dtype).removeprefix("torch.")}
    out.write_text(json.dumps(best), encoding="utf-8")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "hf":
        return hf_worker(Path(argv[1]))
    if len(argv) == 3 and argv[0] == "ceiling":
        return ceiling_worker(Path(argv[1]), argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
