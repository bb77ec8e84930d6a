"""Optimizers and learning-rate schedules, from the run plan's ``optimizer`` and ``schedule`` sections.

Schedules are plain `LambdaLR`s of our own: the multiplier is a pure function of the step, so a
resumed run recomputes exactly the same learning rates from the saved step count.

``muon`` is two optimizers that must look like one (``MuonWithAdamW``): torch's Muon for the hidden layers'
weight matrices and AdamW for the rest, behind the single param-group list and state dict that the scheduler,
accelerate and the checkpoints see.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..schemas.run_plan import OptimizerPlan, SchedulePlan
from .errors import RuntimeUserError

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
              "adamw_torch_8bit", "adamw_torch_4bit", "muon")
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
    if name == "muon":
        return build_muon(model, optimizer)
    raise OptimizerError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


# --- Muon ---------------------------------------------------------------------------------------------------
# Axolotl's optimizer: muon (axolotl-contribs-mit's MuonOptimizerFactory): Muon orthogonalises the momentum of each
# hidden weight matrix (a Newton-Schulz iteration) and steps along it; embeddings, the output head, norms and biases
# keep AdamW. Both use the config's learning_rate; Muon's momentum and Nesterov setting are the factory's.

MUON_MOMENTUM = 0.95
MUON_NESTEROV = True
# Parameter names that stay on AdamW whatever their shape, as Axolotl matches them: the token embeddings, the output
# head, and peft's trained copies of modules (modules_to_save, usually those two).
ADAMW_NAME_PARTS = ("embed_tokens", "lm_head")
ADAMW_NAME_SUFFIX = "modules_to_save.default.weight"

NamedParameter = tuple[str, torch.nn.Parameter]


@dataclass
class MuonSplit:
    """Which trainable parameters Muon updates and which AdamW does."""

    muon: list[NamedParameter] = field(default_factory=list)  # the hidden layers' 2-D weight matrices (decayed)
    # Embeddings, the output head, norms and biases: not decayed (as Axolotl, and as param_groups does for AdamW).
    adamw: list[NamedParameter] = field(default_factory=list)
    # Tensors of three or more dimensions (fused MoE experts, convolutions): Axolotl's Muon treats them as stacks
    # of matrices; torch's Muon takes only matrices, so they stay on AdamW, decayed like any weight.
    adamw_decayed: list[NamedParameter] = field(default_factory=list)


def embedding_parameter_ids(model: torch.nn.Module) -> set[int]:
    """Every nn.Embedding's parameters and the output head's (``get_output_embeddings``), whatever the model names
    them: GPT-2's wte and wpe are embeddings too, though Axolotl's name match misses them."""
    ids = {id(param) for module in model.modules() if isinstance(module, torch.nn.Embedding)
           for param in module.parameters()}
    output_embeddings = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if callable(output_embeddings) else None
    if isinstance(head, torch.nn.Module):
        ids.update(id(param) for param in head.parameters())
    return ids


def muon_split(model: torch.nn.Module) -> MuonSplit:
    split = MuonSplit()
    embeddings = embedding_parameter_ids(model)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embeddings or any(part in name for part in ADAMW_NAME_PARTS) \
                or name.endswith(ADAMW_NAME_SUFFIX) or param.ndim < 2:
            split.adamw.append((name, param))
        elif param.ndim == 2:
            split.muon.append((name, param))
        else:
            split.adamw_decayed.append((name, param))
    return split


def spectral_lr_scale(shape: torch.Size) -> float:
    """Axolotl's Muon steps a (fan_out × fan_in) matrix by lr·sqrt(fan_out / fan_in) (its adjust_lr
    "spectral_norm"); torch's by lr·sqrt(max(1, fan_out / fan_in)) (adjust_lr_fn "original"). This factor turns
    one into the other: 1 for square and tall matrices, below 1 for wide ones (down_proj, GQA's k/v)."""
    fan_out, fan_in = shape[0], shape[1]
    return min(1.0, math.sqrt(fan_out / fan_in))


def build_muon(model: torch.nn.Module, optimizer: OptimizerPlan) -> MuonWithAdamW:
    split = muon_split(model)
    if not split.muon:
        raise OptimizerError("optimizer muon: the model has no trainable weight matrix outside the embeddings and "
                             "output head for Muon to update; choose adamw_torch")
    fallback = None
    if split.adamw_decayed:
        fallback = (f"optimizer muon: AdamW trains the {len(split.adamw_decayed)} parameter tensor(s) of 3 or more "
                    f"dimensions ({split.adamw_decayed[0][0]}, …): torch's Muon takes only matrices")
        log.warning("%s", fallback)
    # One Muon group per learning-rate factor (a handful of matrix shapes), so each group's step is one scale.
    by_scale: dict[float, list[torch.nn.Parameter]] = {}
    for _, param in split.muon:
        by_scale.setdefault(spectral_lr_scale(param.shape), []).append(param)
    muon_groups = [{"params": params, "weight_decay": optimizer.weight_decay, "lr_scale": scale}
                   for scale, params in by_scale.items()]
    adamw_groups = [group for group in (
        {"params": [param for _, param in split.adamw_decayed], "weight_decay": optimizer.weight_decay},
        {"params": [param for _, param in split.adamw], "weight_decay": 0.0}) if group["params"]]
    built = MuonWithAdamW(muon_groups, adamw_groups, lr=optimizer.learning_rate,
                          betas=(optimizer.adam_beta1, optimizer.adam_beta2), eps=optimizer.adam_epsilon)
    built.fallback = fallback
    return built


class MuonWithAdamW(torch.optim.Optimizer):
    """torch's Muon and AdamW as one optimizer. The two inner optimizers share this one's param-group dicts (each
    marked with its ``algorithm``) and its state, so that everything that treats an optimizer as one object works
    on both halves: the LR scheduler sets every group's lr, accelerate's FSDP2 swaps each group's parameters for
    their sharded DTensors in place, state_dict / load_state_dict hold both halves' state (a checkpoint resumes
    both), zero_grad clears every gradient.

    Under FSDP2 torch's Muon receives the DTensor shards; its Newton-Schulz matmuls then run on DTensors, which
    gather what each product needs, so the step matches the unsharded one (to bf16 rounding: the iteration runs
    in bf16). FSDP1 and DeepSpeed hand the optimizer flattened 1-D shards instead, which Muon cannot use."""

    def __init__(self, muon_groups: list[dict[str, Any]], adamw_groups: list[dict[str, Any]], *, lr: float,
                 betas: tuple[float, float], eps: float) -> None:
        for group in muon_groups:
            group["algorithm"] = "muon"
        for group in adamw_groups:
            group["algorithm"] = "adamw"
        self.muon = torch.optim.Muon(muon_groups, lr=lr, momentum=MUON_MOMENTUM, nesterov=MUON_NESTEROV,
                                     adjust_lr_fn="original")
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps) if adamw_groups else None
        # The inner optimizers filled in their defaults; this one adopts the very same dicts.
        super().__init__([*self.muon.param_groups, *(self.adamw.param_groups if self.adamw else [])],
                         defaults={"lr": lr})
        self._share_with_inner_optimizers()
        self.fallback: str | None = None  # set by build_muon when some tensors Axolotl gives Muon go to AdamW here

    def record(self) -> dict[str, Any]:
        """For the runtime decisions: why part of the model does not train with Muon, when it does not."""
        return {"optimizer_fallback": self.fallback} if self.fallback else {}

    def _share_with_inner_optimizers(self) -> None:
        for inner, algorithm in ((self.muon, "muon"), (self.adamw, "adamw")):
            if inner is not None:
                inner.param_groups = [group for group in self.param_groups if group["algorithm"] == algorithm]
                inner.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch rebuilds param_groups and state as new objects: hand them to the inner optimizers again.
        super().load_state_dict(state_dict)
        self._share_with_inner_optimizers()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon_step()
        if self.adamw is not None:
            self.adamw.step()
        return loss

    def _muon_step(self) -> None:
        """torch's Muon step with each group's lr scaled to Axolotl's spectral-norm step, and its weight decay
        divided by the same factor so that the decay stays lr × weight_decay, as in Axolotl (and as the schedule
        sets it); both are put back afterwards, for the scheduler and the state dict."""
        for group in self.muon.param_groups:
            for param in group["params"]:
                if param.ndim != 2:
                    raise OptimizerError(
                        f"optimizer muon: a weight matrix reached the optimizer as a {param.ndim}-D tensor of "
                        f"shape {tuple(param.shape)}: FSDP1 and DeepSpeed flatten parameters, which Muon cannot "
                        "orthogonalise; use FSDP2 (fsdp_version: 2) or no sharding")
        saved = [(group["lr"], group["weight_decay"]) for group in self.muon.param_groups]
        for group in self.muon.param_groups:
            group["lr"] = group["lr"] * group["lr_scale"]
            group["weight_decay"] = group["weight_decay"] / group["lr_scale"]
        try:
            self.muon.step()
        finally:
            for group, (lr, weight_decay) in zip(self.muon.param_groups, saved, strict=True):
                group["lr"], group["weight_decay"] = lr, weight_decay


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
                  min_from: float | None = None, warmup_shape: str = "linear") -> Callable[[int], float]:
    """The schedule as a function of the number of optimizer steps already taken. Cosine decays from the peak
    to ``min_ratio`` × peak, reached at the last step or, with ``min_from``, at that fraction of the steps.
    ``warmup_shape`` quadratic squares the warm-up's linear fraction (Axolotl's lr_quadratic_warmup)."""
    if name not in SCHEDULERS:
        raise OptimizerError(f"unknown lr_scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if name == "constant":
        warmup = 0
    decay_end = total_steps if min_from is None else max(warmup + 1, int(min_from * total_steps))

    def multiplier(step: int) -> float:
        if step < warmup:
            fraction = (step + 1) / (warmup + 1)  # never 0: the first step already learns something
            return fraction * fraction if warmup_shape == "quadratic" else fraction
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
        min_from=schedule.min_lr_from, warmup_shape=schedule.warmup_shape))


def total_optimizer_steps(schedule: SchedulePlan, *, steps_per_epoch: int) -> int:
    """max_steps when the plan sets it; else num_epochs (fractions allowed) × optimizer steps per epoch. The plan
    sets exactly one of the two."""
    if schedule.max_steps is not None:
        return schedule.max_steps
    if schedule.num_epochs is None:
        raise OptimizerError("schedule: neither max_steps nor num_epochs is set; recompile the config with "
                             "`tunefile compile`")
    return max(1, int(math.ceil(schedule.num_epochs * steps_per_epoch)))
