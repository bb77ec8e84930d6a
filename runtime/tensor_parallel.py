"""Tensor parallelism (Axolotl's tensor_parallel_size): the model's own tensor-parallel plan, applied with PyTorch's
DTensor parallel styles over the mesh's ``tp`` dimension.

A transformers model names how each of its layers splits (``config.base_model_tp_plan`` for the decoder, the
class's ``_tp_plan`` for the output head): ``colwise`` layers (q/k/v, gate/up) keep 1/tp of their output features
and hand their local slice on, so each rank computes 1/tp of the attention heads and of the MLP; ``rowwise`` layers
(o_proj, down_proj) take that slice and all-reduce their output; the output head (``colwise_gather_output``) splits
the vocabulary and gathers the logits. Axolotl asks transformers for the same plan (``tp_plan="auto"``); tunefile
applies it with PyTorch's ColwiseParallel/RowwiseParallel, whose API does not change from one transformers release
to the next.

Every other parameter (embeddings, norms) becomes a replicated DTensor on the same mesh, its module converting
inputs and outputs at its edges: FSDP2 then shards every parameter over the data-parallel dimensions the same way
(2-D: data-parallel × tensor-parallel), and the gradient norm is one norm over one kind of tensor. Per-head norms
that see only this rank's heads (Qwen3's q_norm/k_norm: ``replicated_with_grad_allreduce``) read their input as
sharded over the heads, so their weight's gradient is summed over the tensor-parallel ranks.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .errors import RuntimeUserError

log = logging.getLogger(__name__)

# The plan's styles tunefile carries out; MoE experts, packed projections and the rest are refused by name.
SUPPORTED_STYLES = ("colwise", "rowwise", "colwise_gather_output", "replicated_with_grad_allreduce")


class TensorParallelError(RuntimeUserError):
    """The model cannot be split as the plan asks; the message says why."""


def model_plan(model: torch.nn.Module) -> dict[str, str]:
    """The model's tensor-parallel plan, keys relative to ``model``: the decoder's (config.base_model_tp_plan,
    under the base model's attribute) and the head's (the class's _tp_plan)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    base = getattr(config, "base_model_tp_plan", None) or {}
    prefix = getattr(model, "base_model_prefix", "")
    plan = {f"{prefix}.{key}" if prefix and hasattr(model, prefix) else key: style for key, style in base.items()}
    head = getattr(type(model), "_tp_plan", None) or {}
    plan.update({key: style for key, style in head.items() if not key.startswith(f"{prefix}.")})
    return plan


def check_divisible(config: Any, size: int) -> None:
    """Every split dimension must divide by ``size``: the attention heads, the key/value heads, the MLP width."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    dims = {"num_attention_heads": getattr(text, "num_attention_heads", None),
            "num_key_value_heads": getattr(text, "num_key_value_heads", None)
            or getattr(text, "num_attention_heads", None),
            "intermediate_size": getattr(text, "intermediate_size", None)}
    bad = [f"{name} {value}" for name, value in dims.items() if isinstance(value, int) and value % size]
    if bad:
        raise TensorParallelError(f"tensor_parallel_size {size} does not divide the model's {', '.join(bad)}; "
                                  "choose a size that divides them")


def check_model(model: torch.nn.Module, size: int) -> dict[str, str]:
    """The plan to apply, after refusing what cannot be split: no plan, a style tunefile does not carry out, tied
    input and output embeddings (one tensor cannot be replicated for the embedding and split for the head)."""
    plan = model_plan(model)
    if not plan:
        raise TensorParallelError(f"{model.config.model_type} has no tensor-parallel plan in transformers "
                                  "(config.base_model_tp_plan); train it without tensor_parallel_size")
    unsupported = sorted({style for style in plan.values() if style not in SUPPORTED_STYLES})
    if unsupported:
        raise TensorParallelError(f"{model.config.model_type}'s tensor-parallel plan uses {', '.join(unsupported)}, "
                                  f"which tunefile does not carry out (only {', '.join(SUPPORTED_STYLES)}); train it "
                                  "without tensor_parallel_size")
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and embeddings is not None and head.weight is embeddings.weight:
        raise TensorParallelError("tensor parallelism cannot split a model whose input and output embeddings are "
                                  "tied (tie_word_embeddings), as in Axolotl; train it without tensor_parallel_size")
    check_divisible(model.config, size)
    return plan


def _style(name: str) -> Any:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {"colwise": ColwiseParallel(), "rowwise": RowwiseParallel(),
            "colwise_gather_output": ColwiseParallel(output_layouts=Replicate())}[name]


def _to_local(module: torch.nn.Module, outputs: Any, mesh: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(outputs, DTensor):
        return outputs.to_local()
    if isinstance(outputs, tuple):
        return tuple(o.to_local() if isinstance(o, DTensor) else o for o in outputs)
    return outputs


def _distribute_replicated(module: torch.nn.Module, mesh: Any, *, input_placement: Any) -> None:
    """``module``'s own parameters as replicated DTensors; its positional tensor inputs read as
    ``input_placement`` DTensors, its outputs handed on as plain local tensors."""
    from torch.distributed.tensor import DTensor, distribute_module

    def inputs(_module: torch.nn.Module, args: tuple[Any, ...], device_mesh: Any) -> tuple[Any, ...]:
        return tuple(DTensor.from_local(a, device_mesh, [input_placement], run_check=False)
                     if isinstance(a, torch.Tensor) and not isinstance(a, DTensor) else a for a in args)

    distribute_module(module, mesh, partition_fn=_replicate_own_parameters, input_fn=inputs, output_fn=_to_local)


def _replicate_own_parameters(_name: str, module: torch.nn.Module, mesh: Any) -> None:
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    for key, param in list(module.named_parameters(recurse=False)):
        if not isinstance(param, DTensor):
            module.register_parameter(key, torch.nn.Parameter(distribute_tensor(param.data, mesh, [Replicate()]),
                                                              requires_grad=param.requires_grad))


def apply_tensor_parallel(model: torch.nn.Module, mesh: Any, *, device: torch.device) -> None:
    """Split ``model`` (loaded, not yet wrapped) over ``mesh`` (the 1-D tensor-parallel mesh) as its plan says;
    every other parameter becomes a replicated DTensor of the same mesh."""
    import fnmatch

    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import parallelize_module

    plan = check_model(model, mesh.size())
    model.to(device)
    split = {key: _style(style) for key, style in plan.items() if style != "replicated_with_grad_allreduce"}
    parallelize_module(model, mesh, split)
    names = dict(model.named_modules())
    for key, style in plan.items():
        if style != "replicated_with_grad_allreduce":
            continue
        for name in fnmatch.filter(names, key):  # per-head norms: their input holds this rank's heads (dim -2)
            _distribute_replicated(names[name], mesh, input_placement=Shard(-2))
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if not isinstance(p, DTensor)]
        if not own:
            continue
        if any(isinstance(p, DTensor) for child in module.children() for p in child.parameters()):
            raise TensorParallelError(f"tensor parallelism: {name} holds parameters of its own beside split layers; "
                                      "tunefile cannot replicate it")
        _distribute_replicated(module, mesh, input_placement=Replicate())
    log.info("tensor parallelism: %d layers split over %d ranks", len(split), mesh.size())
