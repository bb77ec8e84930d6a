"""LISA, layerwise importance-sampled full fine-tuning: the plan's ``model.lisa`` (Axolotl's lisa_n_layers,
lisa_step_interval and lisa_layers_attribute; arXiv:2403.17919).

Every ``step_interval`` optimizer steps, and before the first, every decoder layer in the list at
``layers_attribute`` is frozen and ``n_layers`` of them, drawn at random, train. Everything outside that list
(embeddings, the output head, the final norm) trains throughout, as in Axolotl's callback
(axolotl/utils/callbacks/lisa.py), which touches only the layers.

The optimizer is built once, over every trainable parameter, before the first freeze: a frozen layer gets no
gradient, and AdamW skips a parameter without one (no update, no weight decay, its moments kept for when the
layer is drawn again), so switching layers never rebuilds it. Axolotl relies on the same.

Where Axolotl draws from numpy's global generator, the draw here is a pure function of (seed, window), the
window being the number of completed steps divided by step_interval: a resumed run trains the same layers at
step k as an uninterrupted one, and the checkpoint needs no LISA state. (Axolotl also draws again after the
first step, `global_step == 1`, an extra switch we leave out.)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from functools import reduce
from typing import Any

import numpy as np
import torch

from ..schemas.run_plan import ModelPlan
from .errors import RuntimeUserError

log = logging.getLogger(__name__)

# Strategies whose wrapper fixes the set of trainable parameters when it wraps the model (FSDP's flat or sharded
# parameters, DeepSpeed's partitioned optimizer): layers cannot start and stop training under them.
FIXED_TRAINABLE_SET = ("FSDP", "DEEPSPEED")
DATA_PARALLEL = ("MULTI_CPU", "MULTI_GPU")


class LisaError(RuntimeUserError):
    """The plan's LISA settings cannot be applied to this model or strategy."""


def decoder_layers(model: torch.nn.Module, attribute: str) -> Sequence[torch.nn.Module]:
    """The layer list at the dotted ``attribute`` path under ``model`` (e.g. model.layers)."""
    try:
        layers = reduce(getattr, attribute.split("."), model)
    except AttributeError:
        raise LisaError(f"lisa_layers_attribute {attribute}: {type(model).__name__} has no such attribute; set it "
                        "to the path of the decoder layer list (e.g. model.layers)") from None
    if not isinstance(layers, (torch.nn.ModuleList, torch.nn.Sequential)):
        raise LisaError(f"lisa_layers_attribute {attribute}: is a {type(layers).__name__}, not a list of layers")
    return layers


def draw_layers(*, seed: int, window: int, total_layers: int, n_layers: int) -> tuple[int, ...]:
    """The indices of the layers that train during ``window`` (sorted): n_layers of total_layers without
    repetition, from a generator seeded by the run's seed and the window alone."""
    rng = np.random.default_rng([seed, window])
    return tuple(sorted(int(i) for i in rng.choice(total_layers, size=n_layers, replace=False)))


class LayerSampler:
    """Which decoder layers train, switched at the step boundaries the plan sets. The trainer calls
    ``before_wrapping`` before accelerate wraps the model and ``at_step`` before every step (and after resuming);
    a run without LISA gets one that does nothing."""

    def __init__(self, model: ModelPlan, *, seed: int) -> None:
        self.model_plan = model
        self.lisa = model.lisa
        self.seed = seed
        self.checkpointing_change: str | None = None  # what before_wrapping changed about checkpointing, and why
        self.window: int | None = None
        self.active: tuple[int, ...] = ()
        # Per layer, the parameters that trained when LISA took over: a layer drawn later trains those, which
        # are the ones the optimizer was built over (unfrozen_parameters may have frozen others).
        self.trainable: list[list[torch.nn.Parameter]] | None = None

    def before_wrapping(self, accelerator: Any, model: torch.nn.Module) -> None:
        """Refuse what LISA cannot run on; under DDP, let layers sit steps out. DDP otherwise expects a gradient
        for every parameter that trained when it wrapped the model, and fails on a frozen layer's; told to look
        for unused parameters it copes, but not with reentrant checkpointing, whose backward passes mark the
        parameters ready again: the layers are then checkpointed without reentrancy (same recomputation, and
        the same gradients)."""
        if self.lisa is None:
            return
        if self.model_plan.adapter is not None:
            raise LisaError(f"lisa trains decoder layers in full and cannot be combined with adapter: "
                            f"{self.model_plan.adapter}; recompile the config without one")
        strategy = accelerator.distributed_type.value
        if strategy in FIXED_TRAINABLE_SET:
            raise LisaError(f"lisa switches which layers train during the run, which {strategy} cannot follow (it "
                            "fixes the trainable parameters when it wraps the model); train with DDP or one process")
        if strategy in DATA_PARALLEL:
            from accelerate.utils import DistributedDataParallelKwargs

            handler = accelerator.ddp_handler or DistributedDataParallelKwargs()
            accelerator.ddp_handler = dataclasses.replace(handler, find_unused_parameters=True)
            kwargs = self.model_plan.gradient_checkpointing_kwargs
            if self.model_plan.gradient_checkpointing and kwargs.get("use_reentrant") is not False:
                from .model import enable_gradient_checkpointing

                enable_gradient_checkpointing(model, {**kwargs, "use_reentrant": False}, frozen_inputs=False,
                                              every_n_layers=self.model_plan.gradient_checkpointing_every_n_layers)
                self.checkpointing_change = ("use_reentrant: false: under DDP, LISA's frozen layers need DDP's "
                                             "unused-parameter search, which reentrant checkpointing breaks")
                log.warning("lisa: gradient checkpointing %s", self.checkpointing_change)

    def at_step(self, model: torch.nn.Module, steps_done: int) -> None:
        """Draw the layers of the window ``steps_done`` falls in, unless they are already the ones training.
        ``model``: the unwrapped model."""
        if self.lisa is None:
            return
        window = steps_done // self.lisa.step_interval
        if window == self.window:
            return
        layers = decoder_layers(model, self.lisa.layers_attribute)
        if self.trainable is None:
            if self.lisa.n_layers > len(layers):
                raise LisaError(f"lisa_n_layers {self.lisa.n_layers}: the model has only {len(layers)} layers at "
                                f"{self.lisa.layers_attribute}")
            self.trainable = [[p for p in layer.parameters() if p.requires_grad] for layer in layers]
            log.info("LISA trains %d of %d layers (%.0f%%), drawn again every %d steps", self.lisa.n_layers,
                     len(layers), 100 * self.lisa.n_layers / len(layers), self.lisa.step_interval)
        self.active = draw_layers(seed=self.seed, window=window, total_layers=len(layers),
                                  n_layers=self.lisa.n_layers)
        self.window = window
        chosen = set(self.active)
        for index, layer in enumerate(layers):
            for param in layer.parameters():
                param.requires_grad_(False)
                param.grad = None  # a gradient left from its last active step must not reach the next update
            if index in chosen:
                for param in self.trainable[index]:
                    param.requires_grad_(True)
        log.info("LISA: layers %s train from step %d", list(self.active), steps_done + 1)

    def decisions(self) -> dict[str, Any]:
        """For the runtime decisions: a change to gradient checkpointing made for LISA under DDP."""
        return {} if self.checkpointing_change is None else {"lisa_gradient_checkpointing": self.checkpointing_change}

    def record(self) -> dict[str, Any]:
        """For each logged step's metrics: the layers training now (nothing without LISA)."""
        return {} if self.lisa is None else {"lisa_active_layers": list(self.active)}
