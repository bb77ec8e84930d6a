"""Strategy (single, DDP, FSDP2, DeepSpeed ZeRO) and its settings, with the memory estimate behind it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import Problem
from ..models import ModelShape, layer_class_for
from ..plan import BatchPlan, Decision, DistributionPlan, FsdpPlan, MemoryEstimate, ModelInfo
from ..spec import BITSANDBYTES_OPTIMIZERS, FsdpConfig, Spec
from ..targets import Target
from . import deepspeed as ds
from .memory import SHARDING, estimate_memory


@dataclass(frozen=True)
class DeepSpeedInput:
    """The user's DeepSpeed JSON file, already read and parsed by the CLI."""

    name: str
    data: Any


def resolve_distribution(
    spec: Spec, *, target: Target, batch: BatchPlan, precision: str, model: ModelInfo, shape: ModelShape | None,
    quantization_bits: int | None, deepspeed_file: DeepSpeedInput | None,
    errors: list[Problem], warnings: list[Problem],
) -> tuple[DistributionPlan, MemoryEstimate | None, list[Decision]]:
    world = target.world_size
    estimate_for = _estimator(spec, target, batch, precision, model, shape, quantization_bits)
    decisions: list[Decision] = []

    if spec.deepspeed:
        if target.on_cpu:
            errors.append(Problem(("deepspeed",), "DeepSpeed needs GPUs; the target is the CPU",
                                  hint="remove the `deepspeed:` line"))
        elif world == 1:
            errors.append(Problem(("deepspeed",), "DeepSpeed needs at least 2 GPUs in total; this target has 1",
                                  hint="remove the `deepspeed:` line (one GPU trains without it), or pass "
                                  "--gpus-per-node 2 or more"))
        plan, reason = _deepspeed_plan(spec, batch, precision, shape, deepspeed_file, errors)
        preset = spec.deepspeed if spec.deepspeed in ds.BUILTIN_PRESETS else None
        stage = plan.deepspeed_stage or 0
        memory = estimate_for(preset if preset else (f"zero{stage}" if stage > 0 else "ddp"))
        decisions.append(Decision("strategy", f"deepspeed zero{plan.deepspeed_stage}", reason))
        _warn_if_too_big(memory, ("deepspeed",), warnings, "use zero3 or zero3_offload")
        return plan, memory, decisions

    if spec.fsdp_config is not None or spec.strategy == "fsdp":
        settings = spec.fsdp_config or FsdpConfig()
        memory = estimate_for("fsdp_offload" if settings.offload_params else "fsdp")
        if world == 1 and not settings.offload_params:
            warnings.append(Problem(("fsdp_config",) if spec.fsdp_config else ("strategy",),
                                    "FSDP on one GPU shards nothing", hint="set offload_params: true or drop FSDP"))
        _warn_if_too_big(memory, ("fsdp_config",), warnings, "set fsdp_config.offload_params: true")
        why = "fsdp_config is set" if spec.fsdp_config else "strategy: fsdp"
        if spec.dp_shard_size is not None and spec.dp_shard_size != world:
            errors.append(Problem(("dp_shard_size",), f"dp_shard_size {spec.dp_shard_size} shards across part of the "
                                  f"{world} GPUs; tunefile's FSDP shards across all of them",
                                  hint=f"remove the line, or run on {spec.dp_shard_size} GPUs"))
        version, version_reason = fsdp_version(spec)
        fsdp, layer_decision = _fsdp_plan(spec, settings, model, warnings, version)
        decisions += [Decision("strategy", f"fsdp{version}", f"{why}, across {world} GPU(s); {version_reason}"),
                      layer_decision]
        return DistributionPlan(strategy="fsdp", fsdp=fsdp), memory, decisions

    if world == 1:
        if spec.strategy == "ddp":
            warnings.append(Problem(("strategy",), "strategy: ddp with one process in total replicates nothing; "
                                    "it runs as a single process", hint="pass --gpus-per-node 2 or more"))
        memory = estimate_for("single")
        _warn_if_too_big(memory, ("base_model",), warnings,
                         "enable gradient_checkpointing, lower micro_batch_size or sequence_len, or use adapter: qlora")
        decisions.append(Decision("strategy", "single", "one GPU in total" if not target.on_cpu else "one process"))
        return DistributionPlan(strategy="single"), memory, decisions

    ddp = estimate_for("ddp")
    if spec.strategy == "ddp" or ddp is None or ddp.fits is None or ddp.fits:
        if spec.strategy == "ddp":
            reason = "strategy: ddp"
            _warn_if_too_big(ddp, ("strategy",), warnings, "use strategy: auto or fsdp")
        elif ddp is None:
            reason = "model size unknown (set model_parameters for a memory check): DDP, the default"
        elif ddp.fits is None:
            reason = "GPU memory unknown (pass --gpu for a memory check): DDP, the default"
        else:
            reason = f"a full replica fits: ~{ddp.total:.1f} GiB per GPU of {ddp.available:.0f} GiB"
        decisions.append(Decision("strategy", "ddp", reason))
        return DistributionPlan(strategy="ddp"), ddp, decisions

    sharded = estimate_for("fsdp")
    offload = bool(sharded and sharded.fits is False)
    memory = estimate_for("fsdp_offload") if offload else sharded
    reason = (f"a replica needs ~{ddp.total:.1f} GiB per GPU, more than 90% of {ddp.available:.0f} GiB; "
              + (f"sharded it still needs ~{sharded.total:.1f} GiB, so parameters are offloaded to CPU"
                 if offload and sharded else f"FSDP2 sharding brings it to ~{sharded.total:.1f} GiB"))
    fsdp, layer_decision = _fsdp_plan(spec, FsdpConfig(offload_params=offload), model, warnings, 2)
    decisions += [Decision("strategy", "fsdp2" + (" + offload" if offload else ""), reason), layer_decision]
    _warn_if_too_big(memory, ("base_model",), warnings, "lower micro_batch_size or sequence_len")
    return DistributionPlan(strategy="fsdp", fsdp=fsdp), memory, decisions


def _estimator(spec: Spec, target: Target, batch: BatchPlan, precision: str, model: ModelInfo,
               shape: ModelShape | None, quantization_bits: int | None) -> Callable[[str], MemoryEstimate | None]:
    def estimate(sharding: str) -> MemoryEstimate | None:
        if target.on_cpu or shape is None or not model.parameters or model.trainable_parameters is None:
            return None
        return estimate_memory(
            parameters=model.parameters,
            trainable=model.trainable_parameters,
            shape=shape,
            full_finetune=spec.adapter is None,
            quantization_bits=quantization_bits,
            precision=precision,
            eight_bit_optimizer=spec.optimizer in BITSANDBYTES_OPTIMIZERS and spec.optimizer != "paged_adamw_32bit",
            micro_batch_size=batch.micro_batch_size,
            sequence_len=batch.sequence_len,
            gradient_checkpointing=spec.gradient_checkpointing
            or bool(spec.fsdp_config and spec.fsdp_config.activation_checkpointing),
            sharding=SHARDING[sharding],
            world_size=target.world_size,
            gpu_memory_gib=target.gpu.memory_gib if target.gpu and target.gpu_known else None,
        )
    return estimate


def _warn_if_too_big(memory: MemoryEstimate | None, path: tuple, warnings: list[Problem], fix: str) -> None:
    if memory is not None and memory.fits is False:
        warnings.append(Problem(path, f"estimated ~{memory.total:.1f} GiB per GPU exceeds 90% of the "
                                f"{memory.available:.0f} GiB available; the run will likely run out of memory",
                                hint=fix))


def fsdp_version(spec: Spec) -> tuple[int, str]:
    """FSDP's generation and why: the config's fsdp_version; Axolotl's FSDP1 for an fsdp_config without one;
    FSDP2 when tunefile chose FSDP itself."""
    if spec.fsdp_version is not None:
        return spec.fsdp_version, f"fsdp_version: {spec.fsdp_version}"
    if spec.fsdp_config is not None:
        return 1, "an fsdp_config without fsdp_version is FSDP1, as in Axolotl (add fsdp_version: 2 for FSDP2)"
    return 2, "FSDP chosen by tunefile is FSDP2 (per-parameter sharding)"


def _fsdp_plan(spec: Spec, settings: FsdpConfig, model: ModelInfo,
               warnings: list[Problem], version: int) -> tuple[FsdpPlan, Decision]:
    derived = layer_class_for(model.architecture)
    chosen = settings.transformer_layer_cls_to_wrap
    if chosen:
        reason = "fsdp_config.transformer_layer_cls_to_wrap"
        if derived and derived != chosen:
            warnings.append(Problem(("fsdp_config", "transformer_layer_cls_to_wrap"),
                                    f"{model.architecture} models are made of {derived}, not {chosen}",
                                    hint=f"use {derived} or leave the key out to derive it"))
    elif derived:
        chosen, reason = derived, f"derived from the architecture {model.architecture}"
    elif settings.auto_wrap_policy == "TRANSFORMER_BASED_WRAP":
        reason = "architecture unknown: accelerate uses the model's _no_split_modules at launch"
        warnings.append(Problem(("fsdp_config",) if spec.fsdp_config else ("base_model",),
                                "cannot tell the decoder layer class to wrap from the base model",
                                hint="set fsdp_config.transformer_layer_cls_to_wrap (e.g. LlamaDecoderLayer)"))
    else:
        reason = f"not needed with {settings.auto_wrap_policy}"
    plan = FsdpPlan(
        version=version,
        layer_cls_to_wrap=chosen,
        auto_wrap_policy=settings.auto_wrap_policy,
        offload_params=settings.offload_params,
        state_dict_type=settings.state_dict_type,
        # FSDP1 spells "reshard after forward" as its sharding strategy: FULL_SHARD does, SHARD_GRAD_OP does not.
        reshard_after_forward=settings.reshard_after_forward if settings.sharding_strategy is None
        else settings.sharding_strategy == "FULL_SHARD",
        cpu_ram_efficient_loading=settings.cpu_ram_efficient_loading,
        activation_checkpointing=settings.activation_checkpointing,
    )
    return plan, Decision("fsdp layer", chosen or "(from the model)", reason)


def _deepspeed_plan(spec: Spec, batch: BatchPlan, precision: str, shape: ModelShape | None,
                    user_file: DeepSpeedInput | None, errors: list[Problem]) -> tuple[DistributionPlan, str]:
    name = spec.deepspeed or ""
    if name in ds.BUILTIN_PRESETS:
        config = ds.builtin_config(name, batch=batch, precision=precision, max_grad_norm=spec.max_grad_norm,
                                   shape=shape)
        reason = f"deepspeed: {name} (built-in preset)" + (_UNSIZED_BUCKETS if shape is None else "")
        return (DistributionPlan("deepspeed", deepspeed_config=config, deepspeed_stage=ds.zero_stage(config),
                                 deepspeed_source=f"built-in {name}"), reason)
    if user_file is None or not isinstance(user_file.data, dict):
        if user_file is not None:
            errors.append(Problem((), "a DeepSpeed config must be a JSON object", file=user_file.name))
        return DistributionPlan("deepspeed", deepspeed_config={}, deepspeed_stage=0, deepspeed_source=name), name
    config, problems = ds.concretize_user_config(user_file.data, file=user_file.name, batch=batch,
                                                 precision=precision, max_grad_norm=spec.max_grad_norm, shape=shape)
    errors.extend(problems)
    source = user_file.name if user_file.name.startswith("Axolotl ") else "your file"
    reason = f"deepspeed: {name} ({source}, 'auto' values filled in){_offload_words(config)}"
    if shape is None and _has_auto_buckets(user_file.data):
        reason += _UNSIZED_BUCKETS
    return (DistributionPlan("deepspeed", deepspeed_config=config, deepspeed_stage=ds.zero_stage(config),
                             deepspeed_source=name), reason)


_UNSIZED_BUCKETS = ("; its bucket sizes are DeepSpeed's defaults, since the model's hidden size is unknown (a local "
                    "base_model or one in the built-in table sizes them)")


def _offload_words(config: dict) -> str:
    zero = config.get("zero_optimization") if isinstance(config.get("zero_optimization"), dict) else {}
    parts = [what for key, what in (("offload_optimizer", "optimizer state"), ("offload_param", "parameters"))
             if isinstance(zero.get(key), dict) and zero[key].get("device") == "cpu"]
    return f"; offloads {' and '.join(parts)} to the CPU" if parts else ""


def _has_auto_buckets(user: dict) -> bool:
    zero = user.get("zero_optimization")
    return isinstance(zero, dict) and any(zero.get(key) == "auto" for key in
                                          ("reduce_bucket_size", "stage3_prefetch_bucket_size",
                                           "stage3_param_persistence_threshold"))
