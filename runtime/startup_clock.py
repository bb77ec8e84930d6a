"""Where a run's time to its first step goes, the wait a user pays on every launch and every resume.

The clock starts when launch.sh started (it exports TUNEFILE_LAUNCH_STARTED, seconds since the epoch), else when this
process started (Linux's /proc), else when the clock was made. Set-up marks the end of each phase; after the first
optimizer step the main process logs one line, e.g. ``first step 14.2 s after launch.sh started: launcher 3.0, imports
3.1, accelerator 0.9, tokenizer and data 1.4, model 3.8, wrapping and resume 0.8, the step 1.2``, and the same
figures go into train_summary.json (``startup``). The launcher's share ends when this rank's process started.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

LAUNCH_STARTED = "TUNEFILE_LAUNCH_STARTED"  # exported by launch.sh: `date +%s.%N` when it started


def process_age_s() -> float | None:
    """Seconds since this process started, from /proc (Linux); None where that cannot be read."""
    try:
        # Field 22 of /proc/self/stat is the start time in clock ticks after boot; the fields after the
        # command name (which may hold spaces, in parentheses) start at field 3.
        fields = Path("/proc/self/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return float(Path("/proc/uptime").read_text(encoding="ascii").split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


class StartupClock:
    def __init__(self) -> None:
        now_wall, now = time.time(), time.monotonic()
        launched = _launch_started()
        if launched is not None and 0 <= now_wall - launched < 86_400:  # a stale or foreign value is ignored
            self.since, elapsed = "launch.sh started", now_wall - launched
        else:
            age = process_age_s()
            self.since, elapsed = ("the process started", age) if age is not None else ("set-up began", 0.0)
        self.last = self.origin = now - max(elapsed, 0.0)
        self.phases: list[tuple[str, float]] = []
        self.done = False
        # From launch.sh's start, the launcher's share ends when this process started: launch.sh, the launcher
        # module, `accelerate launch` and torchrun before this rank existed; imports come after.
        age = process_age_s() if self.since == "launch.sh started" else None
        self.launcher_split = age is not None and 0 <= age <= elapsed
        if self.launcher_split:
            self.phases.append(("launcher", elapsed - age))
            self.last = now - age

    def mark_imports(self) -> None:
        """The imports before set-up have ended (with the launcher's share, where it could not be told apart)."""
        self.mark("imports" if self.launcher_split or self.since != "launch.sh started" else "launcher and imports")

    def mark(self, phase: str) -> None:
        """PHASE has just ended."""
        if self.done:
            return
        now = time.monotonic()
        self.phases.append((phase, now - self.last))
        self.last = now

    def finish(self, phase: str = "the step") -> str:
        """The first step has ended: the line to log (once)."""
        self.mark(phase)
        self.done = True
        shown = ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.phases)
        return f"first step {self.last - self.origin:.1f} s after {self.since}: {shown}"

    def record(self) -> dict[str, Any]:
        """For train_summary.json: the total and each phase, in seconds; empty before the first step."""
        if not self.done:
            return {}
        # A list of pairs, not a mapping: train_summary.json sorts its keys, and the phases read in their order.
        return {"seconds_to_first_step": round(self.last - self.origin, 3), "measured_from": self.since,
                "phases_s": [[name, round(seconds, 3)] for name, seconds in self.phases]}


def _launch_started() -> float | None:
    try:
        return float(os.environ[LAUNCH_STARTED])
    except (KeyError, ValueError):
        return None
