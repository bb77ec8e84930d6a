"""Profiles a few training steps of a tunefile rank, for bench/zero3_one_process_smoke.py --profile-dir.

Put this folder first on PYTHONPATH and set TUNEFILE_STEP_PROFILE_DIR: every Python that starts then loads this
file (Python's ``sitecustomize`` hook). In a rank of the runtime it wraps ``Trainer.train_step`` once the trainer
module is imported, and writes, per rank, into that folder:

- ``torch_profile_rankR.txt``: torch.profiler over steps FIRST..FIRST+2 (CPU and CUDA), the operators by self
  CPU time and by CUDA time, and how much of the wall time the GPU was busy;
- ``cprofile_rankR.txt``: cProfile over the three steps after those, functions by own and cumulative time.

Written when the last profiled step ends (the runtime leaves through os._exit, so nothing waits for exit).
TUNEFILE_STEP_PROFILE_FIRST sets FIRST (default 8: after the warm-up steps).

TUNEFILE_PROTO_FROZEN_BUFFERS=1 (a prototype, measured before it was built into the runtime): just before
accelerate's prepare, every frozen parameter becomes a buffer, so that DeepSpeed ZeRO-3 leaves it whole and out
of its partitioning. Needs a model loaded whole (accelerate's zero3_init_flag off).
"""

from __future__ import annotations

import os
import sys
import threading

_FOLDER = os.environ.get("TUNEFILE_STEP_PROFILE_DIR")
_FROZEN_BUFFERS = os.environ.get("TUNEFILE_PROTO_FROZEN_BUFFERS") == "1"


def _frozen_to_buffers(model) -> int:  # noqa: ANN001
    """Every frozen parameter of MODEL becomes a non-persistent buffer of the same tensor (tied ones stay tied)."""
    tensors: dict[int, object] = {}
    count = 0
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.requires_grad:
                continue
            if id(param) not in tensors:
                import torch

                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                tensors[id(param)] = param.detach().to(device)
            tensor = tensors[id(param)]
            del module._parameters[name]
            module.register_buffer(name, tensor, persistent=False)
            count += 1
    return count


def _wrap_gathering(train_module) -> None:  # noqa: ANN001
    plain = train_module.gather_layers_whole

    def gather_layers_whole(model, layer_class):  # noqa: ANN001, ANN202
        flagged = plain(model, layer_class)
        print(f"prototype: {_frozen_to_buffers(model)} frozen parameters are buffers now", flush=True)
        return flagged

    train_module.gather_layers_whole = gather_layers_whole
    plain_load = train_module.load_model

    def load_model(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        from accelerate.state import AcceleratorState
        from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # transformers loads under zero.Init while accelerate's config is set
        try:
            return plain_load(*args, **kwargs)
        finally:
            set_hf_deepspeed_config(AcceleratorState().deepspeed_plugin.dschf)

    train_module.load_model = load_model


def _wrap(trainer_class: type) -> None:
    import cProfile
    import io
    import pstats
    import time

    import torch

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
            busy_us = sum(e.self_device_time_total for e in events)
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
            if _FOLDER:
                _wrap(module.Trainer)
            if _FROZEN_BUFFERS:
                _wrap_gathering(module)
            return
        time.sleep(0.05)


if _FOLDER or _FROZEN_BUFFERS:  # every Python started so; the thread ends once a runtime rank imports its trainer
    threading.Thread(target=_watch, daemon=True).start()
