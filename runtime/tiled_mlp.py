"""ALST's tiled MLP: the run plan's ``model.tiled_mlp`` (Axolotl's ``tiled_mlp: true``).

Every decoder layer's MLP runs over the sequence in slices, so its intermediate activations (gate, up and their
product, intermediate_size wide: several times the hidden size, per token) exist for one slice at a time, in the
forward pass and in the backward pass. With long sequences they are the largest activations of a layer.

Why it is exact: an MLP acts on each token on its own, so its output computed slice by slice is the output of
the whole, and the gradient of its weights is the sum of the slices' gradients.

How (``TiledMlp``, a ``torch.autograd.Function``): forward runs the MLP on each slice with autograd off and keeps
only the MLP's input; backward runs each slice again with autograd on and takes that slice's gradients (of its
input and of the MLP's trainable parameters) with ``torch.autograd.grad``. The parameter gradients, summed over
the slices, are returned as the gradients of the Function's own inputs (the parameters are passed in), so
autograd accumulates each one into ``.grad`` once per backward pass, exactly as for the untiled MLP. That is what
keeps the wrappers working unchanged: DDP's reducer hooks and FSDP2's reduce-scatter see every gradient arrive
once, at the usual time. (Axolotl's and DeepSpeed's versions instead run a nested backward per slice that writes
``.grad`` directly, and need a workaround per wrapper.) The recomputation runs under the forward's autocast state
and, where the MLP has active dropout (a LoRA adapter's lora_dropout), with each slice's RNG state, as
``torch.utils.checkpoint`` does: bf16 mixed precision and dropout recompute the same numbers.

Under DeepSpeed (any ZeRO stage) the MLP runs through DeepSpeed's own ``TiledMLP``, as in Axolotl: ZeRO-3 gathers
the MLP's weights inside each slice's computation and must hold back its gradient reduction until the last slice
(DeepSpeed's ``ds_grad_is_ready``), which only DeepSpeed's version does. Every rank must then run the same number
of slices (each one gathers weights collectively), so a slice count derived from the batch is the maximum over the
ranks, as DeepSpeed does it.

Slices: ``num_shards``, or ``ceil(sequence length / 32768)`` decided per batch (the plan's None; Axolotl's rule).
Only dense MLPs are tiled: a mixture-of-experts block (experts, a router) routes tokens across the batch and records
router logits for the auxiliary loss, and is left as it is (recorded in the runtime decisions), as Axolotl does
unless its ScatterMoE kernels are on.

``use_original_mlp: false`` runs a generic gated MLP on the layer's own projections,
``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, instead of the module's forward (Axolotl's option, which it also
torch.compiles; tunefile does not compile). An MLP without those four attributes keeps its own forward, recorded.
"""

from __future__ import annotations

import functools
import logging
import math
import types
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..schemas.run_plan import DistributionPlan, TiledMlpPlan
from .errors import RuntimeUserError
from .kernels import transformers_model

log = logging.getLogger(__name__)

MLP_ATTRIBUTES = ("mlp", "feed_forward")  # a decoder layer's MLP, by architecture (feed_forward: Llama 4)
GATED_PROJECTIONS = ("gate_proj", "up_proj", "down_proj", "act_fn")
MOE_CHILDREN = ("experts", "router")
# Axolotl 0.19's default: about 32K tokens per slice (it measured 2-3× the speed of ALST's seq / hidden rule at
# 64K-512K tokens, for a few GiB more memory).
TOKENS_PER_SHARD = 32768
DEFAULT_SHARDS = f"ceil(sequence length / {TOKENS_PER_SHARD})"


class TiledMlpError(RuntimeUserError):
    """tiled_mlp cannot be carried out here; the message says why and what to do."""


# --- the autograd Function ----------------------------------------------------------------------------------

def autocast_states(device_type: str) -> list[dict[str, Any]]:
    """The autocast settings in force now, for ``device_type`` and the CPU (what torch.utils.checkpoint keeps)."""
    return [{"device_type": kind, "enabled": torch.is_autocast_enabled(kind), "dtype": torch.get_autocast_dtype(kind),
             "cache_enabled": torch.is_autocast_cache_enabled()}
            for kind in dict.fromkeys((device_type, "cpu"))]


@dataclass
class SliceRng:
    """The RNG state a slice's forward drew its dropout masks from, restored for its recomputation."""

    cpu: torch.Tensor
    device: torch.device | None
    device_state: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> SliceRng:
        if device.type == "cuda":
            return cls(torch.get_rng_state(), device, torch.cuda.get_rng_state(device))
        return cls(torch.get_rng_state(), None, None)

    @contextmanager
    def restored(self) -> Iterator[None]:
        """Run the block from this state, leaving the caller's RNG state as it was."""
        devices = [self.device] if self.device is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.device is not None:
                torch.cuda.set_rng_state(self.device_state, self.device)
            yield


class TiledMlp(torch.autograd.Function):
    """``run(x)`` over ``num_shards`` slices of the sequence (dimension -2), keeping only ``x`` for backward.

    ``params``: the trainable tensors ``run`` uses (the MLP's parameters that require grad); their gradients,
    summed over the slices, are this Function's gradients for them."""

    @staticmethod
    def forward(ctx: Any, run: Callable[[torch.Tensor], torch.Tensor], num_shards: int, preserve_rng: bool,
                x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.run, ctx.num_shards, ctx.params = run, num_shards, params
        ctx.autocast = autocast_states(x.device.type)
        ctx.rng = []
        outputs = []
        with torch.no_grad():
            for piece in x.chunk(num_shards, dim=-2):
                if preserve_rng:
                    ctx.rng.append(SliceRng.capture(x.device))
                outputs.append(run(piece))
        ctx.save_for_backward(x)
        return torch.cat(outputs, dim=-2)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        input_needs_grad = ctx.needs_input_grad[3]
        wanted = [i for i, needed in enumerate(ctx.needs_input_grad[4:]) if needed]
        params = [ctx.params[i] for i in wanted]
        x_grad = torch.empty_like(x) if input_needs_grad else None
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        pieces, grad_pieces = x.detach().chunk(ctx.num_shards, dim=-2), grad_output.chunk(ctx.num_shards, dim=-2)
        x_grad_pieces = x_grad.chunk(ctx.num_shards, dim=-2) if x_grad is not None else [None] * len(pieces)
        for i, (piece, grad_piece, x_grad_piece) in enumerate(zip(pieces, grad_pieces, x_grad_pieces, strict=True)):
            piece = piece.requires_grad_(input_needs_grad)
            with ExitStack() as stack:
                stack.enter_context(torch.enable_grad())
                for state in ctx.autocast:
                    stack.enter_context(torch.autocast(**state))
                if ctx.rng:
                    stack.enter_context(ctx.rng[i].restored())
                output = ctx.run(piece)
            inputs = ([piece] if input_needs_grad else []) + params
            grads = list(torch.autograd.grad(output, inputs, grad_piece, allow_unused=True))
            if input_needs_grad:
                x_grad_piece.copy_(grads.pop(0))
            for j, grad in enumerate(grads):
                if grad is not None:
                    param_grads[j] = grad if param_grads[j] is None else param_grads[j].add_(grad)
        all_param_grads: list[torch.Tensor | None] = [None] * len(ctx.params)
        for i, grad in zip(wanted, param_grads, strict=True):
            all_param_grads[i] = grad
        return None, None, None, x_grad, *all_param_grads


# --- the patched forward ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tiling:
    """What a tiled MLP module runs: kept on the module (``_tiled_mlp``) beside its untiled forward."""

    num_shards: int | None
    generic: bool  # the generic gated MLP on the module's projections instead of its own forward
    deepspeed: bool  # DeepSpeed's TiledMLP instead of TiledMlp
    preserve_rng: bool  # the module has dropout that draws random numbers in training


def default_shards(sequence_length: int) -> int:
    """The plan's num_shards None: one slice per TOKENS_PER_SHARD tokens, as Axolotl decides it."""
    return max(1, math.ceil(sequence_length / TOKENS_PER_SHARD))


def shards_for(tiling: Tiling, x: torch.Tensor) -> int:
    if tiling.num_shards is not None:
        return tiling.num_shards
    shards = default_shards(x.shape[-2])
    if tiling.deepspeed and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        agreed = torch.tensor(shards, device=x.device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        shards = int(agreed.item())
    return shards


def gated_mlp(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Axolotl's generic MLP: the module's own projections and activation, combined as a gated (SwiGLU-style) MLP."""
    return module.down_proj(module.act_fn(module.gate_proj(x)) * module.up_proj(x))


def tiled_forward(self: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The forward of a tiled MLP (bound to the module, so a deep copy of the model stays tiled on its own copy)."""
    tiling: Tiling = self._tiled_mlp
    untiled = self._untiled_forward
    if args or kwargs or x.dim() < 2:  # not the (…, sequence, hidden) call of a decoder layer
        return untiled(x, *args, **kwargs)
    run = functools.partial(gated_mlp, self) if tiling.generic else untiled
    shards = shards_for(tiling, x)
    params = [p for p in self.parameters() if p.requires_grad]
    if tiling.deepspeed:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

        return TiledMLP.apply(lambda module, piece: run(piece), self, x, shards, params)
    return TiledMlp.apply(run, shards, tiling.preserve_rng and self.training, x, *params)


def is_moe(module: torch.nn.Module) -> bool:
    name = type(module).__name__.lower()
    return any(hasattr(module, child) for child in MOE_CHILDREN) or "moe" in name or "sparse" in name


def has_dropout(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())


def tile(module: torch.nn.Module, tiling: Tiling) -> None:
    """Make ``module``'s forward tiled; ``module.forward`` before that (its class's, or a kernel's patch of the
    instance) is what runs on each slice."""
    module._untiled_forward = module.forward
    module._tiled_mlp = tiling
    module.forward = types.MethodType(tiled_forward, module)


def untile(module: torch.nn.Module) -> None:
    module.forward = module._untiled_forward
    del module._untiled_forward, module._tiled_mlp


# --- the model ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TiledMlpReport:
    """What ``apply_tiled_mlp`` did, for the runtime decisions."""

    planned: TiledMlpPlan | None
    tiled: tuple[str, ...] = ()  # the MLP modules now tiled
    implementation: str = ""
    untiled: dict[str, str] = field(default_factory=dict)  # MLP (or model) → why it is not tiled
    own_forward: dict[str, str] = field(default_factory=dict)  # use_original_mlp: false, kept their own forward

    def record(self) -> dict[str, Any]:
        if self.planned is None:
            return {}
        record: dict[str, Any] = {
            "layers": len(self.tiled), "implementation": self.implementation,
            "num_shards": self.planned.num_shards if self.planned.num_shards is not None else DEFAULT_SHARDS,
            "mlp": "the model's own" if self.planned.use_original_mlp else "generic gated"}
        if self.untiled:
            record["not_tiled"] = dict(self.untiled)
        if self.own_forward:
            record["own_forward"] = dict(self.own_forward)
        return {"tiled_mlp": record}


def decoder_mlps(model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Module]], str | None]:
    """([(name, MLP module) of each decoder layer], None), or ([], why there are none)."""
    base = transformers_model(model)
    get_decoder = getattr(base, "get_decoder", None)
    # get_decoder() is the decoder for most causal LMs; some (Llama 4's text model) return themselves from it and
    # keep the decoder in .model.
    candidates = (get_decoder() if get_decoder is not None else None, getattr(base, "model", None))
    layers = next((c.layers for c in candidates if isinstance(getattr(c, "layers", None), torch.nn.ModuleList)), None)
    if layers is None:
        return [], f"{type(base).__name__} has no decoder layer list (get_decoder().layers) to find its MLPs in"
    names = {id(module): name for name, module in model.named_modules()}
    found = []
    for layer in layers:
        for attribute in MLP_ATTRIBUTES:
            mlp = getattr(layer, attribute, None)
            if isinstance(mlp, torch.nn.Module):
                found.append((names[id(mlp)], mlp))
                break
    if not found:
        return [], f"the decoder layers of {type(base).__name__} have no {' or '.join(MLP_ATTRIBUTES)} module"
    return found, None


def apply_tiled_mlp(model: torch.nn.Module, plan: TiledMlpPlan | None, *,
                    distribution: DistributionPlan) -> TiledMlpReport:
    """Tile every dense decoder-layer MLP of ``model`` (loaded, adapters and kernels in place, not yet wrapped by
    accelerate) as ``plan`` says; a model with nothing to tile is logged and recorded, not an error."""
    if plan is None:
        return TiledMlpReport(None)
    deepspeed = distribution.deepspeed is not None
    if deepspeed:
        try:
            from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP  # noqa: F401
        except ImportError as exc:
            raise TiledMlpError(f"tiled_mlp under DeepSpeed runs DeepSpeed's TiledMLP, which cannot be imported "
                                f"({exc}): pip install -U deepspeed") from None
    implementation = "deepspeed TiledMLP" if deepspeed else "tunefile TiledMlp"
    mlps, reason = decoder_mlps(model)
    if reason is not None:
        log.warning("tiled_mlp: nothing tiled: %s", reason)
        return TiledMlpReport(plan, implementation=implementation, untiled={"model": reason})
    tiled, untiled, own_forward = [], {}, {}
    for name, mlp in mlps:
        if is_moe(mlp):
            untiled[name] = f"{type(mlp).__name__} is a mixture-of-experts block"
            continue
        generic = not plan.use_original_mlp
        if generic and not all(hasattr(mlp, attribute) for attribute in GATED_PROJECTIONS):
            own_forward[name] = f"{type(mlp).__name__} has no {', '.join(GATED_PROJECTIONS)} for the generic MLP"
            generic = False
        tile(mlp, Tiling(num_shards=plan.num_shards, generic=generic, deepspeed=deepspeed,
                         preserve_rng=has_dropout(mlp)))
        tiled.append(name)
    if untiled:
        log.warning("tiled_mlp: %d MLP(s) left untiled: %s", len(untiled), "; ".join(dict.fromkeys(untiled.values())))
    if own_forward:
        log.warning("tiled_mlp: %d MLP(s) tile their own forward: %s", len(own_forward),
                    "; ".join(dict.fromkeys(own_forward.values())))
    log.info("tiled_mlp: %d MLP(s) run in %s slices (%s)", len(tiled),
             plan.num_shards if plan.num_shards is not None else DEFAULT_SHARDS, implementation)
    return TiledMlpReport(plan, tiled=tuple(tiled), implementation=implementation, untiled=untiled,
                          own_forward=own_forward)
