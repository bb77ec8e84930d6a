"""ReLoRA: the plan's ``model.relora`` (Axolotl's relora, relora_* and jagged_restart_* keys; arXiv:2307.05695).

Every ``restart_steps`` optimizer steps the LoRA update B·A·scaling is merged into the base weights, the adapter
starts again (A drawn as peft draws it, B zero, so the model computes exactly what it computed before), the
adapter's optimizer state is pruned, and the learning rate warms up again: many low-rank updates add up to a
high-rank one. Axolotl's callback (axolotl/monkeypatch/relora.py) restarts when a step begins with a completed
step count that is a positive multiple of restart_steps; here the restart runs at the end of that step, before
it is logged and checkpointed, which is the same point between two updates, and a checkpoint then holds the
state the next step starts from. There is no restart after the last step.

The merge, by kind of base:
- a plain (LoRA) base adds the update in place, computing it in fp32 (on the CPU with cpu_offload) and
  rounding once into the weight's dtype;
- a 4- or 8-bit base (QLoRA) cannot absorb an update smaller than its quantisation step: rounded back, most of
  it would be lost. As in Axolotl, which merges into a full-precision copy kept on disk, the merged weights
  live in a full-precision master (the base's weights re-read unquantised when training starts, on the CPU, in
  the compute dtype; only the LoRA targets are kept); each restart adds the update to the master and
  quantises the master again into the training layer (bitsandbytes' Params4bit / Int8Params with the layer's
  own settings, as peft's merge does).

Checkpoints: an adapter run's checkpoint holds only the trainable tensors (checkpoint.py). Instead of the
merged base (the size of the targets), a ReLoRA checkpoint adds the factors (A, B) of every past restart
(``custom_checkpoint_<i>.pkl``, through accelerate's register_for_checkpointing): resuming replays the merges,
in order and with the same arithmetic, into the freshly loaded base, so the base is bit for bit the one the
interrupted run had. Each restart adds one adapter's size (r·(in+out) per target, against in·out for a
merged copy).

The output: like Axolotl, which saves the merged model and no adapter (axolotl/train.py), output_dir gets the
whole model with every update merged: the in-place merged base for LoRA; for QLoRA the base re-read
unquantised with the master's targets and the trained tensors that were not quantised (embeddings, norms,
head, modules_to_save).

The learning rate follows Axolotl's JaggedLRRestartScheduler (axolotl/utils/schedulers.py), multiplied onto the
plan's schedule: 1 until restart_steps − anneal_steps, then in each cycle a linear warm-up from the floor
(min_lr_scale) over warmup_steps, and a linear decay to the floor over the last anneal_steps (Axolotl's default
of 1 decays over none).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..schemas.run_plan import ModelPlan, ReloraPlan, SchedulePlan
from .errors import RuntimeUserError

log = logging.getLogger(__name__)

# Adam's moments under their torch and bitsandbytes names; only floating-point tensors are pruned.
PRUNED_STATE_KEYS = ("exp_avg", "exp_avg_sq", "state1", "state2")
# Optimizers whose moments are quantised codes, where zeroing a code does not zero the moment.
QUANTIZED_STATE_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "adamw_torch_8bit", "adamw_torch_4bit")
# Strategies whose wrapper owns the weights (sharded or partitioned): Axolotl refuses ReLoRA under both.
SHARDED = ("FSDP", "DEEPSPEED")
# Streams of the seeded generators, so the adapter's initialisation and the random pruning never share one.
REINIT, PRUNE = 0, 1


class ReloraError(RuntimeUserError):
    """The plan's ReLoRA settings cannot be applied to this model or strategy."""


# --- the learning rate --------------------------------------------------------------------------------------

def jagged_multiplier(relora: ReloraPlan) -> Callable[[int], float]:
    """Axolotl's restart scale as a function of the optimizer steps already taken."""
    restart, warmup, anneal, floor = relora.restart_steps, relora.warmup_steps, relora.anneal_steps, relora.min_lr_scale

    def multiplier(step: int) -> float:
        if step < restart - anneal:
            return 1.0  # the first cycle: the plan's own warm-up only
        progress = step % restart
        if progress < warmup:
            cycle = min(1.0, progress / warmup)
        elif progress > restart - anneal:
            cycle = min(1.0, (restart - progress) / anneal)
        else:
            cycle = 1.0
        return cycle * (1 - floor) + floor

    return multiplier


def build_jagged_scheduler(optimizer: torch.optim.Optimizer, schedule: SchedulePlan, relora: ReloraPlan, *,
                           total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The plan's schedule (optim.build_scheduler's multipliers) times the restart scale: still a pure function of
    the step, so a resumed run recomputes the same rates."""
    from .optim import build_scheduler

    plain = build_scheduler(optimizer, schedule, total_steps=total_steps)
    jagged = jagged_multiplier(relora)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda step, base=base: base(step) * jagged(step) for base in plain.lr_lambdas])


# --- the adapter's layers -----------------------------------------------------------------------------------

def is_quantized_module(module: torch.nn.Module) -> bool:
    """A bitsandbytes 4- or 8-bit layer (found by its class's package, so no import of bitsandbytes)."""
    return type(module).__module__.startswith("bitsandbytes")


def adapter_layers(model: torch.nn.Module) -> dict[str, Any]:
    """The LoRA layers of a peft model by their names in the base model (e.g. model.layers.0.self_attn.q_proj).
    ReLoRA merges into linear layers only, plain or bitsandbytes-quantised, with one adapter."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear

    base = model.get_base_model()
    layers = {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    if not layers:
        raise ReloraError("relora: the model has no LoRA layers to merge")
    for name, layer in layers.items():
        if not (isinstance(layer, Linear) or is_quantized_module(layer.get_base_layer())):
            raise ReloraError(f"relora merges LoRA on linear layers; {name} is a {type(layer).__name__} (LoRA on "
                              "embeddings or expert parameters cannot restart); choose other lora_target_modules")
        if len(layer.active_adapters) != 1:
            raise ReloraError(f"relora: {name} has {len(layer.active_adapters)} active adapters; it merges one")
    return layers


def adapter_name(layer: Any) -> str:
    return layer.active_adapters[0]


def factors(layer: Any) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """The layer's (A, B) weights: the update is B·A·scaling."""
    name = adapter_name(layer)
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def update_from(a: torch.Tensor, b: torch.Tensor, layer: Any, device: torch.device) -> torch.Tensor:
    """B·A·scaling in fp32 on ``device``, laid out as the base weight (transposed for fan_in_fan_out layers).
    Every merge goes through here, in training and when a resumed run replays them, so both round alike."""
    update = b.to(device=device, dtype=torch.float32) @ a.to(device=device, dtype=torch.float32)
    if getattr(layer, "fan_in_fan_out", False):
        update = update.T
    return update * layer.scaling[adapter_name(layer)]


def merge_in_place(layer: Any, update: torch.Tensor, *, cpu_offload: bool) -> None:
    """A plain base weight += update, added in fp32 and rounded once to the weight's dtype."""
    weight = layer.get_base_layer().weight
    if cpu_offload:  # the addition on the CPU: the GPU holds no second copy of the weight
        merged = weight.detach().to("cpu")
        merged.add_(update.to("cpu"))
        weight.data.copy_(merged)
    else:
        weight.data.add_(update.to(weight.device))


def requantize(layer: Any, weight: torch.Tensor) -> None:
    """Replace a bitsandbytes layer's weight with ``weight`` quantised the way it was (peft's merge does the same:
    the parameter is rebuilt on the CPU and quantised on its way back to the GPU)."""
    import bitsandbytes as bnb

    base = layer.get_base_layer()
    old = base.weight
    if isinstance(old, bnb.nn.Params4bit):
        settings = {key: value for key, value in old.__dict__.items() if not key.startswith("_") and key != "data"}
        settings.update(requires_grad=False, bnb_quantized=False)
        base.weight = bnb.nn.Params4bit(weight.to("cpu"), **settings).to(old.device)
    else:
        base.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False,
                                        has_fp16_weights=old.has_fp16_weights).to(old.device)
        base.state.reset_grads()


def seeded_generator(seed: int, restart: int, stream: int) -> torch.Generator:
    """A CPU generator that depends only on the run's seed, the restart and the stream: every rank draws the same
    values whatever its data did to the global generators, and a resumed run the same as an unbroken one."""
    state = np.random.SeedSequence([seed, restart, stream]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def reinitialise(layers: dict[str, Any], generator: torch.Generator) -> None:
    """A fresh adapter as peft initialises one (init_lora_weights=True): A Kaiming-uniform with a=√5 (nn.Linear's
    default), B zero; drawn on the CPU, so the values do not depend on the device."""
    for layer in layers.values():
        a, b = factors(layer)
        fresh = torch.empty(a.shape, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
        a.data.copy_(fresh)
        b.data.zero_()


# --- the optimizer state ------------------------------------------------------------------------------------

@torch.no_grad()
def prune_by_magnitude_(tensor: torch.Tensor, ratio: float) -> None:
    """Zero the round(ratio × n) entries of smallest magnitude (more on ties at the threshold), in place."""
    count = round(ratio * tensor.numel())
    if count <= 0:
        return
    if count >= tensor.numel():
        tensor.zero_()
        return
    magnitude = tensor.abs().float()
    threshold = magnitude.flatten().kthvalue(count).values
    tensor.mul_((magnitude > threshold).to(tensor.dtype))


@torch.no_grad()
def prune_at_random_(tensor: torch.Tensor, ratio: float, generator: torch.Generator) -> None:
    """Zero each entry with probability ``ratio``, in place."""
    keep = torch.rand(tensor.shape, generator=generator) >= ratio
    tensor.mul_(keep.to(device=tensor.device, dtype=tensor.dtype))


def prune_optimizer_state(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], *, method: str,
                          ratio: float, generator: torch.Generator) -> tuple[int, int]:
    """Prune the moments of ``params`` (Axolotl's reset_optimizer; its "reset" is random pruning at the plan's
    ratio). Returns (zero entries after, entries pruned over); Adam's step counts are kept, as in Axolotl."""
    zeros = total = 0
    for param in params:
        state = optimizer.state.get(param, {})
        for key in PRUNED_STATE_KEYS:
            value = state.get(key)
            if type(value) is not torch.Tensor or not value.is_floating_point():
                continue  # absent, or quantised codes (QUANTIZED_STATE_OPTIMIZERS)
            if method == "magnitude":
                prune_by_magnitude_(value, ratio)
            else:
                prune_at_random_(value, ratio, generator)
            zeros += int((value == 0).sum())
            total += value.numel()
    return zeros, total


# --- the full-precision base of a quantised run -------------------------------------------------------------

def load_unquantized_base(model: ModelPlan) -> torch.nn.Module:
    """The base model's own weights, unquantised, on the CPU, in the dtype its 4/8-bit layers compute in."""
    from .model import compute_dtype, load_pretrained

    if model.from_scratch:
        raise ReloraError("relora on a quantised base merges into the base's full-precision weights, and "
                          "reinit_weights has none; train a lora adapter (not qlora) or drop reinit_weights")
    return load_pretrained(model, model.base_model, dtype=compute_dtype(model), attn_implementation="sdpa")


# --- the restarts -------------------------------------------------------------------------------------------

class ReloraRestarts:
    """The restarts of one run. The trainer calls ``before_wrapping`` before accelerate wraps the model,
    ``attach`` after (before resuming: it registers for checkpointing), ``after_step`` after every optimizer step,
    and ``save_merged_model`` at the end instead of the adapter save. A run without ReLoRA gets one that does
    nothing."""

    def __init__(self, model: ModelPlan, *, seed: int) -> None:
        self.model_plan = model
        self.relora = model.relora
        self.seed = seed
        self.restarts = 0
        self.history: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []  # each restart's (A, B) per layer
        self.layers: dict[str, Any] = {}
        self.master: dict[str, torch.Tensor] = {}  # quantised layers: their merged weights, full precision, CPU
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def enabled(self) -> bool:
        return self.relora is not None

    def before_wrapping(self, accelerator: Any) -> None:
        if not self.enabled:
            return
        if self.model_plan.adapter is None:
            raise ReloraError("relora restarts a LoRA adapter, and the plan has none; set adapter: lora or qlora")
        strategy = accelerator.distributed_type.value
        if strategy in SHARDED:
            raise ReloraError(f"relora merges into the base weights, which {strategy} shards; train with DDP or "
                              "one process (Axolotl refuses ReLoRA with FSDP and DeepSpeed too)")

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, accelerator: Any) -> None:
        """``model``: the unwrapped peft model; ``optimizer``: the one built over its adapter."""
        if not self.enabled:
            return
        self.layers = adapter_layers(model)
        self.optimizer = optimizer
        quantized = [name for name, layer in self.layers.items() if is_quantized_module(layer.get_base_layer())]
        if quantized:
            log.info("relora: reading the unquantised weights of %d quantised layers to merge into", len(quantized))
            base = load_unquantized_base(self.model_plan)
            self.master = {name: base.get_submodule(name).weight.detach().clone() for name in quantized}
            del base
            for name in quantized:
                layer = self.layers[name].get_base_layer()
                if tuple(self.master[name].shape) != (layer.out_features, layer.in_features):
                    raise ReloraError(f"relora: {name} is {tuple(self.master[name].shape)} in the base checkpoint "
                                      f"but {(layer.out_features, layer.in_features)} in training (a resized "
                                      "vocabulary?); leave it out of lora_target_modules")
        accelerator.register_for_checkpointing(self)  # saved with every checkpoint, loaded on resume

    def decisions(self, optimizer_name: str) -> dict[str, Any]:
        """For the runtime decisions: what restarts cannot prune with this optimizer."""
        if not self.enabled or optimizer_name not in QUANTIZED_STATE_OPTIMIZERS:
            return {}
        return {"relora_pruning": f"{optimizer_name} keeps its moments as quantised codes, which restarts leave "
                                  "as they are (only the adapter restarts)"}

    def after_step(self, steps_done: int, total_steps: int) -> bool:
        """Restart when ``steps_done`` is a multiple of restart_steps and not the last step; True if it did."""
        if not self.enabled or steps_done % self.relora.restart_steps or steps_done >= total_steps:
            return False
        self.restart()
        log.info("relora: restart %d after step %d: adapter merged into the base and started again", self.restarts,
                 steps_done)
        return True

    @torch.no_grad()
    def restart(self) -> None:
        relora = self.relora
        self.history.append({name: tuple(f.detach().to("cpu", copy=True) for f in factors(layer))
                             for name, layer in self.layers.items()})
        self.merge(self.history[-1])
        reinitialise(self.layers, seeded_generator(self.seed, self.restarts, REINIT))
        params = [p for layer in self.layers.values() for p in factors(layer)]
        zeros, total = prune_optimizer_state(self.optimizer, params, method=relora.prune_method,
                                             ratio=relora.prune_ratio,
                                             generator=seeded_generator(self.seed, self.restarts, PRUNE))
        log.info("relora: %.1f%% of the adapter's optimizer state is now zero (%s)", 100 * zeros / max(total, 1),
                 relora.prune_method)
        self.restarts += 1

    def merge(self, restart_factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Merge one restart's factors into the base: in place, or into the master then quantised again."""
        cpu_offload = self.relora.cpu_offload
        for name, layer in self.layers.items():
            device = torch.device("cpu") if cpu_offload else layer.get_base_layer().weight.device
            update = update_from(*restart_factors[name], layer, device)
            if name in self.master:
                self.master[name].add_(update.to("cpu"))
                requantize(layer, self.master[name])
            else:
                merge_in_place(layer, update, cpu_offload=cpu_offload)

    # Checkpointing (accelerate's save_state / load_state call these).

    def state_dict(self) -> dict[str, Any]:
        return {"restarts": self.restarts,
                "factors": [{f"{name}.{part}": tensor for name, pair in entry.items()
                             for part, tensor in zip(("lora_A", "lora_B"), pair, strict=True)}
                            for entry in self.history]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay the checkpoint's restarts into the freshly loaded base, in order."""
        history = []
        for entry in state["factors"]:
            names = {key.rsplit(".", 1)[0] for key in entry}
            if names != set(self.layers):
                raise ReloraError("relora: the checkpoint's adapter layers are not this model's; was it written "
                                  "with another adapter config?")
            history.append({name: (entry[f"{name}.lora_A"], entry[f"{name}.lora_B"]) for name in self.layers})
        for restart_factors in history:
            self.merge(restart_factors)
        self.history, self.restarts = history, int(state["restarts"])
        if history:
            log.info("relora: replayed %d restarts into the base", len(history))

    def record(self) -> dict[str, Any]:
        """For each logged step's metrics (Axolotl logs num_lora_restarts)."""
        return {"relora_restarts": self.restarts} if self.enabled else {}

    # The output.

    @torch.no_grad()
    def save_merged_model(self, accelerator: Any, model: torch.nn.Module, tokenizer: Any, output_dir: Path) -> None:
        """The whole model with the last adapter merged too, in Hugging Face format (collective)."""
        peft_model = accelerator.unwrap_model(model)
        updates = {}
        for name, layer in self.layers.items():
            if name in self.master:  # merged into the full-precision copy below, on the main process
                updates[name] = update_from(*factors(layer), layer, torch.device("cpu"))
            else:
                device = torch.device("cpu") if self.relora.cpu_offload else layer.get_base_layer().weight.device
                merge_in_place(layer, update_from(*factors(layer), layer, device), cpu_offload=self.relora.cpu_offload)
        merged = peft_model.unload()  # the base model with its merged weights, the LoRA layers gone
        if accelerator.is_main_process:
            if self.master:
                merged = self.full_precision_copy(merged, updates)
            merged.save_pretrained(str(output_dir), safe_serialization=True)
            tokenizer.save_pretrained(str(output_dir))
        accelerator.wait_for_everyone()

    def full_precision_copy(self, trained: torch.nn.Module, updates: dict[str, torch.Tensor]) -> torch.nn.Module:
        """A quantised run's output: the base re-read unquantised, its quantised targets set to master + the last
        update, and every tensor training kept unquantised (embeddings, norms, head, modules_to_save) copied."""
        full = load_unquantized_base(self.model_plan)
        rows = trained.get_input_embeddings().num_embeddings
        if full.get_input_embeddings().num_embeddings != rows:
            full.resize_token_embeddings(rows)
        quantized = {f"{name}.weight" for name, module in trained.named_modules() if is_quantized_module(module)}
        targets = dict(full.named_parameters())
        for name, param in trained.named_parameters():
            if name not in quantized:
                targets[name].data.copy_(param.detach())
        for name, update in updates.items():
            weight = full.get_submodule(name).weight
            weight.data.copy_(self.master[name])
            weight.data.add_(update)
        return full
