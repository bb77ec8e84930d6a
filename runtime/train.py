"""The training loop: `run_training(config_path)`, what every bundle's launch.sh runs.

Read it top to bottom: seed → tokenizer and data → model → optimizer and schedule → accelerate →
resume → for each optimizer step: collate its micro-batches, forward, loss, backward, clip, step →
log, evaluate, save → final model. We own the loop (on accelerate, no Trainer subclass) so packing,
the loss, data order and checkpoints stay ours to change.

The loss is exact under packing, padding, accumulation and data parallelism: each micro-batch
contributes the SUM of its token losses divided by the number of label tokens in the whole optimizer
step across all ranks (one all-reduce per step), so every trained token weighs the same.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from . import attention, checkpoint
from .config import RunConfig, load_run_config
from .evaluate import evaluate
from .losses import label_token_count, token_loss_sum
from .metrics import metrics_sink
from .model import ModelOptions, load_model
from .optim import build_optimizer, build_scheduler, total_optimizer_steps
from .schedule import Cadence, optimizer_steps, steps_in

log = logging.getLogger("tunefile.runtime")

MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
FAULT_AFTER_STEP = "TUNEFILE_FAULT_AFTER_STEP"  # tests: die like a killed job right after this step


def build_accelerator(cfg: RunConfig) -> Any:
    """Distributed type, process count and FSDP/DeepSpeed settings come from `accelerate launch` (the
    bundle's accelerate.yaml); precision and accumulation from the resolved config."""
    from accelerate import Accelerator

    settings: dict[str, Any] = {
        "mixed_precision": MIXED_PRECISION[cfg.resolved["precision"]],
        "gradient_accumulation_steps": accumulation_steps(cfg),
    }
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        # deepspeed.json holds both (the compiler wrote the same numbers there); accelerate takes them from it.
        settings = {}
    return Accelerator(
        # accelerate only forms a gloo group from torchrun's environment when told it is on CPU.
        cpu=cfg.resolved.get("device") == "cpu",
        # Our schedule counts optimizer steps; accelerate's default would step it once per process.
        step_scheduler_with_optimizer=False,
        **settings,
    )


def accumulation_steps(cfg: RunConfig) -> int:
    return int(cfg.resolved.get("gradient_accumulation_steps") or cfg.get("gradient_accumulation_steps") or 1)


def peak_memory(device: torch.device) -> dict[str, float]:
    """This rank's peak GPU memory so far, in GiB (what the allocator handed out, not what it reserved);
    nothing on the CPU."""
    if device.type != "cuda":
        return {}
    return {"peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}


def dataset_lengths(dataset: Any) -> list[int]:
    if dataset is None:
        return []
    if "length" in getattr(dataset, "column_names", ()):
        return [int(n) for n in dataset["length"]]
    return [len(ids) for ids in dataset["input_ids"]]


def run_training(config_path: str | Path) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is noise
    cfg = load_run_config(config_path)
    from accelerate.utils import set_seed

    from .data import prepare_data
    from .data.batching import collate, packing_efficiency, plan_batches
    from .data.tokenizer import load_tokenizer

    accelerator = build_accelerator(cfg)
    device, world, rank, main = (accelerator.device, accelerator.num_processes, accelerator.process_index,
                                 accelerator.is_main_process)
    if not main:
        logging.getLogger().setLevel(logging.WARNING)
    seed = int(cfg.get("seed") or 42)
    set_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg.get("tf32"))
    output_dir = cfg.output_dir
    if cfg.resolved.get("strategy") == "fsdp" and accelerator.distributed_type.value != "FSDP":
        # accelerate (1.15) turns FSDP on only for GPU-family process groups; on CPU (gloo) it drops the
        # plugin and the run is plain data parallel. PyTorch's fully_shard itself works on CPU.
        log.warning("strategy fsdp requested but accelerate runs %s on %s: training unsharded (data parallel)",
                    accelerator.distributed_type.value, device.type)

    # Data: the main process tokenises (or reuses the cache) while the others wait at the barrier.
    tokenizer, _ = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer, is_main_process=main, barrier=accelerator.wait_for_everyone)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_lengths, eval_lengths = dataset_lengths(data.train), dataset_lengths(data.eval)
    sequence_len, accumulation = int(cfg["sequence_len"]), accumulation_steps(cfg)
    micro_batch_size = int(cfg.resolved.get("micro_batch_size") or cfg["micro_batch_size"])
    sample_packing = bool(cfg.get("sample_packing"))

    def plan(lengths: list[int], epoch: int) -> list[list[list[int]]]:
        """This rank's micro-batches for one epoch: a pure function of (seed, epoch, rank)."""
        return plan_batches(lengths, micro_batch_size=micro_batch_size, sequence_len=sequence_len,
                            sample_packing=sample_packing, seed=seed, epoch=epoch, world_size=world, rank=rank)

    def batch_of(dataset: Any, micro_batch: list[list[int]]) -> dict[str, torch.Tensor]:
        return collate(dataset, micro_batch, pad_token_id=pad_token_id, sequence_len=sequence_len,
                       pad_to_sequence_len=bool(cfg.get("pad_to_sequence_len")), packed=sample_packing)

    first_plan = plan(train_lengths, 0)
    steps_per_epoch = steps_in(first_plan, accumulation)
    total_steps = total_optimizer_steps(max_steps=cfg.get("max_steps"), num_epochs=float(cfg.get("num_epochs") or 1),
                                        steps_per_epoch=steps_per_epoch)
    if sample_packing:
        log.info("packing efficiency %.1f%%", 100 * packing_efficiency(train_lengths, first_plan, sequence_len))

    # Model: the attention kernel this machine has, then weights, vocabulary, adapters.
    packing_mode, attn_implementation = attention.choose_packing_attention(
        cfg.resolved.get("packing_attention"), sample_packing=sample_packing,
        attn_implementation=cfg.resolved["attn_implementation"], device_type=device.type)
    options = ModelOptions.from_config(cfg.values, attn_implementation=attn_implementation)
    model = load_model(options, vocab_size=len(tokenizer), device_index=accelerator.local_process_index)
    sliding_window = getattr(model.config, "sliding_window", None)
    if not getattr(model.config, "use_sliding_window", True):
        sliding_window = None  # qwen2 carries a window size it does not use
    mask_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())

    def isolation(position_ids: torch.Tensor | None) -> dict[str, Any]:
        return attention.packing_forward_kwargs(packing_mode, position_ids, attn_implementation=attn_implementation,
                                                dtype=mask_dtype, sliding_window=sliding_window)

    optimizer = build_optimizer(model, optimizer=cfg.get("optimizer") or "adamw_torch",
                                learning_rate=float(cfg["learning_rate"]),
                                weight_decay=float(cfg.get("weight_decay") or 0.0), device_type=device.type)
    scheduler = build_scheduler(optimizer, lr_scheduler=cfg.get("lr_scheduler") or "cosine", total_steps=total_steps,
                                warmup_steps=cfg.get("warmup_steps"), warmup_ratio=cfg.get("warmup_ratio"))
    if options.uses_adapter:
        checkpoint.keep_only_the_adapter(accelerator)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    # Resume: weights, optimizer, schedule, every rank's RNG, and where in the data plan we were.
    state = checkpoint.TrainState()
    resume_path = checkpoint.find_resume_checkpoint(output_dir, resume_from=cfg.get("resume_from_checkpoint"),
                                                    auto_resume=cfg.get("auto_resume_from_checkpoints", True))
    if resume_path is not None:
        state = checkpoint.load_checkpoint(accelerator, resume_path, adapter_only=options.uses_adapter)
        log.info("resumed from %s at step %d (epoch %d, micro-batch %d)", resume_path, state.step, state.epoch,
                 state.micro_batch)

    cadence = Cadence.from_config(cfg.values, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                                  has_eval=bool(eval_lengths))
    sink = metrics_sink(output_dir, is_main_process=main, total_steps=total_steps, start_step=state.step)
    max_grad_norm = float(cfg.get("max_grad_norm") or 0.0)
    fault_after = int(os.environ.get(FAULT_AFTER_STEP) or 0)
    log.info("training %d optimizer steps (%d per epoch; %d micro-batch × %d accumulation × %d processes), "
             "packing attention: %s", total_steps, steps_per_epoch, micro_batch_size, accumulation, world,
             packing_mode or "off")

    # Sums since the last log line, on this rank: [loss sum, label tokens, input tokens].
    window = torch.zeros(3, dtype=torch.float64, device=device)
    window_start, grad_norm = time.perf_counter(), None
    model.train()
    steps = optimizer_steps(lambda epoch: first_plan if epoch == 0 else plan(train_lengths, epoch),
                            epoch=state.epoch, micro_batch=state.micro_batch, accumulation=accumulation)
    for epoch, index, group in steps:
        if state.step >= total_steps:
            break
        batches = [batch_of(data.train, micro_batch) for micro_batch in group]
        local_tokens = torch.stack([label_token_count(b["labels"]) for b in batches]).sum().to(device)
        step_tokens = accelerator.reduce(local_tokens, reduction="sum").clamp(min=1)
        # accelerator.backward divides by the accumulation steps (DeepSpeed's engine does the same) and
        # data-parallel gradients are averaged over ranks: this scale undoes both.
        scale = accumulation * world / step_tokens
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            accelerator.sync_gradients = last  # accelerate's optimizer wrapper steps only on the last one
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
                inputs = {k: v for k, v in batch.items() if k != "labels"} | isolation(batch.get("position_ids"))
                logits = model(**inputs, use_cache=False).logits
                loss_sum, count = token_loss_sum(logits, batch["labels"])
                accelerator.backward(loss_sum * scale)
            input_tokens = sum(train_lengths[j] for row in group[i] for j in row)
            window += torch.stack([loss_sum.detach().double(), count.double(),
                                   torch.tensor(float(input_tokens), dtype=torch.float64, device=device)])
        if max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state = checkpoint.TrainState(step=state.step + 1, epoch=epoch, micro_batch=index + len(group))
        sink.advance()

        if cadence.log_now(state.step, total_steps):
            loss_sum_all, label_tokens, input_tokens = accelerator.reduce(window.clone(), reduction="sum").tolist()
            sink.log_train({
                "step": state.step, "epoch": round(epoch + state.micro_batch / max(1, len(first_plan)), 4),
                "loss": loss_sum_all / max(1.0, label_tokens), "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": input_tokens / max(time.perf_counter() - window_start, 1e-9),
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
            } | peak_memory(device))
            window.zero_()
            window_start = time.perf_counter()
        if cadence.eval_now(state.step, total_steps):
            eval_loss = evaluate(model, accelerator, plan(eval_lengths, 0), lambda mb: batch_of(data.eval, mb),
                                 isolation)
            sink.log_eval({"step": state.step, "eval_loss": eval_loss})
            window_start = time.perf_counter()  # evaluation time is not training throughput
        if cadence.save_now(state.step, total_steps):
            checkpoint.save_checkpoint(accelerator, output_dir, state, save_total_limit=cfg.get("save_total_limit"),
                                       adapter_only=options.uses_adapter)
            window_start = time.perf_counter()
        if state.step == fault_after:
            os._exit(17)  # no cleanup, no final save: what a SIGKILL leaves behind

    sink.close()
    checkpoint.save_final_model(accelerator, model, tokenizer, output_dir)
    digests = accelerator.gather(checkpoint.weights_digest(model).to(device)).tolist()
    if main:
        summary = {"step": state.step, "epoch": state.epoch, "distributed_type": accelerator.distributed_type.value,
                   "world_size": world, **peak_memory(device),
                   # Trainable-weight digest per rank: equal under DDP (replicas), per shard under FSDP.
                   "rank_weight_digests": digests}
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n",
                                                       encoding="utf-8")
        log.info("done after %d steps; model saved in %s", state.step, output_dir)
    accelerator.end_training()
    return 0
