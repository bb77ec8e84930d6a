"""A one-process gloo group in this test process, with DeepSpeed on its CPU accelerator: where DeepSpeed's engines
(ZeRO-2, ZeRO-3) are built and stepped on a machine without a GPU."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Iterator

import pytest
import torch


@contextlib.contextmanager
def one_process_group() -> Iterator[None]:
    """A 1-process gloo group, accelerate's state (its logging wants one) and DeepSpeed on its CPU accelerator;
    all undone afterwards so the rest of the session sees none of it."""
    import torch.distributed as dist
    from accelerate import PartialState

    with pytest.MonkeyPatch.context() as patch:
        # OMP_NUM_THREADS: else accelerate's state sets it (and the thread count) for the rest of the session.
        for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                            "OMP_NUM_THREADS": str(torch.get_num_threads())}.items():
            patch.setenv(name, value)
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
        PartialState(cpu=True)
        try:
            if "deepspeed" in sys.modules or importable("deepspeed"):
                from deepspeed import accelerator as ds_accelerator
                from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
                ds_torch_comm = importlib.import_module("deepspeed.comm.torch")

                previous = ds_accelerator.get_accelerator()
                ds_accelerator.set_accelerator(CPU_Accelerator())
                # DeepSpeed keeps its communication backend and its process groups in module globals: each group
                # here starts from none and leaves them as they were (else a second group in the session meets the
                # first one's groups, destroyed with it).
                ds_comm = importlib.import_module("deepspeed.comm.comm")
                ds_groups = importlib.import_module("deepspeed.utils.groups")
                patch.setattr(ds_comm, "cdb", None)
                for name, value in list(vars(ds_groups).items()):
                    if name == "mpu" or (name.startswith("_") and name.endswith("_GROUP")) or \
                            (name.startswith("_") and name.endswith(("_GROUP_RANKS", "_WORLD_SIZE", "_RANK"))):
                        patch.setattr(ds_groups, name, {} if isinstance(value, dict) else None)
                # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU ranks (~40 s the first time); gloo
                # alone serves one process.
                patch.setattr(ds_torch_comm, "build_shm_op", lambda: None)
                try:
                    yield
                finally:
                    ds_accelerator.set_accelerator(previous)
            else:
                yield
        finally:
            dist.destroy_process_group()
            PartialState._reset_state()


def importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None
