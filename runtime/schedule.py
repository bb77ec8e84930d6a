"""When things happen in the loop: which micro-batches make an optimizer step, and at which steps to
log, evaluate and save. Pure functions of the config and the data plan, so a resumed run makes the
same decisions as an uninterrupted one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..schemas.run_plan import CheckpointPlan, SchedulePlan

MicroBatch = list[list[int]]  # rows of sample indices (several per row when packing)


def optimizer_steps(plan_for_epoch: Callable[[int], list[MicroBatch]], *, epoch: int, micro_batch: int,
                    accumulation: int) -> Iterator[tuple[int, int, list[MicroBatch]]]:
    """(epoch, index of the group's first micro-batch, the group) from a position on, epoch after
    epoch. A trailing group shorter than `accumulation` is still a step: the loss is normalised by
    the tokens actually in the step, so it stays exact."""
    start = micro_batch
    while True:
        plan = plan_for_epoch(epoch)
        for index in range(start, len(plan), accumulation):
            yield epoch, index, plan[index:index + accumulation]
        epoch, start = epoch + 1, 0


def steps_in(plan: list[MicroBatch], accumulation: int) -> int:
    return -(-len(plan) // accumulation)


def _every(value: float | int | None, *, per_epoch: int | None, steps_per_epoch: int,
           total_steps: int) -> int | None:
    """A step interval from `x_steps` (an int, or a fraction of the whole run as Axolotl allows) or
    `x_per_epoch`; None when neither is set (the plan sets at most one)."""
    if value is not None:
        return max(1, round(value * total_steps) if value < 1 else int(value))
    if per_epoch is not None:
        return max(1, steps_per_epoch // per_epoch)
    return None


@dataclass(frozen=True)
class Cadence:
    logging_steps: int
    eval_steps: int | None
    save_steps: int | None

    @classmethod
    def from_plan(cls, schedule: SchedulePlan, checkpointing: CheckpointPlan, *, steps_per_epoch: int,
                  total_steps: int, has_eval: bool) -> Cadence:
        eval_steps = _every(schedule.eval_steps, per_epoch=schedule.evals_per_epoch, steps_per_epoch=steps_per_epoch,
                            total_steps=total_steps)
        if has_eval and eval_steps is None:
            eval_steps = steps_per_epoch  # a validation split nobody looks at is a waste: once per epoch
        save_steps = _every(checkpointing.save_steps, per_epoch=checkpointing.saves_per_epoch,
                            steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        return cls(logging_steps=schedule.logging_steps, eval_steps=eval_steps if has_eval else None,
                   save_steps=save_steps)

    def log_now(self, step: int, total_steps: int) -> bool:
        return step % self.logging_steps == 0 or step == total_steps

    def eval_now(self, step: int, total_steps: int) -> bool:
        return self.eval_steps is not None and (step % self.eval_steps == 0 or step == total_steps)

    def save_now(self, step: int, total_steps: int) -> bool:
        # The last step always saves: re-running a finished bundle resumes there and does nothing.
        return step == total_steps or (self.save_steps is not None and step % self.save_steps == 0)
