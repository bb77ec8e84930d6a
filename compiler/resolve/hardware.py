"""Precision, TF32 and attention: what the target GPU can do decides them."""

from __future__ import annotations

from ..errors import Problem
from ..plan import Decision, Precision
from ..spec import Spec
from ..targets import Target


def _gpu_words(target: Target) -> str:
    if target.gpu is None:
        return "the CPU"
    return target.gpu.name if target.gpu_known else "an unspecified GPU (assumed Ampere or newer; pass --gpu)"


def resolve_precision(spec: Spec, target: Target, errors: list[Problem]) -> tuple[Precision, Decision]:
    gpu, where = target.gpu, _gpu_words(target)
    if gpu is None:
        if spec.fp16:
            errors.append(Problem(("fp16",), "fp16 mixed precision needs a GPU; the target is the CPU",
                                  hint="remove `fp16: true` or pass a GPU target"))
        if spec.bf16 is True:
            return "bf16", Decision("precision", "bf16", "bf16: true on the CPU (autocast to bfloat16)")
        return "fp32", Decision("precision", "fp32", "CPU target: mixed precision off")
    if spec.bf16 is True and not gpu.bf16:
        errors.append(Problem(("bf16",), f"{gpu.name} has no bfloat16 support",
                              hint="set `bf16: auto` (uses fp16 there) or `fp16: true`"))
    if spec.bf16 in (True, "auto") and gpu.bf16 and not spec.fp16:
        how = "bf16: true" if spec.bf16 is True else "bf16: auto"
        return "bf16", Decision("precision", "bf16", f"{how} and {where} supports bfloat16")
    if spec.fp16 or (spec.bf16 == "auto" and not gpu.bf16):
        reason = "fp16: true" if spec.fp16 else f"bf16: auto, but {where} has no bfloat16: float16 instead"
        return "fp16", Decision("precision", "fp16", reason)
    return "fp32", Decision("precision", "fp32", "bf16 and fp16 are off: full float32")


def resolve_tf32(spec: Spec, target: Target, warnings: list[Problem]) -> tuple[bool, Decision]:
    gpu = target.gpu
    if not spec.tf32:
        return False, Decision("tf32", "off", "tf32 not requested")
    if gpu is None or not gpu.ampere_or_newer:
        warnings.append(Problem(("tf32",), f"ignored: TF32 needs an Ampere or newer GPU, not {_gpu_words(target)}"))
        return False, Decision("tf32", "off", f"{_gpu_words(target)} has no TF32")
    return True, Decision("tf32", "on", f"tf32: true and {_gpu_words(target)} supports it")


def resolve_attention(spec: Spec, target: Target, warnings: list[Problem]) -> tuple[str, Decision]:
    gpu, where = target.gpu, _gpu_words(target)
    if spec.eager_attention:
        return "eager", Decision("attention", "eager", "eager_attention: true")
    if spec.flash_attention:
        if gpu is not None and gpu.ampere_or_newer:
            return "flash_attention_2", Decision(
                "attention", "flash_attention_2", f"flash_attention: true and {where} is Ampere or newer"
            )
        # Decision (README): fall back rather than fail, so one config serves several clusters.
        warnings.append(Problem(("flash_attention",), f"flash-attn needs an Ampere or newer GPU; {where} gets "
                                "PyTorch SDPA instead", hint="set flash_attention: false to silence this"))
        return "sdpa", Decision("attention", "sdpa", f"flash_attention requested but {where} cannot run it")
    return "sdpa", Decision("attention", "sdpa", "PyTorch scaled-dot-product attention (the default)")


def resolve_packing_attention(spec: Spec, target: Target, attention: str) -> tuple[str | None, Decision | None]:
    """How packed samples are kept from attending to each other."""
    if not spec.sample_packing:
        return None, None
    gpu = target.gpu
    if attention == "flash_attention_2":
        return "flash_varlen", Decision("packing", "flash_varlen",
                                        "flash-attn's varlen kernel with position ids restarting per sample")
    if gpu is not None and gpu.ampere_or_newer:
        return "torch_varlen", Decision("packing", "torch_varlen",
                                        "PyTorch's varlen attention on CUDA (Ampere or newer), position ids "
                                        "restarting per sample; the runtime falls back to block_mask without it")
    return "block_mask", Decision("packing", "block_mask",
                                  f"block-diagonal attention mask through SDPA on {_gpu_words(target)} "
                                  "(no varlen kernel there)")
