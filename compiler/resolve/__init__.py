"""resolve(spec, target, …) → Plan: every hardware and distribution choice made explicit, with reasons.

Pure: files the config points at (a local model's config.json, a DeepSpeed JSON) are read by
the CLI and passed in as data.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .. import __version__
from ..containers import config_path_problems
from ..errors import ConfigError, Problem, format_path
from ..plan import BatchPlan, Decision, Plan
from ..spec import BITSANDBYTES_OPTIMIZERS, TORCHAO_OPTIMIZERS, Spec, mlflow_on, wandb_on
from ..targets import Target
from .distribution import DeepSpeedInput, mesh_of, resolve_auto_checkpointing, resolve_distribution
from .hardware import resolve_attention, resolve_packing_attention, resolve_precision, resolve_tf32
from .kernels import kernel_packages, resolve_kernels
from .model import resolve_model

__all__ = ["DeepSpeedInput", "ResolveInputs", "resolve"]


@dataclass(frozen=True)
class ResolveInputs:
    """Everything resolve needs besides the Spec and the Target, already read from disk."""

    config_name: str
    config_sha256: str
    target_sha256: str
    local_model_config: dict[str, Any] | None = None
    deepspeed_file: DeepSpeedInput | None = None


def resolve(spec: Spec, target: Target, inputs: ResolveInputs, *, spec_warnings: list[Problem] = (),
            dialect_notes: list[Problem] = ()) -> Plan:
    errors: list[Problem] = []
    warnings: list[Problem] = list(spec_warnings)
    decisions: list[Decision] = []

    decisions.append(Decision("target", _target_words(target), target.detected or f"target {target.name}"))

    precision, decision = resolve_precision(spec, target, errors)
    decisions.append(decision)
    tf32, decision = resolve_tf32(spec, target, warnings)
    decisions.append(decision)
    attention, decision = resolve_attention(spec, target, warnings)
    decisions.append(decision)
    packing, decision = resolve_packing_attention(spec, target, attention)
    if decision:
        decisions.append(decision)
    kernels, kernel_decisions = resolve_kernels(spec, target, warnings)
    decisions += kernel_decisions

    load_in_4bit = spec.load_in_4bit or spec.adapter == "qlora"
    load_in_8bit = spec.load_in_8bit
    quantization_bits = 4 if load_in_4bit else 8 if load_in_8bit else None
    optimizer = "adamw_8bit" if spec.optimizer == "adamw_bnb_8bit" else spec.optimizer
    if target.on_cpu:
        if quantization_bits:
            key = "adapter" if spec.adapter == "qlora" else f"load_in_{quantization_bits}bit"
            errors.append(Problem((key,), f"{quantization_bits}-bit loading uses bitsandbytes CUDA kernels; the "
                                  "target is the CPU", hint="use adapter: lora without quantisation on the CPU"))
        if optimizer in BITSANDBYTES_OPTIMIZERS:
            errors.append(Problem(("optimizer",), f"{spec.optimizer} uses bitsandbytes CUDA kernels; the target "
                                  "is the CPU", hint="use optimizer: adamw_torch"))
    _check_qat_hardware(spec, target, errors, warnings)
    _check_fp8_hardware(spec, target, errors, warnings)
    _check_device_map(spec, target, errors, decisions)
    errors += config_path_problems(spec, has_container=target.slurm.container_image is not None)
    decisions.append(Decision("training", _training_words(spec, quantization_bits), _training_reason(spec)))

    model, shape, decision = resolve_model(spec, inputs.local_model_config)
    decisions.append(decision)

    batch = BatchPlan(spec.micro_batch_size, spec.gradient_accumulation_steps, target.world_size,
                      spec.sequence_len, on_cpu=target.on_cpu)
    spec, decision = resolve_auto_checkpointing(spec, target=target, batch=batch, precision=precision, model=model,
                                                shape=shape, quantization_bits=quantization_bits, kernels=kernels)
    if decision:
        decisions.append(decision)
    distribution, memory, strategy_decisions = resolve_distribution(
        spec, target=target, batch=batch, precision=precision, model=model, shape=shape,
        quantization_bits=quantization_bits, deepspeed_file=inputs.deepspeed_file,
        errors=errors, warnings=warnings, kernels=kernels,
    )
    decisions += strategy_decisions
    mesh = mesh_of(distribution)
    if mesh is not None:  # tensor/context-parallel GPUs share their micro batches (DeepSpeed counts every GPU)
        batch = replace(batch, gpus_per_copy=mesh.tensor_parallel * mesh.context_parallel)
    decisions.append(Decision("batch", f"{batch.effective_batch_size} sequences per step", batch.explanation()))
    if memory is not None:
        budget = f" of {memory.available:.0f} GiB" if memory.available else " (GPU memory unknown)"
        decisions.append(Decision("memory", f"~{memory.total:.1f} GiB per GPU{budget}",
                                  f"weights {memory.weights} + gradients {memory.gradients} + optimizer "
                                  f"{memory.optimizer} + activations {memory.activations} + overhead "
                                  f"{memory.overhead} GiB"))
    decisions += [Decision(f"axolotl {format_path(note.path)}", note.message, note.hint or "")
                  for note in dialect_notes]
    if spec.offline:
        decisions.append(Decision("network", "offline", "offline: true: HF_HUB_OFFLINE, HF_DATASETS_OFFLINE and "
                                  "TRANSFORMERS_OFFLINE are exported before Python starts"))
    if errors:
        raise ConfigError(errors)

    return Plan(
        spec=spec,
        config_name=inputs.config_name,
        target=target,
        precision=precision,
        tf32=tf32,
        attention=attention,
        packing_attention=packing,
        kernels=kernels,
        load_in_4bit=load_in_4bit,
        load_in_8bit=load_in_8bit,
        optimizer=optimizer,
        distribution=distribution,
        batch=batch,
        model=model,
        memory=memory,
        decisions=tuple(decisions),
        warnings=tuple(warnings),
        required_packages=tuple(sorted({*_required_packages(spec, attention, distribution.strategy,
                                                            quantization_bits, optimizer),
                                         *kernel_packages(kernels)})),
        config_sha256=inputs.config_sha256,
        target_sha256=inputs.target_sha256,
        tunefile_version=__version__,
    )


def _check_qat_hardware(spec: Spec, target: Target, errors: list[Problem], warnings: list[Problem]) -> None:
    """torchao's fp4 fake quantisation runs on CUDA; nvfp4 runs a real FP4 matmul, which needs Blackwell."""
    if spec.qat is None or spec.qat.weight_dtype not in ("nvfp4", "mxfp4"):
        return
    dtype = spec.qat.weight_dtype
    if target.on_cpu:
        errors.append(Problem(("qat", "weight_dtype"), f"{dtype} fake quantisation needs a CUDA GPU; the target "
                              "is the CPU", hint="use int4 or int8 on the CPU"))
    elif dtype == "nvfp4" and target.gpu is not None:
        if not target.gpu_known:
            warnings.append(Problem(("qat", "weight_dtype"), "nvfp4 needs a Blackwell GPU (compute capability 10 "
                                    "or newer); the target's GPU is unspecified", hint="pass --gpu"))
        elif target.gpu.compute_capability < (10, 0):
            errors.append(Problem(("qat", "weight_dtype"), f"nvfp4 needs a Blackwell GPU (compute capability 10 "
                                  f"or newer); {target.gpu.name} is {target.gpu.compute_capability[0]}."
                                  f"{target.gpu.compute_capability[1]}", hint="use mxfp4 (emulated) on this GPU"))


def _check_fp8_hardware(spec: Spec, target: Target, errors: list[Problem], warnings: list[Problem]) -> None:
    """torchao's float8 matmuls need compute capability 8.9 (Ada, Hopper) or newer, as Axolotl checks."""
    if not spec.fp8:
        return
    if target.gpu is None:
        errors.append(Problem(("fp8",), "FP8 training needs a CUDA GPU; the target is the CPU",
                              hint="remove `fp8: true` or pass a GPU target"))
    elif not target.gpu_known:
        warnings.append(Problem(("fp8",), "FP8 training needs compute capability 8.9 or newer (Ada, Hopper); the "
                                "target's GPU is unspecified", hint="pass --gpu"))
    elif not target.gpu.fp8:
        major, minor = target.gpu.compute_capability
        errors.append(Problem(("fp8",), f"FP8 training needs compute capability 8.9 or newer (Ada, Hopper); "
                              f"{target.gpu.name} is {major}.{minor}", hint="remove `fp8: true` and train in bf16"))


# device_map values that, for one process, mean what tunefile does anyway: the model on that process's GPU.
ONE_DEVICE_MAPS = ("auto", "cuda", "cuda:0", "0")


def _check_device_map(spec: Spec, target: Target, errors: list[Problem], decisions: list[Decision]) -> None:
    if spec.device_map is None:
        return
    if target.world_size == 1 and spec.device_map in ONE_DEVICE_MAPS:
        decisions.append(Decision("axolotl device_map", "no effect", f"device_map: {spec.device_map} on one GPU "
                                  "places the model where tunefile does"))
        return
    errors.append(Problem(("device_map",), f"device_map: {spec.device_map} spreads one model copy over "
                          f"{target.world_size} processes' devices, which tunefile does not do; it places one copy "
                          "per GPU, or shards with FSDP/DeepSpeed", hint="remove device_map (use fsdp_config or "
                          "deepspeed to split a model too large for one GPU)"))


def _target_words(target: Target) -> str:
    if target.gpu is None:
        return f"{target.nodes} node(s) × {target.gpus_per_node} CPU process(es)"
    return f"{target.nodes} node(s) × {target.gpus_per_node} × {target.gpu.description}"


def _training_words(spec: Spec, bits: int | None) -> str:
    if spec.adapter is None:
        return "full fine-tune"
    kind = "QLoRA" if bits == 4 else "LoRA"
    base = {4: " on a 4-bit NF4 base", 8: " on an 8-bit base"}.get(bits or 0, "")
    return f"{kind} r={spec.lora_r} alpha={spec.lora_alpha}{base}"


def _training_reason(spec: Spec) -> str:
    if spec.adapter is None:
        return "no adapter: every weight is trained"
    if spec.lora_target_linear:
        targets = "every linear layer"
    else:
        targets = ", ".join(spec.lora_target_modules or ["q_proj", "v_proj"])
    return f"adapter: {spec.adapter} on {targets}; updates scale by alpha/r = {spec.lora_alpha / spec.lora_r:g}"


def _required_packages(spec: Spec, attention: str, strategy: str, bits: int | None, optimizer: str) -> tuple[str, ...]:
    packages = {"tunefile", "torch", "transformers", "accelerate", "safetensors", "datasets", "tokenizers"}
    if spec.adapter:
        packages.add("peft")
    if bits or optimizer in BITSANDBYTES_OPTIMIZERS:
        packages.add("bitsandbytes")
    if strategy == "deepspeed":
        packages.add("deepspeed")
    if attention == "flash_attention_2":
        packages.add("flash-attn")
    packages |= _tracker_packages(spec)
    if spec.optimizer in TORCHAO_OPTIMIZERS or spec.qat is not None:
        packages.add("torchao")
    if spec.tokenizer_use_mistral_common:
        packages.add("mistral-common")
    return tuple(sorted(packages))


def _tracker_packages(spec: Spec) -> set[str]:
    return ({"wandb"} if wandb_on(spec) else set()) | ({"mlflow-skinny"} if mlflow_on(spec) else set()) \
        | ({"tensorboard"} if spec.use_tensorboard else set())
