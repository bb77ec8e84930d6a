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
    if spec.bfloat16:
        if gpu is not None and not gpu.bf16:
            errors.append(Problem(("bfloat16",), f"{gpu.name} has no bfloat16 support",
                                  hint="use `float16: true`, or fp16: true (mixed precision)"))
        return "bf16", Decision("precision", "bf16", "bfloat16: true: every weight, the trained ones too, is "
                                "kept in bfloat16 (no fp32 master copy)")
    if spec.float16:
        if gpu is None:
            errors.append(Problem(("float16",), "float16 weights need a GPU; the target is the CPU",
                                  hint="remove `float16: true` or pass a GPU target"))
        return "fp16", Decision("precision", "fp16", "float16: true: every weight, the trained ones too, is kept "
                                "in float16 and trained without loss scaling (no fp32 master copy)")
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
    gpu, where = target.gpu, _gpu_words(target)
    if spec.tf32 is False:
        return False, Decision("tf32", "off", "tf32: false")
    has_tf32 = gpu is not None and gpu.ampere_or_newer
    if spec.tf32 == "auto":
        # Axolotl's default: on where the GPU has TF32.
        reason = f"tf32: auto and {where} {'supports it' if has_tf32 else 'has no TF32'}"
        return has_tf32, Decision("tf32", "on" if has_tf32 else "off", reason)
    if not has_tf32:
        warnings.append(Problem(("tf32",), f"ignored: TF32 needs an Ampere or newer GPU, not {where}"))
        return False, Decision("tf32", "off", f"{where} has no TF32")
    return True, Decision("tf32", "on", f"tf32: true and {where} supports it")


# What each Axolotl attention name runs as in tunefile, where it differs from the name itself.
_NOT_CARRIED = {
    "xformers": "xformers is not among tunefile's dependencies; PyTorch SDPA runs the same memory-efficient kernel",
    "sage": "SageAttention is not among tunefile's dependencies",
    "flex_attention": "tunefile isolates packed samples with varlen kernels or an SDPA block mask, not flex "
                      "attention (transformers' flex path hung at step 0 in our GPU runs)",
}


def resolve_attention(spec: Spec, target: Target, warnings: list[Problem]) -> tuple[str, Decision]:
    """Axolotl's attn_implementation → the kernel the target runs, falling back (with the reason) to the
    nearest one it can: flash-attn's on Ampere or newer, else PyTorch SDPA."""
    gpu, where = target.gpu, _gpu_words(target)
    asked = spec.attn_implementation or "sdpa"
    ampere = gpu is not None and gpu.ampere_or_newer
    if asked == "eager":
        return "eager", Decision("attention", "eager", "attn_implementation: eager")
    if asked == "sdpa":
        reason = "attn_implementation: sdpa" if spec.attn_implementation else "PyTorch SDPA (the default)"
        return "sdpa", Decision("attention", "sdpa", reason)
    if asked in _NOT_CARRIED:
        return "sdpa", Decision("attention", "sdpa", f"attn_implementation: {asked}, but {_NOT_CARRIED[asked]}")
    if asked.startswith("kernels-") or "/" in asked:
        why = f"attn_implementation: {asked} is a kernel downloaded from the Hugging Face Hub at run time, which " \
              "tunefile never does (bundles run offline)"
        if ampere:
            return "flash_attention_2", Decision("attention", "flash_attention_2", f"{why}; flash-attn's kernel on "
                                                 f"{where} instead")
        return "sdpa", Decision("attention", "sdpa", f"{why}; PyTorch SDPA on {where} instead")
    if asked in ("flash_attention_2", "flash_attention_3"):
        if ampere:
            note = "" if asked == "flash_attention_2" else " (flash-attn 2's kernel: FA3 is not a tunefile extra)"
            return "flash_attention_2", Decision("attention", "flash_attention_2",
                                                 f"attn_implementation: {asked} and {where} is Ampere or newer{note}")
        # Decision (README): fall back rather than fail, so one config serves several clusters.
        warnings.append(Problem(("attn_implementation",), f"flash-attn needs an Ampere or newer GPU; {where} gets "
                                "PyTorch SDPA instead", hint="set attn_implementation: sdpa to silence this"))
        return "sdpa", Decision("attention", "sdpa", f"attn_implementation: {asked}, but {where} cannot run it")
    return "sdpa", Decision("attention", "sdpa", f"attn_implementation: {asked} is not a kernel tunefile knows; "
                            "PyTorch SDPA")


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
