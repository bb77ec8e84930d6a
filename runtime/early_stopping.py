"""Axolotl's early_stopping_patience: stop when the evaluation loss has not improved for N evaluations in a row.

The evaluation loss is reduced over every rank before it reaches here, so all ranks reach the same verdict
and leave the loop together. The count starts afresh when a run resumes (it is not kept in checkpoints).
"""

from __future__ import annotations

import math


class EarlyStopping:
    def __init__(self, patience: int | None) -> None:
        self.patience = patience
        self.best = math.inf
        self.evaluations_without_improvement = 0

    def should_stop(self, eval_loss: float) -> bool:
        """Record one evaluation; True when the run should stop now."""
        if self.patience is None:
            return False
        if eval_loss < self.best:
            self.best, self.evaluations_without_improvement = eval_loss, 0
            return False
        self.evaluations_without_improvement += 1
        return self.evaluations_without_improvement >= self.patience
