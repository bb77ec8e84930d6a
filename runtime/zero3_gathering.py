"""ZeRO-3 under an adapter: what it gathers, and the frozen base it can leave whole.

DeepSpeed ZeRO-3 hooks every module that holds parameters and all-gathers them module by module. Under LoRA a
decoder layer is some thirty such modules (each projection, its adapter's A and B), and the per-gather overhead,
not the bytes, is what made ZeRO-3 LoRA slow. DeepSpeed's leaf modules (``set_z3_leaf_modules``) gather a module's
whole subtree in one go and release it after; flagging the decoder layer makes ZeRO-3 gather as FSDP does. It must
happen before ``deepspeed.initialize`` (accelerate's ``prepare``), which installs the hooks.

A frozen base that fits on every GPU is better left out of ZeRO-3 altogether (the compiler decides: the run
plan's ``frozen_base_whole``). ZeRO-3 releases every parameter at each optimizer step, the ones it keeps
"persistent" included, and gathers them again, so a frozen base under ZeRO-3 is all-gathered in every step and
its hundreds of tensors pass through DeepSpeed's per-parameter bookkeeping twice. A frozen weight has no gradient
and no optimizer state to partition. So the base loads whole (``loading_whole``: transformers would otherwise
build it under ``deepspeed.zero.Init``, already partitioned) and ``keep_frozen_base_whole`` turns each frozen
weight into a buffer just before ``prepare``, where DeepSpeed, which partitions parameters, leaves it alone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from .errors import RuntimeUserError

log = logging.getLogger("tunefile.runtime")


def gather_layers_whole(model: torch.nn.Module, layer_class: str | None) -> int:
    """Flag every module of class ``layer_class`` as a ZeRO-3 leaf; the number flagged (0 with no class).

    A named class the model lacks is an error: the compiler derived it from the base model's architecture, and a
    plan that names a class the model does not have would otherwise fall back to per-module gathering unseen."""
    if layer_class is None:
        return 0
    layers = [module for module in model.modules() if type(module).__name__ == layer_class]
    if not layers:
        raise RuntimeUserError(f"config.yaml: distribution.deepspeed.leaf_module_class: the model has no "
                               f"{layer_class}; compile the bundle again against this base model")
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, [type(layers[0])])
    # DeepSpeed times a leaf's backward by the gradient of its input: the first layer's input, the frozen
    # embeddings' output, carries none under an adapter, and that layer's weights were found released in its
    # backward (tests/test_zero3_gathering.py). With the embeddings' output requiring a gradient every layer's
    # input carries one; the cost is the first layer's input gradient, one layer's share of the backward.
    model.enable_input_require_grads()
    log.info("ZeRO-3 gathers each of the %d %s whole (one all-gather per layer)", len(layers), layer_class)
    return len(layers)


@contextlib.contextmanager
def loading_whole(accelerator: object) -> Iterator[None]:
    """Load the model whole while accelerate runs ZeRO-3: transformers builds a model under ``zero.Init``
    (partitioned as it loads) whenever a ZeRO-3 configuration is registered with it, which accelerate's DeepSpeed
    plugin does whatever its zero3_init_flag says. The registration is lifted for the load and restored after."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    plugin = accelerator.state.deepspeed_plugin
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        registered = getattr(plugin, "dschf", None)
        if registered is not None:
            set_hf_deepspeed_config(registered)


def keep_frozen_base_whole(model: torch.nn.Module, device: torch.device) -> int:
    """Turn every frozen weight of ``model`` (loaded whole, adapters added) into a buffer on ``device``, out of
    ZeRO-3's reach; how many. Call it just before ``prepare``.

    The buffers hold the same tensors under the same names, so the forward, peft's layers and the fused loss read
    them as before; a weight tied to another (an output head sharing the embeddings) stays one tensor. They are not
    persistent: a checkpoint or a saved model does not carry the base (under an adapter only the adapter is saved,
    and the base loads again from its own files). Only a floating-point weight can be a buffer this way; the
    compiler keeps quantised bases partitioned."""
    frozen = [(f"{module_name}.{name}" if module_name else name, module, name, param)
              for module_name, module in model.named_modules()
              for name, param in module.named_parameters(recurse=False) if not param.requires_grad]
    for qualified, _, _, param in frozen:  # all checked before any is moved: nothing half done
        if not param.is_floating_point():
            raise RuntimeUserError(f"config.yaml: distribution.deepspeed.frozen_base_whole: {qualified} is "
                                   f"{param.dtype}, not a floating-point weight; compile the bundle again")
    tensors: dict[int, torch.Tensor] = {}
    for _, module, name, param in frozen:
        if id(param) not in tensors:
            tensors[id(param)] = param.detach().to(device)
        delattr(module, name)
        module.register_buffer(name, tensors[id(param)], persistent=False)
    log.info("ZeRO-3: the frozen base stays whole on every GPU, outside ZeRO-3 (%d weights); ZeRO-3 partitions "
             "the adapter's gradients and optimizer state", len(frozen))
    return len(frozen)
