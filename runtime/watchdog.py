"""The loss and gradient watchdog: a run that has gone numerically wrong stops before it does harm.

Always on. Each optimizer step, before the optimizer applies the gradients, the trainer hands the step's
loss (over all ranks) and gradient norm here:

- a non-finite loss or gradient norm stops the run at once: the optimizer never applies it, and nothing is
  saved afterwards, so no checkpoint or final model holds poisoned weights;
- with ``loss_watchdog_threshold`` (Axolotl's key), a loss above the threshold for
  ``loss_watchdog_patience`` steps in a row stops the run too (learning has broken down).

The stop is a ``WatchdogStop``: one line naming the step, the values, and the dataset files and rows of
the step's micro-batches, and its own exit code (3), distinct from a config error (2) or a crash (1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..schemas.run_plan import WatchdogPlan
from .errors import EXIT_WATCHDOG, RuntimeUserError


class WatchdogStop(RuntimeUserError):
    """The watchdog stopped the run; nothing was applied or saved after the step it names."""

    exit_code = EXIT_WATCHDOG
    same_on_every_rank = True  # the values judged are global: rank 0 alone prints the line


@dataclass(frozen=True)
class Alarm:
    """Why the watchdog wants the run stopped (without the rows, which only the trainer knows)."""

    step: int
    reason: str

    def stop(self, rows: str) -> WatchdogStop:
        return WatchdogStop(f"watchdog: step {self.step}: {self.reason}; the optimizer did not apply this step "
                            f"and nothing was saved. The step's micro-batches: {rows}")


class Watchdog:
    def __init__(self, plan: WatchdogPlan) -> None:
        self.threshold = plan.loss_threshold
        self.patience = plan.loss_patience
        self.high_steps = 0  # consecutive steps above the threshold

    def check(self, step: int, loss: float, grad_norm: float | None) -> Alarm | None:
        """The verdict on one step, before its update is applied. ``grad_norm`` None: not measurable yet
        (DeepSpeed measures it inside its own step; the trainer checks it right after)."""
        if not math.isfinite(loss):
            return Alarm(step, f"the loss is {loss}" + (f" (gradient norm {grad_norm:g})" if grad_norm is not None
                                                        else ""))
        if grad_norm is not None and not math.isfinite(grad_norm):
            return Alarm(step, f"the gradient norm is {grad_norm} (loss {loss:.4f})")
        if self.threshold is None:
            return None
        self.high_steps = self.high_steps + 1 if loss > self.threshold else 0
        if self.high_steps >= self.patience:
            return Alarm(step, f"the loss ({loss:.4f}) stayed above loss_watchdog_threshold {self.threshold:g} for "
                               f"{self.high_steps} steps in a row (loss_watchdog_patience {self.patience})")
        return None
