"""Profiles a few training steps of a tunefile rank, for bench/zero3_one_process_smoke.py --profile-dir.

Put this folder first on PYTHONPATH and set TUNEFILE_STEP_PROFILE_DIR: every Python that starts then loads this
file (Python's ``sitecustomize`` hook). In a rank of the runtime it wraps ``Trainer.train_step`` once the trainer
module is imported, and writes, per rank, into that folder:

- ``torch_profile_rankR.txt``: torch.profiler over steps FIRST..FIRST+2 (CPU and CUDA), the operators by self
  CPU time and by CUDA time, and how much of the wall time the GPU was busy;
- ``cprofile_rankR.txt``: cProfile over the three steps after those, functions by own and cumulative time.

Written when the last profiled step ends (the runtime leaves through os._exit, so nothing waits for exit).
TUNEFILE_STEP_PROFILE_FIRST sets FIRST (default 8: after the warm-up steps).
"""

from __future__ import annotations

import os
import sys
import threading

_FOLDER = os.environ.get("TUNEFILE_STEP_PROFILE_DIR")


def _wrap(trainer_class: type) -> None:
    import cProfile
    import io
    import pstats
    import time

    import torch
    from torch.autograd import DeviceType

    first = int(os.environ.get("TUNEFILE_STEP_PROFILE_FIRST", "8"))
    rank = os.environ.get("RANK", "0")
    plain_step = trainer_class.train_step
    state: dict = {}

    def _synchronize() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def write(name: str, text: str) -> None:
        with open(os.path.join(_FOLDER, f"{name}_rank{rank}.txt"), "w", encoding="utf-8") as out:
            out.write(text)

    def train_step(self, step, group):  # noqa: ANN001, ANN202 (the wrapped method's own signature)
        if step == first:
            _synchronize()
            state["torch"] = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU]
                + [torch.profiler.ProfilerActivity.CUDA] * torch.cuda.is_available())
            state["torch"].__enter__()
            state["started"] = time.perf_counter()
        if step == first + 3:
            state["cprofile"] = cProfile.Profile()
            state["started"] = time.perf_counter()
            state["cprofile"].enable()
        result = plain_step(self, step, group)
        if step == first + 2:
            _synchronize()
            wall = time.perf_counter() - state["started"]
            profile = state.pop("torch")
            profile.__exit__(None, None, None)
            events = profile.key_averages()
            # The kernels' own rows: an operator's row carries its kernels' time again.
            busy_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
            tables = []
            for order in ("self_cpu_time_total", "self_device_time_total"):
                try:
                    tables.append(events.table(sort_by=order, row_limit=40))
                except (AttributeError, KeyError, ValueError) as exc:  # a torch that names its columns otherwise
                    tables.append(f"(no table by {order}: {exc})")
            text = (f"steps {first}..{first + 2}: wall {wall * 1e3:.1f} ms, GPU kernels {busy_us / 1e3:.1f} ms "
                    f"({busy_us / 1e4 / wall:.1f} % of wall)\n\n" + "\n\n".join(tables))
            write("torch_profile", text)
        if step == first + 5:
            _synchronize()
            wall = time.perf_counter() - state["started"]
            profile = state.pop("cprofile")
            profile.disable()
            text = io.StringIO()
            text.write(f"steps {first + 3}..{first + 5}: wall {wall * 1e3:.1f} ms (under cProfile)\n\n")
            for order in ("tottime", "cumulative"):
                pstats.Stats(profile, stream=text).sort_stats(order).print_stats(45)
            write("cprofile", text.getvalue())
        return result

    trainer_class.train_step = train_step


def _watch() -> None:
    """Wraps the Trainer as soon as its module is imported (polled: the import happens once, early)."""
    import time

    while True:
        module = sys.modules.get("tunefile.runtime.train")
        if module is not None and hasattr(module, "Trainer"):
            _wrap(module.Trainer)
            return
        time.sleep(0.05)


if _FOLDER:  # every Python started with it set; the thread ends once a runtime rank imports its trainer
    threading.Thread(target=_watch, daemon=True).start()
