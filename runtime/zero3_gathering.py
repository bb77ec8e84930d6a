"""ZeRO-3's unit of gathering: a whole decoder layer, where the run plan names its class.

DeepSpeed ZeRO-3 hooks every module that holds parameters and all-gathers them module by module. Under LoRA a
decoder layer is some thirty such modules (each projection, its adapter's A and B), and the per-gather overhead,
not the bytes, is what made ZeRO-3 LoRA slow. DeepSpeed's leaf modules (``set_z3_leaf_modules``) gather a module's
whole subtree in one go and release it after; flagging the decoder layer makes ZeRO-3 gather as FSDP does. It must
happen before ``deepspeed.initialize`` (accelerate's ``prepare``), which installs the hooks.

After each optimizer step ZeRO-3 all-gathers every persistent parameter (those it keeps whole on every GPU), so
that the updated partitions become whole weights again. Where the compiler kept a frozen base whole (its
persistence threshold covers every parameter), that is the whole base gathered in every step for nothing: a frozen
weight never changes. ``gather_only_what_trains`` leaves frozen parameters out of that gather.
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


def gather_only_what_trains(engine: object) -> int:
    """Leave the frozen parameters out of ZeRO-3's after-step gather of persistent parameters; how many left out.

    Sound while no frozen weight changes and what is frozen stays frozen (not under ReLoRA's merges or LISA's
    switching, which the caller excludes). A checkpoint partitions every parameter and then gathers the
    persistent ones again: a frozen one left out is gathered by the next forward's hooks instead (ZeRO-3 fetches
    any parameter that is not whole before its module runs, and does not release a persistent one)."""
    optimizer = getattr(engine, "optimizer", None)
    persistent = getattr(optimizer, "persistent_parameters", None)
    if not isinstance(persistent, list):  # another DeepSpeed version's layout: nothing changed
        log.warning("ZeRO-3: no persistent-parameter list on %s; its after-step gather is left as it is",
                    type(optimizer).__name__)
        return 0
    trained = [param for param in persistent if param.requires_grad]
    optimizer.persistent_parameters = trained  # its own attribute; DeepSpeed's offload keeps the full list
    left_out = len(persistent) - len(trained)
    if left_out:
        log.info("ZeRO-3: %d frozen parameters kept whole are left out of the gather after each step", left_out)
    return left_out
