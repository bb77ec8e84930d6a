"""Stopping early without losing work: a signal asks the run to save and end, and the next launch continues.

Who asks. SLURM sends SIGUSR2 to the batch shell ``signal_lead_s`` seconds ahead of a time limit or on
preemption (job.sbatch's ``--signal=B:USR2@…``; not USR1, which NCCL uses); the batch shell forwards it to
every node's task. ``scontrol requeue`` and ``scancel`` end a job with SIGTERM. In a terminal, Ctrl-C is
SIGINT. Each of these reaches a rank one of two ways, and either is enough:

- directly: SLURM signals every process of a job step, and a process-group signal reaches a rank that
  shares launch.sh's group. The handler here only sets a flag; it never raises, so a second signal (while
  the checkpoint is being written, say) changes nothing and cannot leave a checkpoint half-written.
- through ``TUNEFILE_STOP_FILE``: launch.sh traps the signal and creates that file. torch elastic starts
  each rank in a session of its own, out of reach of launch.sh's process group, and launch.sh does not
  know the ranks' process ids; a file every rank of the node can see needs neither.

What the trainer does (``Trainer.run``): at every step boundary each rank reads its flag and the ranks agree
with one all-reduce (any rank asked → every rank stops, at the same step), so the step in flight is finished,
never abandoned. Then it writes a complete checkpoint with the usual checkpoint code, marks it
``STOPPED_EARLY``, logs one line and exits with ``EXIT_STOPPED_EARLY`` (75, EX_TEMPFAIL: "stopped early and
saved: run again to continue"), which it also writes to ``TUNEFILE_EXIT_STATUS_FILE`` for launch.sh, as the
runtime's other statuses (runtime/errors.py). job.sbatch requeues the job on 75; the restart resumes from that
checkpoint even when the config has ``auto_resume_from_checkpoints: false`` (checkpoint.find_resume_checkpoint).
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

EXIT_STOPPED_EARLY = 75  # EX_TEMPFAIL from sysexits.h: stopped early and saved; run again to continue
STOP_FILE = "TUNEFILE_STOP_FILE"  # set by launch.sh; the file's existence asks the run to stop
EXIT_STATUS_FILE = "TUNEFILE_EXIT_STATUS_FILE"  # set by launch.sh; the runtime's own exit status goes there
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """This process's wish to stop, from a signal or launch.sh's stop file; ``agreed`` turns it into every
    rank's decision. ``install`` replaces the handlers of STOP_SIGNALS; ``uninstall`` puts them back."""

    def __init__(self, stop_file: str | None = None) -> None:
        self.stop_file = stop_file if stop_file is not None else os.environ.get(STOP_FILE) or None
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        # Only async-signal-safe work here: a flag and os.write (logging takes locks the interrupted code may hold).
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            return
        os.write(2, f"tunefile runtime: {name} again: already stopping; the checkpoint is being finished, "
                    "not abandoned (SIGKILL ends the process at once)\n".encode())

    @property
    def requested(self) -> bool:
        """Whether this process was asked to stop (no collective)."""
        if self.signal_name is None and self.stop_file and os.path.exists(self.stop_file):
            self.signal_name = "a signal to launch.sh"
        return self.signal_name is not None

    def agreed(self, accelerator: Any) -> bool:
        """Collective, at a step boundary: whether any rank was asked to stop. Every rank gets the same answer,
        so every rank stops after the same step."""
        local = self.requested
        if accelerator.num_processes == 1:
            return local
        import torch

        flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def process_exit_code() -> int:
    """What a stopped rank's process exits with: 75, except under torch elastic (multi-process launches) when
    launch.sh is listening. There the rank exits 0: the agent sees every rank end cleanly (a non-zero exit would
    make it stop the other ranks during their teardown and report a failure), and launch.sh takes 75 from
    TUNEFILE_EXIT_STATUS_FILE (written by write_exit_status), as it reads every status the runtime writes."""
    if os.environ.get("TORCHELASTIC_RUN_ID") and os.environ.get(EXIT_STATUS_FILE):
        return 0
    return EXIT_STOPPED_EARLY


def write_exit_status(code: int) -> None:
    """The status for launch.sh (accelerate launch reports any failed rank as 1), as report_user_error does."""
    status_file = os.environ.get(EXIT_STATUS_FILE)
    if status_file:
        try:
            with open(status_file, "w", encoding="utf-8") as out:
                out.write(f"{code}\n")
        except OSError:
            pass  # a courtesy to launch.sh; the process's own exit code still tells


def exit_status_written() -> bool:
    """Whether a rank has left its status for launch.sh (write_exit_status); launch.sh creates the file empty."""
    status_file = os.environ.get(EXIT_STATUS_FILE)
    try:
        return bool(status_file) and os.path.getsize(status_file) > 0
    except OSError:
        return False
