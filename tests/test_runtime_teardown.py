"""finish_distributed (runtime/teardown.py): two CPU ranks under torchrun, as accelerate launch starts them, each
leaving the way a training process does (finish_distributed, then os._exit). Each run is bounded by
run_process_tree, which kills every rank when one hangs."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from helpers import require_module, run_process_tree
from runtime_bundles import VENV_BIN, subprocess_env

require_module("accelerate", "make install adds it")

# One rank's life after training: a DDP step on gloo, the digest gather, the main process's summary, then
# finish_distributed and os._exit as in runtime/__main__.py leave_now. AFTER says what a rank does between
# finish_distributed and os._exit: nothing, or block (a rank idle after the summary: what hung in CI).
RANK_SCRIPT = """
import os, sys, threading, time
import torch
from accelerate import Accelerator
from tunefile.runtime.teardown import finish_distributed

accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
model = accelerator.prepare(torch.nn.Linear(4, 1))
accelerator.backward(model(torch.ones(2, 4)).sum())
digests = accelerator.gather(torch.tensor([rank])).tolist()
if accelerator.is_main_process:
    with open(sys.argv[1], "w") as summary:
        summary.write(str(digests))
started = time.monotonic()
if rank == 0 or os.environ["RANK1"] == "arrives":
    finish_distributed(accelerator, barrier_timeout_s=float(os.environ["BARRIER_S"]),
                       exit_deadline_s=float(os.environ["DEADLINE_S"]))
    print(f"rank {rank} finished in {time.monotonic() - started:.1f} s", flush=True)
else:
    time.sleep(float(os.environ["BARRIER_S"]) * 3)  # late, then gone without a word
    os._exit(0)
if os.environ["AFTER"] == "block":
    threading.Event().wait()  # stuck for good: only the exit deadline ends this process
os._exit(0)
"""


def two_ranks(tmp_path: Path, *, rank1: str = "arrives", after: str = "exit", barrier_s: float = 30,
              deadline_s: float = 30) -> tuple[str, float, int]:
    """Run RANK_SCRIPT on two ranks: their combined output, the wall time and the launcher's exit code."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT, encoding="utf-8")
    env = subprocess_env({"RANK1": rank1, "AFTER": after, "BARRIER_S": str(barrier_s), "DEADLINE_S": str(deadline_s)})
    command = [str(VENV_BIN / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", env["MASTER_PORT"], str(script), str(tmp_path / "summary.txt")]
    started = time.monotonic()
    result = run_process_tree(command, cwd=tmp_path, env=env, timeout=90)
    output = result.stdout + result.stderr
    assert (tmp_path / "summary.txt").read_text() == "[0, 1]", output
    return output, time.monotonic() - started, result.returncode


def test_both_ranks_leave_together_after_the_summary(tmp_path: Path) -> None:
    output, _, returncode = two_ranks(tmp_path)
    assert returncode == 0, output
    assert "rank 0 finished" in output and "rank 1 finished" in output, output


def test_a_rank_that_never_comes_does_not_hold_the_others(tmp_path: Path) -> None:
    """A barrier through the process group (accelerator.wait_for_everyone) would wait out the group's timeout,
    30 minutes on gloo, for a rank that is somewhere else; this one gives up after its own."""
    output, _, _ = two_ranks(tmp_path, rank1="late", barrier_s=2)
    assert "not every rank reached the end of training" in output, output
    finished = float(output.split("rank 0 finished in ")[1].split()[0])
    assert finished < 10, output


@pytest.mark.skipif(sys.platform != "linux", reason="the deadline is faulthandler's, tested where CI runs")
def test_a_rank_stuck_after_finishing_leaves_by_the_deadline_with_its_stacks(tmp_path: Path) -> None:
    """Both ranks idle after the summary is the hang CI saw; whatever holds them, the deadline ends them."""
    output, _, returncode = two_ranks(tmp_path, after="block", deadline_s=2)
    assert returncode != 0, output
    assert "Timeout (0:00:02)!" in output, output  # faulthandler's header, then every thread's stack
    assert "most recent call first" in output, output
