"""Axolotl's stock DeepSpeed files (its ``deepspeed_configs/`` folder), by file name.

Axolotl configs name these files (``deepspeed: deepspeed_configs/zero2.json``), which live in Axolotl's
repository, not beside the user's config. When the named file is absent, tunefile compiles exactly what
Axolotl's file of that name holds (Axolotl version in axolotl_keys.json), "auto" values and all, and fills
the "auto"s as it does for any DeepSpeed JSON. Note what the names do not say: ``zero2.json`` offloads the
optimizer state to the CPU, and ``zero3_bf16_cpuoffload_params.json`` offloads the parameters only.
tests/test_axolotl_dialect.py compares every entry with the file in Axolotl's source release.
"""

from __future__ import annotations

import copy
from typing import Any

_BATCH_AUTO = {"gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
               "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False}
_MIXED_AUTO = {"bf16": {"enabled": "auto"},
               "fp16": {"enabled": "auto", "auto_cast": False, "loss_scale": 0, "initial_scale_power": 32,
                        "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}}
_ZERO3 = {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 0,
          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
          "stage3_param_persistence_threshold": "auto", "max_live_parameters": 0, "max_reuse_distance": 0,
          "gather_16bit_weights_on_model_save": True}
_CPU_PINNED = {"device": "cpu", "pin_memory": True}
_COMPILE = {"compile": {"disable": False, "backend": "inductor"}}


def _config(*parts: dict[str, Any], zero: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for part in parts:
        config.update(copy.deepcopy(part))
    config["zero_optimization"] = copy.deepcopy(zero)
    return config


_ZERO1 = {"stage": 1, "overlap_comm": True}
_ZERO2 = {"stage": 2, "offload_optimizer": {"device": "cpu"}, "contiguous_gradients": True, "overlap_comm": True}
_OFFLOAD_FLAGS = {"zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}

STOCK_DEEPSPEED: dict[str, dict[str, Any]] = {
    "zero1.json": _config(_MIXED_AUTO, _BATCH_AUTO, zero=_ZERO1),
    "zero1_torch_compile.json": _config(_COMPILE, _MIXED_AUTO, _BATCH_AUTO, zero=_ZERO1),
    "zero2.json": _config(_MIXED_AUTO, _BATCH_AUTO, zero=_ZERO2),
    "zero2_torch_compile.json": _config(_COMPILE, _MIXED_AUTO, _BATCH_AUTO, zero=_ZERO2),
    "zero3.json": _config(_MIXED_AUTO, _BATCH_AUTO, zero=_ZERO3),
    "zero3_bf16.json": _config({"bf16": {"enabled": True}}, _BATCH_AUTO, zero=_ZERO3),
    "zero3_bf16_cpuoffload_all.json": _config(
        {"bf16": {"enabled": True}}, _BATCH_AUTO, _OFFLOAD_FLAGS,
        zero={**_ZERO3, "offload_optimizer": _CPU_PINNED, "offload_param": _CPU_PINNED}),
    "zero3_bf16_cpuoffload_params.json": _config(
        {"bf16": {"enabled": True}}, _BATCH_AUTO, _OFFLOAD_FLAGS, zero={**_ZERO3, "offload_param": _CPU_PINNED}),
}


def stock_deepspeed(name: str) -> dict[str, Any] | None:
    """A fresh copy of the stock file called ``name`` (its base name), or None."""
    config = STOCK_DEEPSPEED.get(name)
    return copy.deepcopy(config) if config is not None else None
