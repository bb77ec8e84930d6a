"""DeepSpeed configs: built-in ZeRO presets or the user's JSON, always made concrete.

Hugging Face's example configs leave many values as "auto" for the trainer to fill at launch. A
reviewer cannot check "auto", so the bundle's deepspeed.json carries the numbers the run will use;
any "auto" we cannot fill is an error naming its key.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from ..errors import Problem
from ..models import ModelShape, layer_class_for
from ..plan import BatchPlan, Decision, DistributionPlan, MemoryEstimate, ModelInfo

BUILTIN_PRESETS: dict[str, tuple[int, bool, bool]] = {
    # name: (stage, offload optimizer state to CPU, offload parameters to CPU)
    "zero1": (1, False, False),
    "zero2": (2, False, False),
    "zero2_offload": (2, True, False),
    "zero3": (3, False, False),
    "zero3_offload": (3, True, True),
}
# DeepSpeed's own defaults, used when the model's hidden size is unknown.
_DEFAULT_BUCKET = 500_000_000
_DEFAULT_PREFETCH = 50_000_000
_DEFAULT_PERSISTENCE = 100_000


def _bucket_sizes(shape: ModelShape | None) -> dict[str, int]:
    """The sizes the HF integration derives from hidden_size when a config says "auto"."""
    if shape is None:
        return {"reduce_bucket_size": _DEFAULT_BUCKET, "stage3_prefetch_bucket_size": _DEFAULT_PREFETCH,
                "stage3_param_persistence_threshold": _DEFAULT_PERSISTENCE}
    h = shape.hidden_size
    return {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
            "stage3_param_persistence_threshold": 10 * h}


def _batch_and_precision(batch: BatchPlan, precision: str, max_grad_norm: float) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_batch_size": batch.effective_batch_size,
        "train_micro_batch_size_per_gpu": batch.micro_batch_size,
        "gradient_accumulation_steps": batch.gradient_accumulation_steps,
        "gradient_clipping": max_grad_norm,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    if precision == "fp16":
        config["fp16"].update({"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                               "hysteresis": 2, "min_loss_scale": 1})
    return config


def builtin_config(name: str, *, batch: BatchPlan, precision: str, max_grad_norm: float,
                   shape: ModelShape | None) -> dict[str, Any]:
    stage, offload_optimizer, offload_params = BUILTIN_PRESETS[name]
    buckets = _bucket_sizes(shape)
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": buckets["reduce_bucket_size"]}
    if stage in (1, 2):
        zero.update({"allgather_partitions": True, "allgather_bucket_size": _DEFAULT_BUCKET, "reduce_scatter": True})
    if stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": buckets["stage3_prefetch_bucket_size"],
            "stage3_param_persistence_threshold": buckets["stage3_param_persistence_threshold"],
            "stage3_max_live_parameters": 1_000_000_000,
            "stage3_max_reuse_distance": 1_000_000_000,
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = _batch_and_precision(batch, precision, max_grad_norm)
    config.update({
        "zero_optimization": zero,
        # The runtime builds the optimizer from `optimizer:`; let ZeRO wrap it (and bitsandbytes ones).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    })
    if offload_optimizer:
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def concretize_user_config(
    user: dict[str, Any], *, file: str, batch: BatchPlan, precision: str, max_grad_norm: float,
    shape: ModelShape | None,
) -> tuple[dict[str, Any], list[Problem]]:
    """Fill "auto" values of a user's DeepSpeed JSON; report conflicts with the YAML and leftovers."""
    problems = structure_problems(user, file=file)
    if problems:  # the rest reads these sections as what DeepSpeed expects them to be
        return {}, problems
    config = _deep_copy(user)
    for section in ("optimizer", "scheduler"):
        if section in config:
            problems.append(Problem((section,), f"the `{section}` section is not used: tunefile builds it from "
                                    f"the config's {'optimizer' if section == 'optimizer' else 'lr_scheduler'}",
                                    hint=f"remove the `{section}` block from the JSON", at_key=True, file=file))
    wanted = _batch_and_precision(batch, precision, max_grad_norm)
    from_yaml = {"train_batch_size": "micro_batch_size × gradient_accumulation_steps × GPUs",
                 "train_micro_batch_size_per_gpu": "micro_batch_size",
                 "gradient_accumulation_steps": "gradient_accumulation_steps",
                 "gradient_clipping": "max_grad_norm"}
    for key, source in from_yaml.items():
        given = config.get(key, "auto")
        if given != "auto" and given != wanted[key]:
            problems.append(Problem((key,), f"{given!r} contradicts the config's {source} ({wanted[key]})",
                                    hint='set it to "auto" and let tunefile fill it', file=file))
        config[key] = wanted[key]
    for mode in ("bf16", "fp16"):
        section = config.setdefault(mode, {})
        if isinstance(section, dict):
            section["enabled"] = wanted[mode]["enabled"] if section.get("enabled", "auto") == "auto" \
                else section["enabled"]
            if section["enabled"] != wanted[mode]["enabled"]:
                problems.append(Problem((mode, "enabled"), f"{mode}.enabled={section['enabled']} contradicts the "
                                        f"resolved precision ({precision})", file=file))
    zero = config.get("zero_optimization")
    if isinstance(zero, dict):
        for key, value in _bucket_sizes(shape).items():
            if zero.get(key) == "auto":
                zero[key] = value
    for path in _auto_paths(config):
        problems.append(Problem(path, 'still "auto" and tunefile cannot tell its value',
                                hint="write a number here", file=file))
    config.setdefault("zero_allow_untested_optimizer", True)
    return config, problems


ZERO_STAGES = (0, 1, 2, 3)


def structure_problems(config: Any, *, file: str) -> list[Problem]:
    """What DeepSpeed itself would refuse, or misread, in the sections tunefile reads: the file is a mapping,
    zero_optimization a mapping whose stage is 0, 1, 2 or 3, bf16 and fp16 mappings whose enabled is true, false
    or "auto"."""
    if not isinstance(config, dict):
        return [Problem((), f"a DeepSpeed config is a JSON object, not {type(config).__name__}", file=file)]
    problems = []
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        problems.append(Problem(("zero_optimization",), f"must be a mapping (got {type(zero).__name__})", file=file))
    elif "stage" in zero and (isinstance(zero["stage"], bool) or zero["stage"] not in ZERO_STAGES):
        problems.append(Problem(("zero_optimization", "stage"),
                                f"must be 0, 1, 2 or 3 (got {json.dumps(zero['stage'])})", file=file))
    for mode in ("bf16", "fp16"):
        section = config.get(mode, {})
        if not isinstance(section, dict):
            problems.append(Problem((mode,), f"must be a mapping such as {{\"enabled\": \"auto\"}} (got "
                                    f"{type(section).__name__})", file=file))
        elif "enabled" in section and section["enabled"] not in (True, False, "auto"):
            problems.append(Problem((mode, "enabled"),
                                    f'must be true, false or "auto" (got {json.dumps(section["enabled"])})', file=file))
    return problems


def zero_stage(config: dict[str, Any]) -> int:
    zero = config.get("zero_optimization")
    return int(zero.get("stage", 0)) if isinstance(zero, dict) else 0


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _deep_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_deep_copy(item) for item in value]
    return value


def _auto_paths(value: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    if value == "auto":
        return [path]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in _auto_paths(item, (*path, key))]
    if isinstance(value, list):
        return [found for index, item in enumerate(value) for found in _auto_paths(item, (*path, index))]
    return []


# --- ZeRO-3 under the run's model: its unit of gathering, and a frozen base kept whole ---

GRANULARITY_KEY = "stage3_module_granularity_threshold"


def zero3_gathering(plan: DistributionPlan, model: ModelInfo) -> tuple[DistributionPlan, Decision]:
    """ZeRO-3 gathers each decoder layer whole where the layer class is known.

    DeepSpeed otherwise hooks every module that holds parameters and all-gathers them one module at a time: a LoRA
    decoder layer is some thirty gathers (each projection, its A and its B), and the per-gather overhead made ZeRO-3
    LoRA run at a quarter to a third of DDP's speed on two H200s (bench/results/gpu_runs.json). One gather per
    layer is FSDP's unit; it holds one layer's weights whole at a time, as FSDP does. A DeepSpeed JSON that sets
    stage3_module_granularity_threshold has chosen DeepSpeed's own grouping, and is left to it."""
    zero = (plan.deepspeed_config or {}).get("zero_optimization")
    if isinstance(zero, dict) and GRANULARITY_KEY in zero:
        return plan, Decision("zero3 gathering", f"{GRANULARITY_KEY} {zero[GRANULARITY_KEY]}",
                              "set in the DeepSpeed JSON")
    layer = layer_class_for(model.architecture)
    if layer is None:
        return plan, Decision("zero3 gathering", "module by module (DeepSpeed's default)",
                              f"the decoder layer class of {model.architecture or 'this base model'} is unknown")
    return (replace(plan, deepspeed_leaf_module=layer),
            Decision("zero3 gathering", f"a whole {layer} at a time",
                     "one all-gather per decoder layer, as FSDP wraps it, instead of one per module that holds "
                     "parameters (each projection and each adapter matrix)"))


# The share of GPU memory the estimate with a whole base may take: less than the 90% the fit warning allows, since
# the user chose ZeRO-3 for its memory and a wrong guess here is an out-of-memory error a partitioned base avoids.
WHOLE_BASE_SHARE = 0.75


def zero3_frozen_base(plan: DistributionPlan, shape: ModelShape, *, whole: MemoryEstimate | None,
                      partitioned: MemoryEstimate | None) -> tuple[DistributionPlan, MemoryEstimate | None, Decision]:
    """Under an adapter, the built-in zero3 keeps the frozen base whole on every GPU when the estimate says it fits.

    A frozen weight has no gradient and no optimizer state: partitioning it saves only its own bf16 copy, and costs
    an all-gather of the whole base in every step (ZeRO-3 releases every parameter, persistent ones included, at
    each optimizer step). Where the base fits beside the rest, the runtime loads it whole and leaves the frozen
    weights out of ZeRO-3 (runtime/zero3_gathering.py): ZeRO-3 partitions the adapter's gradients and optimizer
    state only. The adapter's own weights stay whole between steps (stage3_param_persistence_threshold: the
    model's size), so no weight the forward reads is released before its backward, and DeepSpeed's replacement for
    torch's linear, which exists for weights released in between, is off (memory_efficient_linear: false): on one
    H200 these took ZeRO-3 from 0.61 to 0.80 of a plain run's speed (bench/results/zero3_one_process_variants.json).
    Where it does not fit, or the GPU's memory is unknown, the base stays partitioned and is gathered a layer at a
    time. "Fits" leaves a margin (WHOLE_BASE_SHARE)."""
    if whole is None or whole.available is None or whole.total > WHOLE_BASE_SHARE * whole.available:
        why = ("the GPU's memory is unknown" if whole is None or whole.available is None else
               f"with it whole, the estimate is ~{whole.total:.1f} GiB per GPU, over {WHOLE_BASE_SHARE:.0%} of "
               f"{whole.available:.0f} GiB")
        return plan, partitioned, Decision("zero3 frozen base", "partitioned", why)
    # No parameter is larger than the whole model, an embedding grown by added tokens included.
    threshold = shape.parameters
    config = dict(plan.deepspeed_config or {})
    config["zero_optimization"] = dict(config["zero_optimization"], stage3_param_persistence_threshold=threshold,
                                       memory_efficient_linear=False)
    return (replace(plan, deepspeed_config=config, deepspeed_frozen_base_whole=True), whole,
            Decision("zero3 frozen base", "whole on every GPU, outside ZeRO-3",
                     f"it fits (~{whole.total:.1f} GiB per GPU of {whole.available:.0f} GiB): a frozen weight has "
                     "no gradient or optimizer state to partition, so the runtime loads the base whole and leaves "
                     "it out of ZeRO-3, which partitions the adapter's gradients and optimizer state without "
                     "gathering the base in every step; the adapter's weights stay whole between steps "
                     f"(stage3_param_persistence_threshold {threshold:,}; memory_efficient_linear false)"))
