"""Where training metrics go: a progress line on stdout, `<output_dir>/metrics.jsonl` (one JSON object
per logged step) and TensorBoard under `<output_dir>/runs/` when tensorboard is installed.

Only the main process writes; the others get a sink that does nothing, so the loop never asks.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint: the interrupted run logged steps that are about
    to be trained again, and the file should read as one run."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


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


class MetricsSink:
    def __init__(self, output_dir: Path, *, total_steps: int, start_step: int) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / METRICS_FILE
        _truncate_after(self.path, start_step)
        self.file = self.path.open("a", encoding="utf-8")
        self.progress = Progress(total_steps, start_step)
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(output_dir / "runs"), purge_step=start_step + 1)
        except ImportError:
            log.info("tensorboard is not installed; metrics go to %s only", self.path)

    def _write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, sort_keys=True) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"train/{key}" if not key.startswith("eval") else f"eval/{key}",
                                                value, record["step"])

    def advance(self, steps: int = 1) -> None:
        self.progress.advance(steps)

    def log_train(self, record: dict[str, Any]) -> None:
        self._write(record)
        self.progress.show(record)

    def log_eval(self, record: dict[str, Any]) -> None:
        self._write(record)
        print(f"step {record['step']}  eval_loss {record['eval_loss']:.4f}", flush=True)

    def log_runtime_decisions(self, step: int, decisions: dict[str, Any]) -> None:
        """What this machine decided that the plan could not (device, attention fallback): one record."""
        self.file.write(json.dumps({"step": step, "runtime_decisions": decisions}, sort_keys=True) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.progress.close()
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


class NullSink:
    """What the non-main processes log to."""

    def advance(self, steps: int = 1) -> None: ...
    def log_train(self, record: dict[str, Any]) -> None: ...
    def log_eval(self, record: dict[str, Any]) -> None: ...
    def log_runtime_decisions(self, step: int, decisions: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def metrics_sink(output_dir: Path, *, is_main_process: bool, total_steps: int,
                 start_step: int) -> MetricsSink | NullSink:
    if not is_main_process:
        return NullSink()
    return MetricsSink(output_dir, total_steps=total_steps, start_step=start_step)
