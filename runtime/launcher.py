"""`python -m tunefile.runtime.launcher ARGS...`: `accelerate launch ARGS...`, whose own failure is one line.

launch.sh starts training through this module rather than the `accelerate` command. The launch is accelerate's
own (same parser, same launchers, same environment for the ranks); what differs is how a failed rank is reported.
`accelerate launch` ends a failed run with a Python traceback of its own: torch elastic's ChildFailedError with two
or more processes, CalledProcessError with one. That traceback says nothing the ranks have not said, and it buries
the runtime's one-line message for a problem in the config or data. Here:

- a rank that failed after writing its status to $TUNEFILE_EXIT_STATUS_FILE (a user error, the watchdog, a stop)
  has said what went wrong: the launcher adds nothing and exits 1; launch.sh exits with the status in the file;
- any other failure (a crash, whose traceback the rank printed itself) gets one line naming the rank, its host
  and exit code, and exit 1;
- anything else accelerate raises (a bug in a launcher, not in a rank) keeps its traceback.

The ranks run in this Python (torch elastic starts them with sys.executable), so launch.sh starts this module in
the interpreter of the `accelerate` command (see launch.sh).
"""

from __future__ import annotations

import subprocess
import sys

from .preemption import exit_status_written


def describe_child_failure(error: BaseException) -> str:
    """One line for torch elastic's ChildFailedError: the first rank that failed on this node, and how."""
    import signal
    import socket

    failures = getattr(error, "failures", {}) or {}
    if not failures:
        return f"tunefile launcher: a rank on {socket.gethostname()} failed"
    rank = min(failures, key=lambda r: failures[r].timestamp)
    failure = failures[rank]
    if failure.exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-failure.exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-failure.exitcode}"
    else:
        how = f"exited with code {failure.exitcode}"
    others = len(failures) - 1
    also = f" (and {others} more rank{'s' if others > 1 else ''})" if others else ""
    return (f"tunefile launcher: rank {rank} (local rank {failure.local_rank}) on {socket.gethostname()} {how}{also}; "
            f"its own output above says why")


def main(argv: list[str] | None = None) -> int:
    try:
        from accelerate.commands.launch import launch_command, launch_command_parser
    except ImportError as error:
        print(f"tunefile launcher: accelerate cannot be imported in {sys.executable} ({error}); install it there, "
              f"or set TUNEFILE_PYTHON to the Python that has it", file=sys.stderr)
        return 2
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as error:
        if not exit_status_written():
            print(describe_child_failure(error), file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as error:
        if not exit_status_written():
            print(f"tunefile launcher: the training process exited with code {error.returncode}; its own output "
                  f"above says why", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
