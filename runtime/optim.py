"""Optimizers and learning-rate schedules, from the run plan's ``optimizer`` and ``schedule`` sections.

Schedules are plain `LambdaLR`s of our own: the multiplier is a pure function of the step, so a
resumed run recomputes exactly the same learning rates from the saved step count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..schemas.run_plan import OptimizerPlan, SchedulePlan
from .errors import RuntimeUserError

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
              "adamw_torch_8bit", "adamw_torch_4bit")
# torchao's low-bit AdamW (block-wise quantised moments), by plan name: the class and its state's size relative to
# AdamW's two fp32 moments, which is what a machine without torchao falls back to.
TORCHAO_OPTIMIZERS = {"adamw_torch_8bit": ("AdamW8bit", 4), "adamw_torch_4bit": ("AdamW4bit", 8)}
TORCHAO_FALLBACK = "adamw_torch_fused"
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")


class OptimizerError(RuntimeUserError):
    """The planned optimizer or schedule cannot run here."""


def param_groups(named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
                 weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into decayed and not decayed. Biases and norm weights (the 1-D
    tensors) are not decayed: shrinking them towards 0 only fights the normalisation."""
    decay, no_decay = [], []
    for _, param in named_parameters:
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _bitsandbytes(name: str) -> Any:
    try:
        import bitsandbytes
    except ImportError:
        raise OptimizerError(f"optimizer {name} needs bitsandbytes: pip install 'tunefile[qlora]' "
                             "(or choose adamw_torch)") from None
    return bitsandbytes


def torchao_optim() -> Any | None:
    """``torchao.optim`` (torchao >= 0.10, where the low-bit optimizers left ``torchao.prototype``), or None
    when this machine lacks it."""
    try:
        from torchao import optim as low_bit
    except ImportError:
        return None
    return low_bit


@dataclass(frozen=True)
class OptimizerDecision:
    """The optimizer this machine builds for the planned one, and why it differs when it does."""

    planned: str
    name: str
    fallback: str | None  # None: as planned

    def record(self) -> dict[str, Any]:
        """For the runtime decisions; empty for an optimizer that has no fallback to decide on."""
        if self.planned not in TORCHAO_OPTIMIZERS:
            return {}
        return {"optimizer": self.name, "optimizer_fallback": self.fallback}


def decide_optimizer(name: str) -> OptimizerDecision:
    """A torchao optimizer on a machine without torchao falls back to AdamW, like any other missing kernel:
    the compiler's memory estimate already counts AdamW's full-size state, so the job still fits where it
    was planned to; it only gives up the saving it asked for."""
    if name in TORCHAO_OPTIMIZERS and torchao_optim() is None:
        factor = TORCHAO_OPTIMIZERS[name][1]
        return OptimizerDecision(name, TORCHAO_FALLBACK, f"optimizer {name} needs torchao>=0.10 (pip install "
                                 f"'tunefile[torchao]'): AdamW instead, with {factor}× the optimizer state memory")
    return OptimizerDecision(name, name, None)


def build_optimizer(model: torch.nn.Module, optimizer: OptimizerPlan, *, device_type: str) -> torch.optim.Optimizer:
    """The plan's optimizer (or its fallback, see ``decide_optimizer``) over the model's trainable parameters."""
    groups = param_groups(model.named_parameters(), optimizer.weight_decay)
    if not groups:
        raise OptimizerError("the model has no trainable parameters")
    name = decide_optimizer(optimizer.name).name
    common = {"lr": optimizer.learning_rate, "betas": (optimizer.adam_beta1, optimizer.adam_beta2),
              "eps": optimizer.adam_epsilon}
    if name in TORCHAO_OPTIMIZERS:
        # Each step runs torch.compile'd code (a C++ compiler on the CPU, Triton on CUDA); the LR becomes a tensor
        # in the param groups, which our LambdaLR updates in place.
        return getattr(torchao_optim(), TORCHAO_OPTIMIZERS[name][0])(
            groups, bf16_stochastic_round=optimizer.bf16_stochastic_round, **common)
    if name == "adamw_torch":
        return torch.optim.AdamW(groups, **common)
    if name == "adamw_torch_fused":
        # The fused kernel exists for CUDA tensors; on CPU the plain (foreach) AdamW is the same maths.
        return torch.optim.AdamW(groups, fused=device_type == "cuda", **common)
    if name == "adamw_8bit":
        return _bitsandbytes(name).optim.AdamW8bit(groups, **common)
    if name == "paged_adamw_8bit":
        return _bitsandbytes(name).optim.PagedAdamW8bit(groups, **common)
    if name == "paged_adamw_32bit":
        return _bitsandbytes(name).optim.PagedAdamW32bit(groups, **common)
    raise OptimizerError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def warmup_steps_for(total_steps: int, *, warmup_steps: int | None, warmup_ratio: float | None,
                     warmup_max_steps: int | None) -> int:
    """Axolotl's arithmetic: a ratio is rounded down, then capped; one warmup step becomes two (a single
    warmup step would train step 0 at half the rate and then jump)."""
    if warmup_steps is not None:
        steps = int(warmup_steps)
    elif warmup_ratio:
        steps = int(total_steps * warmup_ratio)
        if warmup_max_steps is not None:
            steps = min(steps, warmup_max_steps)
    else:
        steps = 0
    return 2 if steps == 1 else steps


def lr_multiplier(name: str, *, total_steps: int, warmup: int, min_ratio: float = 0.0,
                  min_from: float | None = None) -> Callable[[int], float]:
    """The schedule as a function of the number of optimizer steps already taken. Cosine decays from the peak
    to ``min_ratio`` × peak, reached at the last step or, with ``min_from``, at that fraction of the steps."""
    if name not in SCHEDULERS:
        raise OptimizerError(f"unknown lr_scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if name == "constant":
        warmup = 0
    decay_end = total_steps if min_from is None else max(warmup + 1, int(min_from * total_steps))

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)  # never 0: the first step already learns something
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        if name == "linear":
            return 1.0 - min(1.0, (step - warmup) / max(1, total_steps - warmup))
        progress = min(1.0, (step - warmup) / max(1, decay_end - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: SchedulePlan, *,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps_for(total_steps, warmup_steps=schedule.warmup_steps, warmup_ratio=schedule.warmup_ratio,
                              warmup_max_steps=schedule.warmup_max_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(
        schedule.lr_scheduler, total_steps=total_steps, warmup=warmup, min_ratio=schedule.min_lr_ratio,
        min_from=schedule.min_lr_from))


def total_optimizer_steps(schedule: SchedulePlan, *, steps_per_epoch: int) -> int:
    """max_steps when the plan sets it; else num_epochs (fractions allowed) × optimizer steps per epoch. The plan
    sets exactly one of the two."""
    if schedule.max_steps is not None:
        return schedule.max_steps
    if schedule.num_epochs is None:
        raise OptimizerError("schedule: neither max_steps nor num_epochs is set; recompile the config with "
                             "`tunefile compile`")
    return max(1, int(math.ceil(schedule.num_epochs * steps_per_epoch)))
