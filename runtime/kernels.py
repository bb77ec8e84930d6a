"""The fused kernels of Axolotl's Liger and cut-cross-entropy plugins, patched into the loaded model.

The compiler decided which kernels the run wants (the run plan's ``kernels``). Here, on the machine the run
landed on, each one is either put in place or falls back to PyTorch's own code with the reason, logged once
and recorded in the runtime decisions (metrics.jsonl, train_summary.json): both are Triton kernels, so they
need liger-kernel or cut-cross-entropy installed (``pip install 'tunefile[liger]'`` / ``'tunefile[cce]'``) and
a CUDA device.

- Liger's RMSNorm, SwiGLU/GeGLU MLP, LayerNorm, RoPE (and gated RMSNorm, where a liger-kernel release has it):
  liger-kernel's own ``apply_liger_kernel_to_<arch>`` for the model's architecture, called on the loaded model
  once per kernel (every other switch off, its loss patches included: tunefile computes the loss itself), so
  each kernel succeeds or falls back on its own.
  Liger patches the norm and MLP modules of the instance; RoPE it replaces in transformers' modelling module,
  for the whole process (attention looks ``apply_rotary_pos_emb`` up there at every call).
- The loss, Liger's fused linear cross-entropy or cut-cross-entropy: the model runs as usual through every
  wrapper (peft, DDP, FSDP, DeepSpeed) with ``logits_to_keep=1``, so its head computes one position's logits;
  a hook on the decoder keeps the final hidden states, and losses.linear_token_loss_sum turns them and the
  output head's weight into the same SUM of token losses the plain path computes, chunk by chunk.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from ..schemas.run_plan import DistributionPlan, KernelsPlan
from .losses import IGNORE_INDEX, LinearCrossEntropySum, linear_token_loss_sum

log = logging.getLogger(__name__)

LOSS_KERNELS = ("liger_fused_linear_cross_entropy", "cut_cross_entropy")
# Every other kernel of the plan is a Liger module kernel, switched on by the argument of liger-kernel's apply
# function named like it (liger_rms_norm: rms_norm), but for the gated MLP, whose argument names the activation.
KERNEL_NAMES = {"rms_norm": "RMSNorm", "rope": "RoPE", "layer_norm": "LayerNorm", "rms_norm_gated": "gated RMSNorm"}
# Liger's gated MLP arguments and the activations each kernel computes (GeGLU: GELU's tanh approximation).
GLU_ACTIVATIONS = {"swiglu": frozenset({"silu", "swish"}), "geglu": frozenset({"gelu_pytorch_tanh", "gelu_new"})}
# Architectures whose causal LM computes its logits as the output head applied to the decoder's output, then at
# most a final_logit_softcapping (read from transformers 5's modelling code): the fused losses reproduce these.
# Others scale their logits (granite: logits_scaling, cohere: logit_scale, falcon_h1: lm_head_multiplier) or
# were not checked, and keep the plain loss.
PLAIN_HEAD_ARCHITECTURES = frozenset({
    "llama", "mistral", "ministral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "phi3", "olmo2", "smollm3",
})
MATMUL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --- what runs where ----------------------------------------------------------------------------------------

def requested_kernels(kernels: KernelsPlan) -> list[str]:
    return [f.name for f in dataclasses.fields(kernels) if getattr(kernels, f.name)]


def package_of(kernel: str) -> tuple[str, str]:
    """(the package ``kernel`` comes from, the tunefile extra that installs it)."""
    return ("cut-cross-entropy", "cce") if kernel == "cut_cross_entropy" else ("liger-kernel", "liger")


def device_reason(device_type: str) -> str | None:
    """Why no Triton kernel runs here, or None on a CUDA device."""
    if device_type == "cuda":
        return None
    return f"a Triton kernel, it needs a CUDA GPU, and this process runs on the {device_type}"


def missing_package_reason(kernel: str, exc: Exception) -> str:
    package, extra = package_of(kernel)
    return f"{package} cannot be imported ({exc}): pip install 'tunefile[{extra}]'"


def liger_argument(kernel: str, parameters: Collection[str], *, model_type: str, activation: str | None,
                   layer_norms: int) -> tuple[str | None, str | None]:
    """(the argument of liger-kernel's apply function for ``model_type`` that switches ``kernel`` on, None) or
    (None, why that kernel cannot run on this architecture). ``parameters``: the apply function's parameter
    names; ``activation``: the model's MLP activation; ``layer_norms``: how many LayerNorm modules it has."""
    if kernel == "liger_glu_activation":
        for argument, activations in GLU_ACTIVATIONS.items():
            if argument in parameters:
                if activation not in activations:
                    # Liger's module computes its own activation whatever the config says: patching would
                    # change the model.
                    return None, (f"Liger's {argument} computes {' / '.join(sorted(activations))}, and "
                                  f"{model_type}'s MLP uses {activation}")
                return argument, None
        return None, f"liger-kernel has no SwiGLU/GeGLU MLP patch for {model_type}"
    argument = kernel.removeprefix("liger_")
    if argument in parameters:
        return argument, None
    if argument == "layer_norm" and layer_norms == 0:
        return None, f"{model_type} has no LayerNorm layers"
    return None, f"liger-kernel has no {KERNEL_NAMES.get(argument, argument)} patch for {model_type}"


def mlp_activation(config: Any) -> str | None:
    """The MLP activation's name in a transformers config (Gemma's is hidden_activation, most others' hidden_act)."""
    text = config.get_text_config()
    for name in ("hidden_activation", "hidden_act"):
        value = getattr(text, name, None)
        if value is not None:
            return str(value)
    return None


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (peft injects its layers into it in place), or ``model``."""
    get_base_model = getattr(type(model), "get_base_model", None)
    return model.get_base_model() if get_base_model is not None else model


# --- Liger's module kernels ---------------------------------------------------------------------------------

def apply_liger_modules(model: torch.nn.Module, wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    """Patch ``wanted`` Liger kernels into ``model`` (a transformers model, on a CUDA machine): (applied, fallbacks
    with their reasons)."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as exc:  # not installed, or its triton / transformers do not import
        return [], {kernel: missing_package_reason(kernel, exc) for kernel in wanted}
    model_type = model.config.model_type
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        return [], dict.fromkeys(wanted, f"liger-kernel has no patches for the {model_type} architecture")
    parameters = inspect.signature(apply).parameters
    # Every switch of the apply function off (their defaults turn on Liger's own loss, which would replace the
    # model's forward), then the one kernel on.
    switches = {name: False for name, p in parameters.items() if isinstance(p.default, bool)}
    layer_norms = sum(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    applied, fallbacks = [], {}
    for kernel in wanted:
        argument, reason = liger_argument(kernel, parameters, model_type=model_type,
                                          activation=mlp_activation(model.config), layer_norms=layer_norms)
        if argument is None:
            fallbacks[kernel] = reason
            continue
        try:
            apply(**{**switches, argument: True}, model=model)
        except Exception as exc:  # liger's patch expects another layout of this architecture's modules
            fallbacks[kernel] = (f"liger-kernel's {model_type} patch failed ({type(exc).__name__}: {exc}); modules "
                                 "it reached before failing run Liger's kernel")
        else:
            applied.append(kernel)
    return applied, fallbacks


# --- the fused loss -----------------------------------------------------------------------------------------

class FinalHiddenStates:
    """The decoder's output, which the output head reads, caught during one forward of the whole model.

    The forward goes through the outermost wrapper as on the plain path, so peft, DDP, FSDP and DeepSpeed see
    an ordinary forward; the hook keeps a tensor only while ``of`` runs (not in evaluation, nor when
    activation checkpointing runs the forward again during backward)."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        self._catching = False
        self._caught: torch.Tensor | None = None
        decoder.register_forward_hook(self._catch)

    def _catch(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._catching:
            self._caught = output[0]  # last_hidden_state, of a ModelOutput or a tuple alike

    def of(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """The final hidden states [B, L, H] of ``model(**inputs)``, whose head computes only the last position."""
        self._catching = True
        try:
            model(**inputs, use_cache=False, logits_to_keep=1)
        finally:
            self._catching = False
        hidden, self._caught = self._caught, None
        if hidden is None:
            raise RuntimeError("the fused loss caught no hidden states: the model's forward did not run its decoder")
        return hidden


@dataclass
class FusedLoss:
    """``(model, inputs, labels) → (sum of token losses, label tokens)`` like token_loss_sum of the model's
    logits, computed by ``linear_cross_entropy`` from the final hidden states and the output head."""

    kernel: str
    linear_cross_entropy: LinearCrossEntropySum
    hidden_states: FinalHiddenStates
    output_head: Callable[[], torch.nn.Module]  # looked up at every call: peft may have replaced the module
    dtype: torch.dtype  # the head's matmul dtype on the plain path (the run's precision)
    softcap: float | None

    def __call__(self, model: torch.nn.Module, inputs: dict[str, Any],
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.hidden_states.of(model, inputs)
        head = self.output_head()
        weight = head.weight
        if type(weight).__name__ == "DTensor":
            # FSDP resharded the head after its own forward (it is wrapped as a unit of its own): its full weight
            # is not at hand here. The compiler's wrap policy keeps it in the root, which stays unsharded.
            raise RuntimeError(f"{self.kernel}: the output head's weight is sharded outside its forward; wrap the "
                               "output head with the root module, or turn the fused loss off")
        return linear_token_loss_sum(hidden, weight, head.bias, labels, dtype=self.dtype, softcap=self.softcap,
                                     linear_cross_entropy=self.linear_cross_entropy)


def fused_loss(model: torch.nn.Module, kernel: str, linear_cross_entropy: LinearCrossEntropySum, *,
               dtype: torch.dtype) -> FusedLoss:
    """The fused loss of ``model`` (peft-wrapped or not; before accelerate wraps it) computed by
    ``linear_cross_entropy``. Registers its hook on the decoder."""
    base = transformers_model(model)
    return FusedLoss(kernel=kernel, linear_cross_entropy=linear_cross_entropy,
                     hidden_states=FinalHiddenStates(base.get_decoder()), output_head=base.get_output_embeddings,
                     dtype=dtype, softcap=getattr(base.config.get_text_config(), "final_logit_softcapping", None))


def loss_reason(model: torch.nn.Module, kernel: str, *, distribution: DistributionPlan) -> str | None:
    """Why ``kernel`` cannot reproduce this model's loss, or None."""
    base = transformers_model(model)
    model_type = base.config.model_type
    if model_type not in PLAIN_HEAD_ARCHITECTURES:
        return (f"tunefile has checked that the logits are the output head of the final hidden states (with at most "
                f"a softcap) only for {', '.join(sorted(PLAIN_HEAD_ARCHITECTURES))}, not {model_type}")
    zero = distribution.deepspeed
    if zero is not None and zero.stage == 3 and not zero.frozen_base_whole:  # whole, the head's weight is at hand
        return "DeepSpeed ZeRO-3 partitions the output head's weight outside the head's own forward"
    head = base.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        return f"{model_type} has no output head with a weight"
    if hasattr(head, "lora_A"):
        return "the output head carries a LoRA adapter, which the fused loss would leave out"
    if not head.weight.is_floating_point():
        return "the output head is quantised"
    if kernel == "cut_cross_entropy" and head.bias is not None:
        return "cut-cross-entropy has no bias term, and the output head has one"
    return None


def liger_linear_cross_entropy() -> LinearCrossEntropySum:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    def loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 softcap: float | None) -> torch.Tensor:
        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", softcap=softcap)
        return loss(weight, hidden, targets, bias)

    return loss_sum


def cce_linear_cross_entropy() -> LinearCrossEntropySum:
    from cut_cross_entropy import linear_cross_entropy

    def loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 softcap: float | None) -> torch.Tensor:
        # loss_reason keeps heads with a bias off this kernel. Its gradient filter (the default) skips the
        # vocabulary entries whose softmax is below bf16's resolution: the loss is exact, the gradient nearly so.
        return linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, softcap=softcap,
                                    reduction="sum")

    return loss_sum


LOSS_IMPLEMENTATIONS: dict[str, Callable[[], LinearCrossEntropySum]] = {
    "liger_fused_linear_cross_entropy": liger_linear_cross_entropy,
    "cut_cross_entropy": cce_linear_cross_entropy,
}


# --- all of it ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelReport:
    """What ``apply_kernels`` did: the kernels in place, the ones running PyTorch's code instead (with why), and
    the fused loss the trainer calls instead of the logits' (None: the plain loss)."""

    applied: tuple[str, ...] = ()
    fallbacks: dict[str, str] = field(default_factory=dict)
    loss: FusedLoss | None = None

    def record(self) -> dict[str, Any]:
        """For the runtime decisions; empty when the plan asked for no kernel."""
        if not self.applied and not self.fallbacks:
            return {}
        return {"kernels": {"applied": list(self.applied), "fallbacks": dict(self.fallbacks)}}


def build_fused_loss(model: torch.nn.Module, kernel: str, *, precision: str,
                     distribution: DistributionPlan) -> tuple[FusedLoss | None, str | None]:
    """(the fused loss ``kernel`` computes for ``model``, None) or (None, why it cannot), on a CUDA machine."""
    reason = loss_reason(model, kernel, distribution=distribution)
    if reason is not None:
        return None, reason
    try:
        implementation = LOSS_IMPLEMENTATIONS[kernel]()
    except ImportError as exc:  # not installed, or its triton does not import
        return None, missing_package_reason(kernel, exc)
    return fused_loss(model, kernel, implementation, dtype=MATMUL_DTYPES[precision]), None


def apply_kernels(model: torch.nn.Module, kernels: KernelsPlan, *, device_type: str, precision: str,
                  distribution: DistributionPlan) -> KernelReport:
    """Put the plan's kernels into ``model`` (loaded, adapters added, not yet wrapped by accelerate) as far as
    this machine allows; the ones that cannot run fall back, with one log line per reason."""
    wanted = requested_kernels(kernels)
    applied: list[str] = []
    fallbacks: dict[str, str] = {}
    loss = None
    reason = device_reason(device_type)
    if reason is not None:
        fallbacks = dict.fromkeys(wanted, reason)
    elif wanted:
        liger = [kernel for kernel in wanted if kernel not in LOSS_KERNELS]
        if liger:
            applied, fallbacks = apply_liger_modules(transformers_model(model), liger)
        for kernel in (kernel for kernel in wanted if kernel in LOSS_KERNELS):  # at most one (the plan's rule)
            loss, reason = build_fused_loss(model, kernel, precision=precision, distribution=distribution)
            if reason is None:
                applied.append(kernel)
            else:
                fallbacks[kernel] = reason
    for why in dict.fromkeys(fallbacks.values()):
        names = [kernel for kernel in wanted if fallbacks.get(kernel) == why]
        log.warning("kernels: %s not used, PyTorch's code runs instead: %s", ", ".join(names), why)
    if applied:
        log.info("kernels: %s in place", ", ".join(applied))
    return KernelReport(applied=tuple(applied), fallbacks={k: fallbacks[k] for k in wanted if k in fallbacks},
                        loss=loss)
