"""The MoE router's auxiliary (load-balancing) loss, added to the training loss when the model returns one.

Mixtral, Qwen-MoE and their kin return ``aux_loss`` when their configuration has output_router_logits (set it
with Axolotl's model_config), and transformers' own loss is then ``mean token loss + router_aux_loss_coef ×
aux_loss``. tunefile's loss is not a mean per batch: each micro-batch contributes the SUM of its token losses
divided by the label tokens of the whole optimizer step, all ranks (losses.py). The aux term is given the weight
that makes the step's objective gain ``coef × (the mean of the aux losses of the step's micro-batches, over all
ranks)``:

- that is exactly what transformers adds for a step of one batch, and it does not change with accumulation,
  micro-batch size or the number of processes;
- weighting it per label token instead would make the router's pull depend on padding, packing and how many
  tokens a step happens to train, which says nothing about how balanced the routing is.

The loss the run logs and the watchdog judges stays the token loss alone, so it compares across configs; the aux
term only adds its gradients. The term is caught by a forward hook on the transformers model, so it is found
whichever way the loss is computed (the plain logits or a fused kernel that calls the same forward).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .errors import RuntimeUserError

log = logging.getLogger(__name__)


class RouterLossError(RuntimeUserError):
    """The model returns a router aux loss the plan cannot weigh."""


def aux_loss_weight(*, accumulation: int, micro_batches: int) -> float:
    """The factor on ``coef × aux_loss`` in one micro-batch's backward.

    accelerate (and DeepSpeed's engine) divide every backward by ``accumulation``, and data parallelism
    averages the gradients over the ``world`` ranks, each of which runs ``micro_batches`` micro-batches this
    step (the same number on every rank; fewer than ``accumulation`` at the end of an epoch). With a weight w,
    the step's gradient is coef · w / (accumulation · world) · Σ aux, and the mean over the step's
    micro_batches · world micro-batches needs w = accumulation / micro_batches."""
    return accumulation / micro_batches


def transformers_model(model: nn.Module) -> nn.Module | None:
    """The outermost transformers model inside ``model`` (peft and the distributed wrappers hold it), whose
    output carries ``aux_loss``; None for anything else."""
    from transformers import PreTrainedModel

    return next((module for module in model.modules() if isinstance(module, PreTrainedModel)), None)


class RouterAuxLoss:
    """Catches ``aux_loss`` from each training forward of the model and turns it into the micro-batch's term."""

    def __init__(self, model: nn.Module) -> None:
        target = transformers_model(model)
        self.config = getattr(target, "config", None)
        self.caught: torch.Tensor | None = None
        if target is not None:
            target.register_forward_hook(self._catch)

    def _catch(self, module: nn.Module, args: Any, output: Any) -> None:
        # Evaluation runs the same forward: only training forwards count.
        if module.training:
            self.caught = getattr(output, "aux_loss", None)

    def term(self, *, accumulation: int, micro_batches: int) -> torch.Tensor | float:
        """The weighted aux loss of the forward just run (0 when the model returned none), for its backward."""
        aux, self.caught = self.caught, None
        if aux is None:
            return 0.0
        coef = getattr(self.config, "router_aux_loss_coef", None)
        if not isinstance(coef, (int, float)) or isinstance(coef, bool):
            raise RouterLossError(f"the model returns a router aux loss (output_router_logits), but its "
                                  f"configuration has no router_aux_loss_coef to weigh it with ({coef!r}); set one "
                                  "under model_config")
        return aux * (coef * aux_loss_weight(accumulation=accumulation, micro_batches=micro_batches))
