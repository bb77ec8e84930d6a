"""ZeRO-3's unit of gathering: a whole decoder layer, where the run plan names its class.

DeepSpeed ZeRO-3 hooks every module that holds parameters and all-gathers them module by module. Under LoRA a
decoder layer is some thirty such modules (each projection, its adapter's A and B), and the per-gather overhead,
not the bytes, is what made ZeRO-3 LoRA slow. DeepSpeed's leaf modules (``set_z3_leaf_modules``) gather a module's
whole subtree in one go and release it after; flagging the decoder layer makes ZeRO-3 gather as FSDP does. It must
happen before ``deepspeed.initialize`` (accelerate's ``prepare``), which installs the hooks.
"""

from __future__ import annotations

import logging

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
