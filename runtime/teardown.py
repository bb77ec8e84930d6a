"""The last thing a training rank does with its process group: `finish_distributed(accelerator)`, called by the
trainer instead of accelerator.end_training(), after the final save and the summary, right before the process
ends through runtime/__main__.py leave_now (os._exit).

What hung. tests/test_runtime_distributed.py::test_fsdp2_on_cpu_runs_unsharded_because_accelerate_has_no_cpu_fsdp
hung twice in CI with both ranks alive and idle after train_summary.json was written: the launch did not end
within the test's 300 s, and subprocess.run's timeout killed only `accelerate launch`, leaving the ranks (torch
elastic starts each in a session of its own; tests/helpers.py run_process_tree now kills them too).

What the end of a 2-rank CPU run does (accelerate 1.15, torch 2.13, gloo; the FSDP plugin is dropped on CPU, so
it is MULTI_CPU and the model is wrapped in DDP):
- accelerator.end_training() finishes the trackers and calls torch.distributed.destroy_process_group(). On gloo
  that is bookkeeping only: ProcessGroupGloo has no shutdown or abort (libtorch_cpu exports none) and DDP still
  holds the group, so no destructor runs either. Measured: 0.000 s on both ranks; save_final_model 2.6 s, the
  digest gather 0.003-0.02 s. It is not a place a rank can wait for its peer.
- Nothing synchronises the ranks after the gather: rank 1 leaves while rank 0 still writes the summary, and the
  ranks' last moments overlap with nothing holding them together or bounding them.
The hang did not reproduce here on 2 cores: 80 launches of the test's bundle (idle, loaded, pinned to one core),
10 more through pytest as CI runs it, 26 of a 2-rank DDP probe of the same teardown. Where the CI ranks sat is
not known; the report gives only the shape: ranks idle, not working, after the last collective, i.e. waiting on
something with no bound of its own short of gloo's 30-minute collective timeout. The interim version of this
function, a gloo barrier (accelerator.wait_for_everyone), adds one such wait: a barrier is a collective, so it
waits 30 minutes for a rank that is elsewhere and pairs with whatever collective that rank issues instead.

What this does instead, so that every rank leaves promptly whatever the others do:
1. the trackers finish (the half of end_training that is not the process group);
2. the ranks meet at a barrier on the rendezvous store (torch elastic's store barrier, the one its agents use to
   exit together), not on the process group: it cannot pair with another rank's collective, it gives up after
   BARRIER_TIMEOUT_S, and it names the ranks that did not come. Meeting here means no rank exits while another
   still writes, so the ranks' exits are milliseconds apart;
3. the process group is left alone: the process ends next, and on NCCL destroying it is itself a collective
   abort that can wait for a peer;
4. a deadline on the rest of the process (faulthandler): a rank still alive EXIT_DEADLINE_S later writes every
   thread's stack to stderr and exits 1. An idle rank after the summary now ends within a minute, and the next
   occurrence shows where it sat (the evidence this investigation lacked).
"""

from __future__ import annotations

import faulthandler
import logging
from typing import Any

log = logging.getLogger("tunefile.runtime")

# The summary is a small JSON file the main process writes after the last collective; two minutes is far more
# than that takes, and far less than the 30 minutes a collective would wait for a rank that is not coming.
BARRIER_TIMEOUT_S = 120.0
# From the barrier to os._exit (runtime/__main__.py leave_now) is a flush of the logs; a rank still alive this
# long after is stuck, and leaves with its stacks on stderr rather than holding the job.
EXIT_DEADLINE_S = 60.0
BARRIER_KEY = "tunefile/finish_distributed"


def finish_distributed(accelerator: Any, *, barrier_timeout_s: float = BARRIER_TIMEOUT_S,
                       exit_deadline_s: float = EXIT_DEADLINE_S) -> None:
    """End the run's distributed part so that every rank can exit at once; call it instead of
    accelerator.end_training(), after the final save and the summary, right before the process ends.

    Stops the trackers (the half of end_training that is not the process group), meets the other ranks at a
    barrier on the rendezvous store with a deadline, leaves the process group as it is (the process ends next,
    see leave_now) and arms a deadline on the rest of the process."""
    for tracker in accelerator.trackers:
        tracker.finish()
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    meet_every_rank(timeout_s=barrier_timeout_s)
    # exit=True: after the deadline, write every thread's stack to stderr and _exit(1).
    faulthandler.dump_traceback_later(exit_deadline_s, exit=True)


def meet_every_rank(*, timeout_s: float) -> None:
    """Wait until every rank has checked in on the rendezvous store, or TIMEOUT_S; a timeout is logged with the
    ranks that did not come, and this rank goes on to exit. The store, unlike a collective, cannot pair this
    barrier with another rank's unrelated collective."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d
    from torch.distributed.elastic.utils.store import barrier

    store = distributed_c10d._get_default_store()
    try:
        # rank= makes a timeout name the missing ranks; finding them takes up to trace_timeout more.
        barrier(store, world_size=dist.get_world_size(), key_prefix=BARRIER_KEY, barrier_timeout=timeout_s,
                rank=dist.get_rank(), trace_timeout=min(10.0, timeout_s))
    except Exception as exc:  # noqa: BLE001 - everything is saved: a missing rank must not keep this one
        log.warning("rank %d: not every rank reached the end of training within %g s (%s); leaving anyway",
                    dist.get_rank(), timeout_s, exc)
