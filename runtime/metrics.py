"""Where training metrics go: a progress line on stdout, `<output_dir>/metrics.jsonl` (one JSON object
per logged step, always) and the experiment trackers the plan asks for (trackers.py: TensorBoard under
`<output_dir>/runs/`, Weights & Biases, MLflow), which get the same records.

Only the main process writes; the others get a sink that does nothing, so the loop never asks.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..schemas.run_plan import TrackersPlan
from .checkpoint_integrity import free_bytes, in_words, is_disk_full
from .errors import RuntimeUserError
from .trackers import TrackerSet, open_trackers, unopened_trackers

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _record_step(line: bytes) -> int | None:
    """The step of one metrics.jsonl line; None when the line is no record (torn by a kill, or garbled)."""
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes a crash left behind
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step", 0)  # every record has one; one without counts as the run's start, as it always did
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint: the interrupted run logged steps that are about
    to be trained again, and the file should read as one run. A line that is no record (a kill mid-write tears
    the last one) is dropped too, with a warning; the file is replaced atomically, so a kill now loses nothing."""
    if not path.exists():
        return
    kept, torn = [], 0
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        line_step = _record_step(line)
        if line_step is None:
            torn += 1
        elif line_step <= step:
            kept.append(line)
    if torn:
        log.warning("%s: dropped %d line(s) that are not whole records (a run stopped while writing one)", path,
                    torn)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(b"".join(line + b"\n" for line in kept))
    os.replace(temp, path)


class Progress:
    """tqdm on a terminal; one plain line per logged step otherwise (logs, CI, tests)."""

    def __init__(self, total: int, initial: int) -> None:
        self.total = total
        self.bar = None
        if sys.stdout.isatty():
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, file=sys.stdout, dynamic_ncols=True, desc="train")
            except ImportError:
                pass

    def advance(self, steps: int) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def show(self, record: dict[str, Any]) -> None:
        text = (f"loss {record['loss']:.4f}  lr {record['lr']:.3g}  "
                f"{record['tokens_per_s']:,.0f} tok/s")
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)
        else:
            print(f"step {record['step']}/{self.total}  epoch {record['epoch']:.2f}  {text}  "
                  f"grad_norm {record['grad_norm']:.3f}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsWriteError(RuntimeUserError):
    """metrics.jsonl could not be appended to: the disk (or the user's quota) is full."""


class MetricsSink:
    def __init__(self, output_dir: Path, *, total_steps: int, start_step: int, trackers: TrackerSet) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / METRICS_FILE
        _truncate_after(self.path, start_step)
        self.file = self.path.open("a", encoding="utf-8")
        self.progress = Progress(total_steps, start_step)
        self.trackers = trackers
        self.closed = False
        self.write_failed = False

    def _append(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl, flushed. A full disk stops the run with one line: the checkpoint due next
        could not be written either, and a torn last line is what a later run's reader already skips."""
        try:
            self.file.write(json.dumps(record, sort_keys=True) + "\n")
            self.file.flush()
        except OSError as exc:
            self.write_failed = True
            if not is_disk_full(exc, self.path.parent):
                raise
            raise MetricsWriteError(
                f"no space left on the disk of {self.path.parent} while writing {METRICS_FILE} at step "
                f"{record['step']}: {in_words(free_bytes(self.path.parent))} free; free space and run again (it "
                "resumes from the newest complete checkpoint)") from None

    def _write(self, record: dict[str, Any]) -> None:
        self._append(record)
        self.trackers.log(record["step"], record)

    def advance(self, steps: int = 1) -> None:
        self.progress.advance(steps)

    def log_train(self, record: dict[str, Any]) -> None:
        self._write(record)
        self.progress.show(record)

    def log_eval(self, record: dict[str, Any]) -> None:
        self._write(record)
        print(f"step {record['step']}  eval_loss {record['eval_loss']:.4f}", flush=True)

    def log_runtime_decisions(self, step: int, decisions: dict[str, Any]) -> None:
        """What this machine decided that the plan could not (device, attention fallback): one record, and
        beside the plan in each tracker's configuration."""
        self._append({"step": step, "runtime_decisions": decisions})
        self.trackers.log_config({"runtime_decisions": decisions})

    def tracker_decisions(self) -> dict[str, Any]:
        """The runtime decisions' entry for the trackers: {"trackers": {name: "on" or why it is off}} for each
        one the plan asks for (its package may be missing here); nothing when it asks for none."""
        return {"trackers": dict(self.trackers.decisions)} if self.trackers.decisions else {}

    def close(self, model_dir: Path | None = None, *, failed: bool = False) -> None:
        """``model_dir``: the saved final model, which wandb uploads when the plan says log_model. Closing twice
        is harmless (a failure after teardown began closes again, as failed)."""
        if self.closed:
            return
        self.closed = True
        self.progress.close()
        try:
            self.file.close()
        except OSError:
            if not self.write_failed:
                raise
            # else: the buffered rest of a write that already failed, which was reported then
        self.trackers.finish(model_dir, failed=failed)


class NullSink:
    """What the non-main processes log to."""

    def advance(self, steps: int = 1) -> None: ...
    def log_train(self, record: dict[str, Any]) -> None: ...
    def log_eval(self, record: dict[str, Any]) -> None: ...
    def log_runtime_decisions(self, step: int, decisions: dict[str, Any]) -> None: ...
    def close(self, model_dir: Path | None = None, *, failed: bool = False) -> None: ...

    def tracker_decisions(self) -> dict[str, Any]:
        return {}


def metrics_sink(output_dir: Path, *, is_main_process: bool, total_steps: int, start_step: int,
                 trackers: TrackersPlan, offline: bool, run_config: dict[str, Any]) -> MetricsSink | NullSink:
    """``run_config``: the whole plan as plain data, which each tracker records as the run's configuration."""
    if not is_main_process:
        return NullSink()
    output_dir.mkdir(parents=True, exist_ok=True)  # wandb and TensorBoard write under it from the start
    if start_step < total_steps:
        opened = open_trackers(trackers, output_dir=output_dir, start_step=start_step, offline=offline,
                               run_config=run_config)
    else:  # a finished run launched again trains and records nothing: no empty tracker runs either
        opened = unopened_trackers(trackers, "the run had already finished")
    return MetricsSink(output_dir, total_steps=total_steps, start_step=start_step, trackers=opened)
