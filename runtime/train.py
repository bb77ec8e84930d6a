"""The trainer: what every bundle's launch.sh runs, `Trainer(plan).run()`.

Read it top to bottom: ``setup`` (accelerate, seed, tokenizer and data, model, optimizer and schedule,
resume), ``train_step`` (collate a step's micro-batches, forward, loss, backward, the watchdog's verdict,
the update), ``run`` (the loop: steps, logging, evaluation, checkpoints) and ``teardown`` (final model,
summary). We own the loop (on accelerate, no Trainer subclass) so packing, the loss, data order and
checkpoints stay ours to change.

The loss is exact under packing, padding, accumulation and data parallelism: each micro-batch
contributes the SUM of its token losses divided by the number of label tokens in the whole optimizer
step across all ranks (one all-reduce per step), so every trained token weighs the same.

Each component receives only its part of the run plan (tunefile.schemas.run_plan); nothing here picks a
default. What this machine decides that the plan could not (the device, an attention fallback) is recorded
in metrics.jsonl and train_summary.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..schemas.run_plan import DistributionPlan, RunPlan, plan_to_dict
from . import attention, checkpoint
from .early_stopping import EarlyStopping
from .evaluate import decide_eval_packing, evaluate
from .fp8 import Fp8Choice, decide_fp8
from .freeze import check_row_ranges_supported
from .kernels import apply_kernels
from .lisa import LayerSampler
from .lora_dropout import recompute_lora_dropout
from .losses import label_token_count, token_loss_sum
from .metrics import MetricsSink, NullSink, metrics_sink
from .model import load_model, uses_adapter
from .offload import decide_activation_offloading
from .optim import MuonWithAdamW, build_optimizer, build_scheduler, decide_optimizer, total_optimizer_steps
from .parallelism import Parallelism, accelerate_config, adapt_accelerator
from .preemption import EXIT_STOPPED_EARLY, StopRequest, process_exit_code, write_exit_status
from .qat import FakeQuantSchedule, check_qat, strip_fake_quantization
from .relora import ReloraRestarts, build_jagged_scheduler
from .router_loss import RouterAuxLoss
from .schedule import Cadence, MicroBatch, optimizer_steps, steps_in
from .startup_clock import StartupClock
from .tiled_mlp import apply_tiled_mlp
from .watchdog import Alarm, Watchdog
from .zero3_gathering import gather_layers_whole, keep_frozen_base_whole, loading_whole

log = logging.getLogger("tunefile.runtime")

MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
SUMMARY_FILE = "train_summary.json"


def mixed_precision(precision: str, *, half_precision_weights: bool) -> str:
    """accelerate's mixed_precision. float16 weights (half_precision_weights with fp16, Axolotl's float16: true)
    train without it, as Axolotl's trainer does: fp16 mode puts a gradient scaler in, which refuses to unscale
    float16 gradients. bfloat16 weights keep bf16 autocast, as Axolotl's bf16 flag does (no scaler there)."""
    if half_precision_weights and precision == "fp16":
        return "no"
    return MIXED_PRECISION[precision]


def build_accelerator(*, precision: str, half_precision_weights: bool, accumulation: int,
                      distribution: DistributionPlan, fp8: Fp8Choice | None = None) -> Any:
    """Distributed type, process count and FSDP/DeepSpeed settings come from `accelerate launch` (the
    bundle's accelerate.yaml); precision and accumulation from the plan."""
    from accelerate import Accelerator

    settings: dict[str, Any] = {
        "mixed_precision": mixed_precision(precision, half_precision_weights=half_precision_weights),
        "gradient_accumulation_steps": accumulation}
    if distribution.deepspeed is not None:
        # deepspeed.json holds both (the compiler wrote the same numbers there); accelerate takes them from it.
        settings = {}
    if fp8 is not None:  # torchao's float8 layers, converted by accelerate in prepare (fp8.py)
        settings |= fp8.accelerator_settings(deepspeed=distribution.deepspeed is not None)
    accelerator = Accelerator(
        # accelerate only forms a gloo group from torchrun's environment when told it is on CPU.
        cpu=distribution.device == "cpu",
        # Our schedule counts optimizer steps; accelerate's default would step it once per process.
        step_scheduler_with_optimizer=False,
        # N-D parallelism (HSDP, tensor and context parallelism): the device mesh (parallelism.py).
        parallelism_config=accelerate_config(distribution),
        **settings,
    )
    adapt_accelerator(accelerator)
    return accelerator


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


@dataclass
class StepResult:
    loss_sum: float  # over all ranks
    label_tokens: float  # over all ranks
    input_tokens: float  # this rank
    grad_norm: float | None


class Trainer:
    """One training run of a bundle. ``after_step(step)`` runs after each step's logging and saving, outside
    the step itself (tests inject a crash there)."""

    def __init__(self, plan: RunPlan, *, after_step: Callable[[int], None] | None = None) -> None:
        self.plan = plan
        self.after_step = after_step
        self.sink: MetricsSink | NullSink = NullSink()  # the real one from setup(); run_training may close either
        # SIGUSR2 (SLURM, ahead of a time limit), SIGTERM, Ctrl-C: finish the step, save, exit 75 (preemption.py).
        self.stop_request = StopRequest()
        self.clock = StartupClock()  # time to the first step, phase by phase (startup_clock.py)

    # --- set-up ---------------------------------------------------------------------------------------------

    def setup(self) -> None:
        from accelerate.utils import set_seed

        from .data import prepare_data
        from .data.tokenizer import load_tokenizer

        plan = self.plan
        self.clock.mark_imports()
        self.accumulation = plan.schedule.gradient_accumulation_steps
        # FP8 where this machine can run it, decided before accelerate starts (its mixed precision says so).
        self.fp8 = decide_fp8(plan.model.fp8, precision=plan.model.precision, distribution=plan.distribution)
        self.accelerator = build_accelerator(precision=plan.model.precision, accumulation=self.accumulation,
                                             half_precision_weights=plan.model.half_precision_weights,
                                             distribution=plan.distribution, fp8=self.fp8)
        acc = self.accelerator
        self.clock.mark("accelerator")
        self.device, self.world, self.rank = acc.device, acc.num_processes, acc.process_index
        self.main = acc.is_main_process
        self.deepspeed = acc.distributed_type.value == "DEEPSPEED"
        # Which share of the data this rank trains on, and how many ranks hold the same batch (parallelism.py).
        self.parallel = Parallelism(plan.distribution, acc)
        self.data_rank, self.data_world = self.parallel.layout.data_rank, self.parallel.layout.data_world
        if not self.main:
            logging.getLogger().setLevel(logging.WARNING)
        set_seed(plan.seed)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = plan.model.tf32
        self.output_dir = Path(plan.checkpointing.output_dir).expanduser()
        if plan.distribution.strategy == "fsdp" and acc.distributed_type.value != "FSDP":
            # accelerate (1.15) turns FSDP on only for GPU-family process groups; on CPU (gloo) it drops the
            # plugin and the run is plain data parallel. PyTorch's fully_shard itself works on CPU.
            log.warning("strategy fsdp requested but accelerate runs %s on %s: training unsharded (data parallel)",
                        acc.distributed_type.value, self.device.type)

        # Data: the main process tokenises (or reuses the cache) while the others wait at the barrier.
        self.tokenizer, _ = load_tokenizer(plan.model, offline=plan.offline)
        self.packing = plan.data.packing_attention is not None
        self.data_decisions: dict[str, Any] = {}  # what this run decided about its data (eval packing, resume)
        if plan.data.streaming:
            from .data.streaming import open_streamed_data

            # Read, tokenised and packed as training goes (data/streaming.py): no cache, no evaluation split.
            self.data = open_streamed_data(plan.data, self.tokenizer, seed=plan.seed, offline=plan.offline,
                                           rank=self.data_rank, world_size=self.data_world, packed=self.packing)
            self.train_lengths, self.eval_lengths, self.first_plan = self.data.train.lengths, [], []
            # No epochs (the plan sets max_steps): a *_per_epoch cadence counts the whole run as one.
            self.steps_per_epoch = plan.schedule.max_steps
        else:
            self.data = prepare_data(plan.data, self.tokenizer, seed=plan.seed, offline=plan.offline,
                                     is_main_process=self.main, barrier=acc.wait_for_everyone)
            self.train_lengths, self.eval_lengths = dataset_lengths(self.data.train), dataset_lengths(self.data.eval)
            self.first_plan = self.micro_batches(self.train_lengths, epoch=0)
            self.steps_per_epoch = steps_in(self.first_plan, self.accumulation)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        self.eval_packed, eval_padded = decide_eval_packing(plan.data.eval_packing, packing=self.packing,
                                                            has_eval=bool(self.eval_lengths))
        if eval_padded:
            log.warning("evaluation batches %s", eval_padded)
            self.data_decisions["eval_packing"] = eval_padded
        from .data.batching import plan_eval_batches

        # Every evaluation example once, on some rank, whatever the packing: fixed for the run.
        self.eval_plan = plan_eval_batches(self.eval_lengths, micro_batch_size=plan.data.micro_batch_size,
                                           sequence_len=plan.data.sequence_len, packed=self.eval_packed,
                                           world_size=self.data_world, rank=self.data_rank)
        self.total_steps = total_optimizer_steps(plan.schedule, steps_per_epoch=self.steps_per_epoch)
        if self.packing and not plan.data.streaming:  # streamed rows are full by construction
            from .data.batching import packing_efficiency

            log.info("packing efficiency %.1f%%",
                     100 * packing_efficiency(self.train_lengths, self.first_plan, plan.data.sequence_len))

        self.clock.mark("tokenizer and data")
        # Model: the attention kernel this machine has, then weights, vocabulary, adapters.
        self.attention = attention.decide_attention(plan.data.packing_attention,
                                                    attn_implementation=plan.model.attn_implementation,
                                                    device_type=self.device.type)
        if self.attention.fallback:
            log.warning("attention: %s", self.attention.fallback)
        # Context parallelism: every layer's attention gathers the row's keys and values (context_parallel.py).
        self.attention = self.parallel.attention(self.attention)
        if plan.model.qat is not None:  # refused before any weight loads: no torchao, or no kernel for it here
            check_qat(plan.model.qat, self.device)
        self.loading_decisions: dict[str, Any] = {}  # the revision, a quantisation transformers changed
        engine_plan = plan.distribution.deepspeed if self.deepspeed else None  # None where accelerate runs no engine
        frozen_base_whole = engine_plan is not None and engine_plan.frozen_base_whole
        with loading_whole(acc) if frozen_base_whole else contextlib.nullcontext():
            model = load_model(plan.model, attn_implementation=self.attention.attn_implementation,
                               vocab_size=len(self.tokenizer), device_index=acc.local_process_index,
                               decisions=self.loading_decisions)
        lora = plan.model.lora
        if lora is not None and lora.recompute_dropout and lora.dropout > 0:  # masks redrawn, not stored
            zero = plan.distribution.deepspeed
            self.loading_decisions.update(recompute_lora_dropout(
                model, strategy=plan.distribution.strategy, zero_stage=zero.stage if zero else None,
                layers_gathered_whole=zero is not None and zero.leaf_module_class is not None))
        self.router_aux = RouterAuxLoss(model)  # a MoE router's aux loss joins the loss (router_loss.py)
        # Liger / cut-cross-entropy where this machine has them (each fallback logged and recorded).
        self.kernels = apply_kernels(model, self.parallel.kernels(plan.kernels), device_type=self.device.type,
                                     precision=plan.model.precision, distribution=plan.distribution)
        # ALST's tiled MLP around each decoder MLP's forward as it now is (adapters and kernels in place).
        self.tiled_mlp = apply_tiled_mlp(model, plan.model.tiled_mlp, distribution=plan.distribution)
        self.sliding_window = getattr(model.config, "sliding_window", None)
        if not getattr(model.config, "use_sliding_window", True):
            self.sliding_window = None  # qwen2 carries a window size it does not use
        # Tensor parallelism splits the layers; context parallelism checks the model and learns its window.
        self.parallel.prepare_model(model, pad_token_id=self.pad_token_id, sliding_window=self.sliding_window)
        self.mask_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())

        self.clock.mark("model")
        # The optimizer and activation offloading this machine can run (a fallback is logged and recorded).
        self.optimizer_choice = decide_optimizer(plan.optimizer.name)
        self.offloading = decide_activation_offloading(plan.model.activation_offloading, device_type=self.device.type)
        for fallback in (self.optimizer_choice.fallback, self.offloading.fallback):
            if fallback:
                log.warning("%s", fallback)
        check_row_ranges_supported(plan.model.unfrozen_parameters, fsdp=acc.distributed_type.value == "FSDP")
        optimizer = build_optimizer(model, plan.optimizer, device_type=self.device.type)
        # Muon leaves some parameters to AdamW; why, when it is more than Axolotl's split, goes on record.
        self.optimizer_split = optimizer.record() if isinstance(optimizer, MuonWithAdamW) else {}
        if plan.model.relora is None:
            scheduler = build_scheduler(optimizer, plan.schedule, total_steps=self.total_steps)
        else:  # the plan's schedule with a warm-up after every restart (relora.py)
            scheduler = build_jagged_scheduler(optimizer, plan.schedule, plan.model.relora,
                                               total_steps=self.total_steps)
        self.adapter_only = uses_adapter(plan.model)
        if self.adapter_only:
            checkpoint.keep_only_the_adapter(acc)
        # LISA (lisa.py) switches the layers that train; ReLoRA (relora.py) merges and restarts the adapter.
        self.lisa = LayerSampler(plan.model, seed=plan.seed)
        self.restarts = ReloraRestarts(plan.model, seed=plan.seed)
        self.lisa.before_wrapping(acc, model)
        self.restarts.before_wrapping(acc)
        self.fp8.use_filter_for(model)  # which linear layers prepare converts to float8
        if engine_plan is not None:  # before prepare installs ZeRO-3's hooks and partitions the parameters
            gather_layers_whole(model, engine_plan.leaf_module_class)
            if frozen_base_whole:
                keep_frozen_base_whole(model, self.device)
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        self.restarts.attach(acc.unwrap_model(self.model), optimizer, acc)  # before resuming: it is checkpointed

        # Resume: weights, optimizer, schedule, every rank's RNG, and where in the data plan we were.
        self.state = checkpoint.TrainState()
        resumed_from = checkpoint.resume(acc, self.output_dir, resume_from=plan.checkpointing.resume_from_checkpoint,
                                         auto_resume=plan.checkpointing.auto_resume, adapter_only=self.adapter_only)
        resume_path = None if resumed_from is None else resumed_from[1]
        self.saved: tuple[int, Path] | None = None  # (step, checkpoint) of the newest state on disk, if any
        if resumed_from is not None:
            self.state = resumed_from[0]
            self.saved = (self.state.step, resume_path)
            log.info("resumed from %s at step %d (epoch %d, micro-batch %d)", resume_path, self.state.step,
                     self.state.epoch, self.state.micro_batch)
        if plan.data.streaming:  # where this rank's stream starts: exactly where the checkpoint left it, if it can
            from .data.streaming import resume_position

            saved = None if resume_path is None else checkpoint.load_rank_state(resume_path, self.rank)
            self.stream_start, resumed = resume_position(saved, resuming=resume_path is not None,
                                                         world_size=self.world)
            if resumed is not None:
                (log.info if resumed.startswith("resumed") else log.warning)("stream: %s", resumed)
                self.data_decisions["stream_resume"] = resumed
        # QAT's delayed start: fake quantisation off for the plan's first steps, judged from the resumed step.
        self.fake_quant = FakeQuantSchedule(plan.model.qat)
        self.fake_quant.at_step(self.model, self.state.step)
        self.lisa.at_step(acc.unwrap_model(self.model), self.state.step)  # the layers of the resumed step's window

        self.clock.mark("wrapping and resume")
        self.cadence = Cadence.from_plan(plan.schedule, plan.checkpointing, steps_per_epoch=self.steps_per_epoch,
                                         total_steps=self.total_steps, has_eval=bool(self.eval_lengths))
        self.watchdog = Watchdog(plan.watchdog)
        self.sink = metrics_sink(self.output_dir, is_main_process=self.main, total_steps=self.total_steps,
                                 start_step=self.state.step, trackers=plan.trackers, offline=plan.offline,
                                 run_config=plan_to_dict(plan))
        if self.state.step < self.total_steps:  # a finished run launched again trains and records nothing
            self.sink.log_runtime_decisions(self.state.step, self.runtime_decisions())
        log.info("training %d optimizer steps (%d per epoch; %d micro-batch × %d accumulation × %d processes), "
                 "packing attention: %s", self.total_steps, self.steps_per_epoch, plan.data.micro_batch_size,
                 self.accumulation, self.world, self.attention.packing if self.packing else "off")

    def runtime_decisions(self) -> dict[str, Any]:
        """What this machine decided that the plan could not, for metrics.jsonl and train_summary.json."""
        machine = {"device": self.device.type, "distributed_type": self.accelerator.distributed_type.value,
                   "packing_attention": self.attention.packing,
                   "attn_implementation": self.attention.attn_implementation,
                   "attention_fallback": self.attention.fallback}
        return (machine | self.kernels.record() | self.sink.tracker_decisions() | self.optimizer_choice.record()
                | self.optimizer_split | self.offloading.record() | self.loading_decisions | self.data_decisions
                | self.lisa.decisions() | self.restarts.decisions(self.optimizer_choice.name) | self.parallel.record()
                | self.tiled_mlp.record() | self.fp8.record(self.model))

    def micro_batches(self, lengths: list[int], *, epoch: int) -> list[MicroBatch]:
        """This rank's micro-batches for one epoch: a pure function of (seed, epoch, rank)."""
        from .data.batching import plan_batches

        data = self.plan.data
        return plan_batches(lengths, micro_batch_size=data.micro_batch_size, sequence_len=data.sequence_len,
                            sample_packing=self.packing, seed=self.plan.seed, epoch=epoch,
                            world_size=self.data_world, rank=self.data_rank, group_by_length=data.group_by_length,
                            accumulation=self.accumulation)

    def collate(self, dataset: Any, micro_batch: MicroBatch, *, packed: bool | None = None) -> dict[str, torch.Tensor]:
        """``packed``: the batch's rows hold several examples (default: training's sample packing)."""
        from .data.batching import collate

        data = self.plan.data
        return collate(dataset, micro_batch, pad_token_id=self.pad_token_id, sequence_len=data.sequence_len,
                       pad_to_sequence_len=data.pad_to_sequence_len, packed=self.packing if packed is None else packed)

    def isolation(self, position_ids: torch.Tensor | None) -> dict[str, Any]:
        return attention.packing_forward_kwargs(self.attention.packing, position_ids,
                                                attn_implementation=self.attention.attn_implementation,
                                                dtype=self.mask_dtype, sliding_window=self.sliding_window)

    # --- one step -------------------------------------------------------------------------------------------

    def forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the micro-batch's token losses, its label tokens)."""
        batch = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
        return self.parallel.forward_loss(self.model, batch, self.whole_rows_loss)

    def whole_rows_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k != "labels"} | self.isolation(batch.get("position_ids"))
        if self.kernels.loss is not None:  # fused: from the final hidden states, never the whole logits
            return self.kernels.loss(self.model, inputs, batch["labels"])
        logits = self.model(**inputs, use_cache=False).logits
        return token_loss_sum(logits, batch["labels"])

    def train_step(self, step: int, group: list[MicroBatch]) -> StepResult:
        """Forward and backward over the step's micro-batches, the watchdog's verdict, then the update."""
        acc = self.accelerator
        batches = [self.collate(self.data.train, micro_batch) for micro_batch in group]
        local_tokens = torch.stack([label_token_count(b["labels"]) for b in batches]).sum().to(self.device)
        # Tensor- and context-parallel ranks hold the same micro-batches: their tokens count once.
        layout = self.parallel.layout
        step_tokens = (acc.reduce(local_tokens, reduction="sum") / layout.batch_copies).clamp(min=1)
        # accelerator.backward divides by the accumulation steps (DeepSpeed's engine does the same) and
        # data-parallel gradients are averaged over ranks: this scale undoes both.
        scale = self.accumulation * layout.gradient_ranks / step_tokens
        local_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            acc.sync_gradients = last  # accelerate's optimizer wrapper steps only on the last one
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                with self.offloading.context():  # the forward's saved activations to CPU memory, when planned
                    loss_sum, _ = self.forward_loss(batch)
                local_loss += loss_sum.detach().double()
                if last and self.deepspeed:
                    # DeepSpeed applies the update inside the last backward: judge the loss before it.
                    self.judge(step, group, self.step_loss(local_loss, step_tokens), grad_norm=None)
                acc.backward(loss_sum * scale
                             + self.router_aux.term(accumulation=self.accumulation, micro_batches=len(batches)))
        input_tokens = float(sum(self.train_lengths[j] for micro_batch in group for row in micro_batch
                                 for j in row))
        loss_all = acc.reduce(local_loss.clone(), reduction="sum") / layout.loss_copies
        grad_norm = self.gradient_norm()
        if not self.deepspeed:
            self.judge(step, group, float(loss_all / step_tokens), grad_norm=grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.deepspeed and grad_norm is not None and not math.isfinite(grad_norm):
            # DeepSpeed measured its norm inside the step it already took: stop before anything is saved.
            self.judge(step, group, float(loss_all / step_tokens), grad_norm=grad_norm)
        return StepResult(loss_sum=float(loss_all), label_tokens=float(step_tokens), input_tokens=input_tokens,
                          grad_norm=grad_norm)

    def step_loss(self, local_loss: torch.Tensor, step_tokens: torch.Tensor) -> float:
        return float(self.accelerator.reduce(local_loss.clone(), reduction="sum") / self.parallel.layout.loss_copies
                     / step_tokens)

    def evaluate(self) -> float:
        """The evaluation loss (collective); under context parallelism each rank evaluates its slices."""
        def batch_of(micro_batch: MicroBatch) -> dict[str, torch.Tensor]:
            return self.collate(self.data.eval, micro_batch, packed=self.eval_packed)

        if self.parallel.context_parallel:
            return self.parallel.evaluate(self.model, self.eval_plan.micro_batches, batch_of, idle=self.eval_plan.idle)
        return evaluate(self.model, self.accelerator, self.eval_plan.micro_batches, batch_of, self.isolation,
                        idle=self.eval_plan.idle)

    def gradient_norm(self) -> float | None:
        """The global gradient norm, clipped to max_grad_norm when that is set (0: measured, not clipped)."""
        max_norm = self.plan.optimizer.max_grad_norm
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm if max_norm > 0 else math.inf)
        return None if norm is None else float(norm)

    def judge(self, step: int, group: list[MicroBatch], loss: float, *, grad_norm: float | None) -> None:
        """Collective when it stops the run: every rank reaches the same verdict (the values are global) and
        the main process names every rank's rows."""
        alarm = self.watchdog.check(step, loss, grad_norm)
        if alarm is not None:
            raise self.stop(alarm, group)

    def stop(self, alarm: Alarm, group: list[MicroBatch]) -> Exception:
        from .data import describe_examples

        rows = describe_examples(self.data.train, [j for micro_batch in group for row in micro_batch for j in row])
        if self.world > 1:
            from accelerate.utils import gather_object

            rows = "; ".join(f"rank {rank}: {text}" for rank, text in enumerate(gather_object([rows])))
        return alarm.stop(rows)

    # --- the loop -------------------------------------------------------------------------------------------

    def run(self) -> int:
        self.setup()
        self.early_stopping, self.stopped_early = EarlyStopping(self.plan.schedule.early_stopping_patience), None
        state, total = self.state, self.total_steps
        # Sums since the last log line: [loss sum (all ranks), label tokens (all ranks), input tokens (this rank)].
        window = [0.0, 0.0, 0.0]
        window_start, grad_norm = time.perf_counter(), None
        self.model.train()
        if self.plan.data.streaming:  # endless: the loop stops at max_steps
            steps = self.steps_source = self.data.steps(accumulation=self.accumulation, start=self.stream_start,
                                                        micro_batches_done=state.micro_batch)
        else:
            steps = optimizer_steps(lambda epoch: self.first_plan if epoch == 0 else
                                    self.micro_batches(self.train_lengths, epoch=epoch),
                                    epoch=state.epoch, micro_batch=state.micro_batch, accumulation=self.accumulation)
        # A stop asked for during set-up ends the run here, before a step it would have to abandon.
        if state.step < total and self.stop_request.agreed(self.accelerator):
            return self.stop_on_signal(state)
        for epoch, index, group in steps:
            if state.step >= total:
                break
            self.lisa.at_step(self.accelerator.unwrap_model(self.model), state.step)
            result = self.train_step(state.step + 1, group)
            if not self.clock.done:  # the wait every launch and resume pays, in one line
                first_step = self.clock.finish()
                if self.main:
                    log.info("%s", first_step)
            window = [window[0] + result.loss_sum, window[1] + result.label_tokens, window[2] + result.input_tokens]
            grad_norm = result.grad_norm
            state = self.state = checkpoint.TrainState(step=state.step + 1, epoch=epoch,
                                                       micro_batch=index + len(group))
            self.fake_quant.at_step(self.model, state.step)  # the step boundary: evaluation sees the new state
            self.restarts.after_step(state.step, total)  # before the log and the checkpoint of this step
            self.sink.advance()
            if self.cadence.log_now(state.step, total):
                input_tokens = float(self.accelerator.reduce(torch.tensor(window[2], dtype=torch.float64,
                                                                          device=self.device), reduction="sum")
                                     ) / self.parallel.layout.batch_copies
                self.sink.log_train({
                    # Streaming: passes over the sources so far (a pass's length is unknown until it ends).
                    "step": state.step, "epoch": float(epoch) if self.plan.data.streaming else
                    round(epoch + state.micro_batch / max(1, len(self.first_plan)), 4),
                    "loss": window[0] / max(1.0, window[1]), "lr": float(self.scheduler.get_last_lr()[0]),
                    "tokens_per_s": input_tokens / max(time.perf_counter() - window_start, 1e-9),
                    "grad_norm": grad_norm,
                } | peak_memory(self.device) | self.lisa.record() | self.restarts.record())
                window, window_start = [0.0, 0.0, 0.0], time.perf_counter()
            if self.cadence.eval_now(state.step, total):
                eval_loss = self.evaluate()
                self.sink.log_eval({"step": state.step, "eval_loss": eval_loss})
                window_start = time.perf_counter()  # evaluation time is not training throughput
                if self.early_stopping.should_stop(eval_loss):
                    self.stopped_early = state.step
                    log.info("early stopping: the evaluation loss has not improved for %d evaluations; stopping "
                             "at step %d", self.early_stopping.patience, state.step)
                    break
            if self.cadence.save_now(state.step, total):
                saved = checkpoint.save_checkpoint(self.accelerator, self.output_dir, state,
                                                   save_total_limit=self.plan.checkpointing.save_total_limit,
                                                   adapter_only=self.adapter_only,
                                                   rank_state={"stream": self.steps_source.position.as_dict()}
                                                   if self.plan.data.streaming else None)
                self.saved = state.step, saved
                window_start = time.perf_counter()
            if self.after_step is not None:
                self.after_step(state.step)
            if state.step >= total:  # before asking for another step: a stream would read and tokenise it
                break
            # The step boundary: if any rank was asked to stop, every rank saves this step and leaves.
            if self.stop_request.agreed(self.accelerator):
                return self.stop_on_signal(state)
        self.teardown()
        return 0

    def stop_on_signal(self, state: checkpoint.TrainState) -> int:
        """A signal asked the run to stop (preemption.py): save where it is, unless that step is saved already,
        mark the checkpoint for the next launch, and exit EXIT_STOPPED_EARLY on every rank."""
        from .teardown import finish_distributed

        acc, reason = self.accelerator, self.stop_request.signal_name or "a signal"
        # Decided from what this run did, the same on every rank (a look at the disk might differ between nodes).
        saved = self.saved[1] if self.saved is not None and self.saved[0] == state.step else None
        if saved is None and state.step > 0:
            saved = checkpoint.save_checkpoint(acc, self.output_dir, state,
                                               save_total_limit=self.plan.checkpointing.save_total_limit,
                                               adapter_only=self.adapter_only,
                                               rank_state={"stream": self.steps_source.position.as_dict()}
                                               if self.plan.data.streaming else None)
        if saved is not None and self.main:
            checkpoint.mark_stopped_early(saved, f"stopped by {reason} after step {state.step}")
        self.sink.close()
        where = f"checkpoint {saved} saved" if saved is not None else "no step had finished, nothing to save"
        log.info("stopped by %s after step %d of %d: %s; run again to continue (exit %d)", reason, state.step,
                 self.total_steps, where, EXIT_STOPPED_EARLY)
        # The status first: once the last rank leaves finish_distributed's barrier, another node's launch.sh may
        # exit 75 and srun (--kill-on-bad-exit) terminate this node's step; launch.sh still finds 75 here.
        write_exit_status(EXIT_STOPPED_EARLY)
        finish_distributed(acc)  # every rank has the checkpoint on disk before any exits
        return process_exit_code()

    # --- teardown -------------------------------------------------------------------------------------------

    def teardown(self) -> None:
        from .teardown import finish_distributed

        acc, state = self.accelerator, self.state
        if self.plan.model.qat is not None:  # saved as the plain architecture; quantising is a later step
            strip_fake_quantization(acc.unwrap_model(self.model))
        if self.restarts.enabled:  # ReLoRA's output is the merged model, as Axolotl's (relora.py)
            self.restarts.save_merged_model(acc, self.model, self.tokenizer, self.output_dir)
        else:
            checkpoint.save_final_model(acc, self.model, self.tokenizer, self.output_dir)
        digests = acc.gather(checkpoint.weights_digest(self.model).to(self.device)).tolist()
        # After the save (wandb may upload the final model) and after the last collective: an upload on the main
        # process must not hold the other ranks inside one.
        self.sink.close(model_dir=self.output_dir)
        if self.main:
            summary = {"step": state.step, "epoch": state.epoch, "distributed_type": acc.distributed_type.value,
                       "world_size": self.world, **peak_memory(self.device),
                       "runtime_decisions": self.runtime_decisions(), "stopped_early_at_step": self.stopped_early,
                       "startup": self.clock.record(),
                       # Trainable-weight digest per rank: equal under DDP (replicas), per shard under FSDP.
                       "rank_weight_digests": digests}
            (self.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n",
                                                        encoding="utf-8")
            log.info("done after %d steps; model saved in %s", state.step, self.output_dir)
            checkpoint.clear_stopped_early(self.output_dir)  # finished: nothing left to continue
        finish_distributed(acc)


def run_training(plan: RunPlan, *, after_step: Callable[[int], None] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is noise
    trainer = Trainer(plan, after_step=after_step)
    trainer.stop_request.install()
    try:
        return trainer.run()
    except BaseException:
        # __main__ leaves with os._exit, which runs no atexit hook: the trackers must hear of the failure
        # here, or wandb and MLflow would show the run as still running.
        trainer.sink.close(failed=True)
        raise
