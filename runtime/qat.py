"""Quantisation-aware training (the run plan's ``model.qat``) with torchao's fake quantisation.

Fake quantisation rounds a layer's weights (and its input activations) to the target format in forward
and back to high precision, so the loss sees the quantisation error; the rounding passes gradients
straight through, so the optimizer keeps updating the full-precision master weights. After training the
model is saved in full precision (the fake quantisers stripped, as Axolotl does at save time) and the
real quantisation is a later step, run with the same ``qat`` settings.

What each (weight, activation) pair means: the fake quantisation torchao itself derives, in
``QATConfig(base_config)``, from the post-training quantisation (PTQ) config that quantises a model that
way afterwards (for the pairs Axolotl knows, the configs its ``quantize`` command applies), so training
sees the error of the quantisation that follows. Every ``nn.Linear`` is
fake-quantised, the output head included, as in Axolotl; the embedding only with ``quantize_embedding``,
weight-only. Only nvfp4 and mxfp4 get fake-quantise configs written here: the ones torchao derives from
their PTQ configs pick kernels that need a Blackwell GPU (mxfp4) or the MSLK package (nvfp4), and
these are the same numerics on the emulated or plain-PyTorch path.

Ternary weights (BitNet b1.58, Axolotl's ``weight_dtype: ternary``) are tunefile's own fake quantisation in
runtime/qat_ternary.py, with Axolotl's rules rather than the ones above: every linear layer but the output head,
group_size unused (one absmean scale per row), int8 per-row embedding tables, and the ternary values baked into
the saved weights. torchao is needed there only for the embedding.

Order in the model's loading (runtime/model.py): weights, vocabulary resize, ``prepare_qat``,
gradient checkpointing, the LoRA adapter (which then wraps the fake-quantised linear layers: the frozen
base weights are fake-quantised, the adapter's low-rank update is not), and then accelerate's
DDP / FSDP2 / DeepSpeed wrapping, which shards the same parameters the fake-quantised layers hold.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

from ..schemas.run_plan import QatPlan
from .errors import RuntimeUserError
from .qat_ternary import (
    StraightThroughQuantizer,
    TernaryFakeQuantizedLinear,
    bake_ternary_weights,
    has_tied_output_embedding,
    prepare_ternary_linears,
)

log = logging.getLogger(__name__)

INSTALL = "pip install 'tunefile[torchao]'"
# The first torchao whose int4 and float8 fake quantisers honour their `enabled` switch (the delayed start); 0.17
# would silently keep them on.
MIN_TORCHAO = (0, 18)
# (weight_dtype, activation_dtype) pairs torchao can fake-quantise, with the PTQ config each one mirrors.
SUPPORTED_PAIRS = {
    ("int4", None): "Int4WeightOnlyConfig",
    ("int4", "int8"): "Int8DynamicActivationIntxWeightConfig (int4 weights)",
    ("int4", "float8_e4m3fn"): "Float8DynamicActivationInt4WeightConfig",
    ("int8", None): "IntxWeightOnlyConfig (int8 weights)",
    ("int8", "int8"): "Int8DynamicActivationIntxWeightConfig (int8 weights)",
    ("float8_e4m3fn", "float8_e4m3fn"): "Float8DynamicActivationFloat8WeightConfig",
    ("nvfp4", "nvfp4"): "NVFP4DynamicActivationNVFP4WeightConfig",
    ("mxfp4", "mxfp4"): "MXDynamicActivationMXWeightConfig (fp4)",
    ("ternary", None): "ternary weights, absmean per row (runtime/qat_ternary.py)",
    ("ternary", "int8"): "ternary weights, int8 activations per token (runtime/qat_ternary.py)",
}
# The group size a format fixes; a plan asking for another would train for a quantisation that never comes.
FIXED_GROUP_SIZE = {("int4", "float8_e4m3fn"): 128, ("nvfp4", "nvfp4"): 16, ("mxfp4", "mxfp4"): 32}
# Every other pair quantises weights in groups of input features, so group_size must divide each row.
# Per-tensor or per-row scales: group_size does not apply.
UNGROUPED = {("float8_e4m3fn", "float8_e4m3fn"), ("ternary", None), ("ternary", "int8")}
# int4 / int8: the weight-only PTQ configs torchao derives embedding QAT from; ternary: int8 per row (Axolotl's).
EMBEDDING_WEIGHTS = ("int4", "int8", "ternary")
NVFP4_MIN_CAPABILITY = (10, 0)  # torchao's NVFP4 layers run the real FP4 matmul: Blackwell or newer


class QatError(RuntimeUserError):
    """The plan's qat section cannot be carried out here; the message names the key and the fix."""


def _pair(qat: QatPlan) -> tuple[str, str | None]:
    return qat.weight_dtype, qat.activation_dtype


def _pair_name(qat: QatPlan) -> str:
    return f"{qat.weight_dtype} weights with {qat.activation_dtype or 'unquantised'} activations"


def check_qat_plan(qat: QatPlan) -> None:
    """QatError for a plan torchao cannot fake-quantise (the pair, its group size, the embedding, the
    delayed start): checked before any weight is loaded."""
    pair = _pair(qat)
    if pair not in SUPPORTED_PAIRS:
        allowed = ", ".join(f"{w}/{a or 'none'}" for w, a in SUPPORTED_PAIRS)
        raise QatError(f"qat: torchao cannot fake-quantise {_pair_name(qat)}; weight/activation pairs it can: "
                       f"{allowed}")
    fixed = FIXED_GROUP_SIZE.get(pair)
    if fixed is not None and qat.group_size != fixed:
        raise QatError(f"qat.group_size {qat.group_size}: {_pair_name(qat)} are quantised in groups of {fixed} "
                       f"(torchao's {SUPPORTED_PAIRS[pair]}); set qat.group_size: {fixed}")
    if qat.quantize_embedding and qat.weight_dtype not in EMBEDDING_WEIGHTS:
        raise QatError(f"qat.quantize_embedding: an embedding is fake-quantised only with int4 or int8 weights, "
                       f"or ternary (an int8 table), not {qat.weight_dtype}; set it to false")
    if qat.fake_quant_after_n_steps and qat.weight_dtype in ("nvfp4", "mxfp4"):
        raise QatError(f"qat.fake_quant_after_n_steps: torchao's {qat.weight_dtype} layers have no switch to "
                       "train unquantised first; remove fake_quant_after_n_steps")


def check_qat_device(qat: QatPlan, device: torch.device) -> None:
    """QatError where this machine cannot run the plan's fake quantisation (the fp4 formats need CUDA)."""
    if qat.weight_dtype not in ("nvfp4", "mxfp4"):
        return  # the integer, float8 and ternary fake quantisation is plain PyTorch: any device
    if device.type != "cuda":
        raise QatError(f"qat: {qat.weight_dtype} fake quantisation needs a CUDA GPU (torchao's fp4 kernels); "
                       f"this run is on {device.type}")
    if qat.weight_dtype == "nvfp4" and torch.cuda.get_device_capability(device) < NVFP4_MIN_CAPABILITY:
        have = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise QatError(f"qat: nvfp4 fake quantisation needs a Blackwell GPU (compute capability 10.0 or newer; "
                       f"torchao runs the real FP4 matmul in forward); this one is {have}. mxfp4 is emulated "
                       "on older GPUs")


def check_qat(qat: QatPlan, device: torch.device) -> None:
    """Everything that can refuse the plan's qat on this machine, before any weight is loaded: torchao
    missing (where the plan needs it), a combination it cannot fake-quantise, a device its kernels do not run on."""
    if needs_torchao(qat):
        _torchao_qat()
    check_qat_plan(qat)
    check_qat_device(qat, device)


def needs_torchao(qat: QatPlan) -> bool:
    """Whether the plan's fake quantisation uses torchao: all but ternary weights, whose linear layers are
    runtime/qat_ternary.py's (the int8 embedding of quantize_embedding is still torchao's)."""
    return qat.weight_dtype != "ternary" or qat.quantize_embedding


def _torchao_qat() -> Any:
    try:
        import torchao
        from torchao.quantization import qat
    except ImportError as exc:
        raise QatError(f"qat needs torchao, which cannot be imported ({exc}): {INSTALL}") from None
    from packaging.version import Version

    if Version(torchao.__version__).release < MIN_TORCHAO:
        raise QatError(f"qat needs torchao {'.'.join(map(str, MIN_TORCHAO))} or later, this is {torchao.__version__}: "
                       f"pip install -U 'tunefile[torchao]'")
    return qat


def _int_dtype(name: str) -> torch.dtype:
    return {"int4": torch.int4, "int8": torch.int8}[name]


def linear_qat_config(qat: QatPlan) -> Any:
    """torchao's ``QATConfig`` (prepare step) for the linear layers."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8DynamicActivationInt4WeightConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerGroup, PerTensor

    QATConfig = _torchao_qat().QATConfig
    weight, activation = _pair(qat)
    if (weight, activation) == ("nvfp4", "nvfp4"):
        from torchao.prototype.qat import NVFP4FakeQuantizeConfig

        # Dynamic per-tensor and per-block (16) scales, as NVFP4DynamicActivationNVFP4WeightConfig; the
        # PyTorch scaling rather than the MSLK triton kernel (same numbers, one package fewer).
        fake = NVFP4FakeQuantizeConfig(use_per_tensor_scale=True, use_swizzled_scales=False, use_triton_kernel=False)
        return QATConfig(activation_config=fake, weight_config=fake)
    if (weight, activation) == ("mxfp4", "mxfp4"):
        from torchao.prototype.qat import MXFakeQuantizeConfig
        from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

        # The emulated matmul (dequantise, then a high-precision mm): the same values as the MX kernels
        # of a Blackwell GPU, on any CUDA GPU.
        fake = MXFakeQuantizeConfig(dtype=torch.float4_e2m1fn_x2, block_size=qat.group_size,
                                    kernel_preference=KernelPreference.EMULATED)
        return QATConfig(activation_config=fake, weight_config=fake)
    group = PerGroup(qat.group_size)
    base = {
        ("int4", None): lambda: Int4WeightOnlyConfig(group_size=qat.group_size),
        ("int4", "int8"): lambda: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                                        weight_granularity=group),
        ("int8", "int8"): lambda: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8,
                                                                        weight_granularity=group),
        ("int8", None): lambda: IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=group),
        ("int4", "float8_e4m3fn"): Float8DynamicActivationInt4WeightConfig,  # groups of 128, checked
        ("float8_e4m3fn", "float8_e4m3fn"): lambda: Float8DynamicActivationFloat8WeightConfig(
            granularity=PerTensor()),  # its default, spelled out: group_size does not apply
    }[(weight, activation)]()
    return QATConfig(base)


def embedding_qat_config(qat: QatPlan) -> Any:
    """torchao's ``QATConfig`` for the embedding: weight-only, in the weights' integer format."""
    from torchao.quantization import Int4WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    QATConfig = _torchao_qat().QATConfig
    if qat.weight_dtype == "int4":
        return QATConfig(Int4WeightOnlyConfig(group_size=qat.group_size))
    return QATConfig(IntxWeightOnlyConfig(weight_dtype=_int_dtype(qat.weight_dtype),
                                          granularity=PerGroup(qat.group_size)))


def _is_linear(module: torch.nn.Module, _name: str) -> bool:
    # nn.Linear and its subclasses (bitsandbytes' are refused before this); never a layer already prepared.
    return isinstance(module, torch.nn.Linear) and not _is_fake_quantized(module)


def _is_embedding(module: torch.nn.Module, _name: str) -> bool:
    return isinstance(module, torch.nn.Embedding) and not _is_fake_quantized(module)


@functools.cache
def _fp4_linear_classes() -> tuple[type, ...]:
    from torchao.prototype.qat import MXFakeQuantizedLinear, NVFP4FakeQuantizedLinear

    return MXFakeQuantizedLinear, NVFP4FakeQuantizedLinear


@functools.cache  # caches the classes only: a missing torchao raises, and is asked again next time
def _torchao_fake_quantized_classes() -> tuple[type, ...]:
    qat = _torchao_qat()
    return qat.FakeQuantizedLinear, qat.FakeQuantizedEmbedding, *_fp4_linear_classes()


def _fake_quantized_classes() -> tuple[type, ...]:
    try:
        torchao_classes = _torchao_fake_quantized_classes()
    except QatError:  # no torchao: a ternary run without quantize_embedding has none of its layers
        torchao_classes = ()
    return TernaryFakeQuantizedLinear, *torchao_classes


def _is_fake_quantized(module: torch.nn.Module) -> bool:
    return isinstance(module, _fake_quantized_classes())


def fake_quantized_modules(model: torch.nn.Module) -> list[str]:
    """Names of the model's fake-quantised layers (empty once stripped)."""
    classes = _fake_quantized_classes()
    return [name for name, module in model.named_modules() if isinstance(module, classes)]


def _check_group_widths(model: torch.nn.Module, qat: QatPlan, include: Callable[[torch.nn.Module, str], bool],
                        width: Callable[[torch.nn.Module], int]) -> None:
    # torchao's int4 fake quantiser reshapes rows into groups and fails mid-forward on a remainder.
    for name, module in model.named_modules():
        if include(module, name) and width(module) % qat.group_size:
            raise QatError(f"qat.group_size {qat.group_size} does not divide the {width(module)} columns of "
                           f"{name}'s weight; choose a group size that divides every quantised layer's width")


def prepare_qat(model: torch.nn.Module, qat: QatPlan, decisions: dict[str, Any] | None = None) -> None:
    """Swap the model's linear layers (and, with quantize_embedding, its embeddings) for fake-quantised ones,
    in place: torchao's, or for ternary weights runtime/qat_ternary.py's. The swapped layers hold the same
    parameter objects, so tied weights stay tied and the state dict keeps its keys: a checkpoint of a prepared
    model loads into a freshly prepared one, and fake quantisation itself holds no state (its scales are
    recomputed every forward). ``decisions`` receives what could not be honoured on this model (a tied
    embedding ternary QAT leaves unquantised)."""
    check_qat_plan(qat)
    if qat.weight_dtype == "ternary":
        _prepare_ternary_qat(model, qat, decisions)
        return
    _torchao_qat()  # missing or too old: one line, before the imports below fail with a traceback
    from torchao.quantization import quantize_

    pair = _pair(qat)
    if pair not in UNGROUPED:
        _check_group_widths(model, qat, _is_linear, lambda m: m.in_features)
    if qat.quantize_embedding:
        _check_group_widths(model, qat, _is_embedding, lambda m: m.embedding_dim)
    quantize_(model, linear_qat_config(qat), filter_fn=_is_linear)
    if qat.quantize_embedding:
        quantize_(model, embedding_qat_config(qat), filter_fn=_is_embedding)
    for module in model.modules():
        if isinstance(module, _fp4_linear_classes()):
            module.register_forward_pre_hook(_input_in_autocast_dtype)
    log.info("quantisation-aware training: %d layers fake-quantised (%s, group size %d, after %s steps)",
             len(fake_quantized_modules(model)), _pair_name(qat), qat.group_size,
             qat.fake_quant_after_n_steps or 0)


def ternary_embedding_qat_config() -> Any:
    """torchao's ``QATConfig`` for the embedding under ternary QAT (Axolotl's): int8, symmetric, one scale per
    row of the table, weight-only."""
    from torchao.quantization.qat.fake_quantize_config import IntxFakeQuantizeConfig

    QATConfig = _torchao_qat().QATConfig
    return QATConfig(weight_config=IntxFakeQuantizeConfig(dtype=torch.int8, granularity="per_channel"))


TIED_EMBEDDING_SKIPPED = ("qat.quantize_embedding not applied: the output head shares the input embedding's "
                          "weight, and ternary QAT keeps the output head in full precision (untie them to "
                          "quantise the table)")


def _prepare_ternary_qat(model: torch.nn.Module, qat: QatPlan, decisions: dict[str, Any] | None) -> None:
    names = prepare_ternary_linears(model, quantize_activations=qat.activation_dtype is not None)
    embeddings = 0
    if qat.quantize_embedding:
        if has_tied_output_embedding(model):  # as Axolotl: the table would carry int8 into the head
            log.warning("%s", TIED_EMBEDDING_SKIPPED)
            if decisions is not None:
                decisions["qat_embedding"] = TIED_EMBEDDING_SKIPPED
        else:
            _torchao_qat()  # missing or too old: one line, before the import below fails with a traceback
            from torchao.quantization import quantize_

            quantize_(model, ternary_embedding_qat_config(), filter_fn=_is_embedding)
            embeddings = len(fake_quantized_modules(model)) - len(names)
    log.info("quantisation-aware training: %d linear layers ternary (%s activations), %d embeddings int8, "
             "after %s steps", len(names), qat.activation_dtype or "unquantised", embeddings,
             qat.fake_quant_after_n_steps or 0)


def _input_in_autocast_dtype(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    # torchao's fp4 layers keep their input's dtype and assert it, but their matmul obeys autocast: with fp32
    # master weights under bf16 autocast an fp32 input came back as bf16 and failed the assertion. Cast the
    # input as autocast casts a plain linear layer's; the result is what nn.Linear gives under autocast.
    x = args[0]
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        if x.dtype != dtype:
            return (x.to(dtype), *args[1:])
    return None


def set_fake_quantization(model: torch.nn.Module, enabled: bool) -> None:
    """Switch every fake quantiser on or off (off: the layers compute with the full-precision weights and
    activations). Each of torchao's quantisers carries an ``enabled`` flag, the one its
    ``enable_linear_fake_quant`` sets on a linear layer's two; the embedding's has no helper, so the flags
    are set directly. The nvfp4/mxfp4 layers have none; check_qat_plan refuses a delayed start for them.
    The ternary layers' quantisers (runtime/qat_ternary.py) carry the same flag."""
    try:
        quantizers: tuple[type, ...] = (StraightThroughQuantizer, _torchao_qat().FakeQuantizerBase)
    except QatError:  # no torchao: only ternary layers can be here
        quantizers = (StraightThroughQuantizer,)
    for module in model.modules():
        if isinstance(module, quantizers):
            module.enabled = enabled


def fake_quantization_on(qat: QatPlan, steps_done: int) -> bool:
    """Whether the step after ``steps_done`` optimizer steps trains fake-quantised."""
    return qat.fake_quant_after_n_steps is None or steps_done >= qat.fake_quant_after_n_steps


class FakeQuantSchedule:
    """Fake quantisation off for the plan's first fake_quant_after_n_steps optimizer steps, then on. The
    trainer calls ``at_step`` at every step boundary and after resuming: the switch is a pure function of the
    step count, so a resumed run (whose checkpoint holds no switch state) trains exactly as an unbroken one."""

    def __init__(self, qat: QatPlan | None) -> None:
        self.qat = qat
        self.enabled: bool | None = None  # torchao builds its quantisers on: unknown until the first call

    def at_step(self, model: torch.nn.Module, steps_done: int) -> None:
        if self.qat is None or self.qat.fake_quant_after_n_steps is None:
            return  # no QAT, or on from the start as prepare_qat left it
        enabled = fake_quantization_on(self.qat, steps_done)
        if enabled != self.enabled:
            set_fake_quantization(model, enabled)
            log.info("fake quantisation %s after %d optimizer steps", "on" if enabled else "off", steps_done)
            self.enabled = enabled


def strip_fake_quantization(model: torch.nn.Module) -> None:
    """Swap the fake-quantised layers back for plain ``nn.Linear`` / ``nn.Embedding``, so the model saves, and
    loads with plain transformers, as the architecture it came from. As Axolotl: ternary layers hold their
    ternary-rounded weights from then on (baked); torchao's hold the same trained weights (its convert step
    without a PTQ config), the real quantisation left to a later quantise step with the same qat settings."""
    baked = bake_ternary_weights(model)
    if baked:
        log.info("ternary QAT: the ternary weights of %d linear layers baked into the model", baked)
    if any(isinstance(module, _fake_quantized_classes()) for module in model.modules()):
        qat = _torchao_qat()
        from torchao.quantization import quantize_

        quantize_(model, qat.QATConfig(step="convert"),
                  filter_fn=lambda module, _name: _is_fake_quantized(module))
    left = fake_quantized_modules(model)
    if left:  # the root module itself: quantize_ swaps children only
        raise QatError(f"qat: could not strip the fake quantisation of {left[0] or 'the model'}")
