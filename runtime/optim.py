"""Optimizers and learning-rate schedules, from the run plan's ``optimizer`` and ``schedule`` sections.

Schedules are plain `LambdaLR`s of our own: the multiplier is a pure function of the step, so a
resumed run recomputes exactly the same learning rates from the saved step count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..schemas.run_plan import OptimizerPlan, SchedulePlan
from .errors import RuntimeUserError

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
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


def build_optimizer(model: torch.nn.Module, optimizer: OptimizerPlan, *, device_type: str,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """The plan's optimizer over the model's trainable parameters. ``betas`` and ``eps`` are AdamW's own
    constants, which no config sets."""
    groups = param_groups(model.named_parameters(), optimizer.weight_decay)
    if not groups:
        raise OptimizerError("the model has no trainable parameters")
    name = optimizer.name
    common = {"lr": optimizer.learning_rate, "betas": betas, "eps": eps}
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


def warmup_steps_for(total_steps: int, *, warmup_steps: int | None, warmup_ratio: float | None) -> int:
    if warmup_steps is not None:
        return int(warmup_steps)
    if warmup_ratio:
        return int(math.ceil(total_steps * warmup_ratio))
    return 0


def lr_multiplier(name: str, *, total_steps: int, warmup: int) -> Callable[[int], float]:
    """The schedule as a function of the number of optimizer steps already taken."""
    if name not in SCHEDULERS:
        raise OptimizerError(f"unknown lr_scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if name == "constant":
        warmup = 0

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)  # never 0: the first step already learns something
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if name == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: SchedulePlan, *,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps_for(total_steps, warmup_steps=schedule.warmup_steps, warmup_ratio=schedule.warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(schedule.lr_scheduler, total_steps=total_steps,
                                                                      warmup=warmup))


def total_optimizer_steps(schedule: SchedulePlan, *, steps_per_epoch: int) -> int:
    """max_steps when the plan sets it; else num_epochs (fractions allowed) × optimizer steps per epoch. The plan
    sets exactly one of the two."""
    if schedule.max_steps is not None:
        return schedule.max_steps
    if schedule.num_epochs is None:
        raise OptimizerError("schedule: neither max_steps nor num_epochs is set; recompile the config with "
                             "`tunefile compile`")
    return max(1, int(math.ceil(schedule.num_epochs * steps_per_epoch)))
