"""Ternary quantisation-aware training (the run plan's ``qat.weight_dtype: ternary``): BitNet b1.58 style, as
Axolotl 0.19 trains it (its ``utils/quantization_ternary.py``), in plain PyTorch.

In forward every linear layer outside the output head computes with its weight rounded onto three levels per
output row, {-s, 0, +s}, where s is the row's mean absolute value (absmean); with ``activation_dtype: int8``
its input is also rounded onto 8-bit integers with one scale per token (the token's largest magnitude maps to
127). Both roundings pass gradients straight through, so the optimizer keeps updating full-precision master
weights. The output head and the norms stay in full precision; ``quantize_embedding`` fake-quantises the
embedding tables in int8 per row (torchao's quantiser, as Axolotl) rather than ternary, and is skipped with a
warning where the output head shares the input embedding's weight (quantising the table would quantise the
head too).

At the end of training the ternary values are baked into the weights (``bake_ternary_weights``) and the layers
become plain ``nn.Linear`` again: the saved model loads with plain transformers and computes exactly what the
fake-quantised weights computed (the input rounding, which lives in forward, is not baked).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# Floor of a scale (Axolotl's): an all-zero row or token would otherwise divide by zero.
SCALE_FLOOR = 1e-5
INT8_LEVELS = 127  # a token's largest magnitude maps to this many steps (symmetric int8)


def ternarize(weight: torch.Tensor) -> torch.Tensor:
    """The weight rounded onto {-s, 0, +s} per output row, s the row's absmean, in the weight's own dtype.
    Rows are the last dimension's slices, so a weight sharded by rows (FSDP2's dim 0) ternarises shard by shard."""
    row_scale = weight.abs().mean(dim=-1, keepdim=True).clamp_min(SCALE_FLOOR)
    levels = (weight / row_scale).round().clamp(-1, 1)
    return levels * row_scale


def int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 with one scale per token (last dimension): the token's absmax spans 127 steps."""
    step = x.abs().amax(dim=-1, keepdim=True).clamp_min(SCALE_FLOOR) / INT8_LEVELS
    return (x / step).round().clamp(-INT8_LEVELS - 1, INT8_LEVELS) * step


class StraightThroughQuantizer(nn.Module):
    """Rounds a tensor in forward (when ``enabled``) while its gradient passes unchanged (straight-through
    estimator). ``enabled`` is the switch the delayed start (fake_quant_after_n_steps) flips; it holds no
    state a checkpoint would need."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind  # "ternary" (weights) or "int8" (activations)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        rounded = (ternarize if self.kind == "ternary" else int8_per_token)(x.detach())
        # Exactly the rounded value in forward (x - x.detach() is exactly 0), the identity in backward.
        # Axolotl writes x + (rounded - x).detach(): the same gradient, a value that can be an ulp off.
        return rounded + (x - x.detach())

    def extra_repr(self) -> str:
        return f"{self.kind}, enabled={self.enabled}"


class TernaryFakeQuantizedLinear(nn.Linear):
    """A linear layer computing with its ternary-rounded weight (and int8-rounded input, when it has an
    activation quantiser). It holds the same parameters as the ``nn.Linear`` it was, under the same names."""

    weight_fake_quantizer: StraightThroughQuantizer
    activation_fake_quantizer: StraightThroughQuantizer | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_fake_quantizer is not None:
            x = self.activation_fake_quantizer(x)
        return F.linear(x, self.weight_fake_quantizer(self.weight), self.bias)


def has_tied_output_embedding(model: nn.Module) -> bool:
    """Whether the output head shares its weight with the input embedding: the config says so, or the two
    modules hold the same storage (not judged on meta tensors, whose storage pointers are all 0)."""
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return True
    try:
        embedding = model.get_input_embeddings()  # type: ignore[operator]
        head = model.get_output_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError, TypeError):
        return False
    if embedding is None or head is None:
        return False
    if embedding.weight.is_meta or head.weight.is_meta:
        return False
    return embedding.weight.data_ptr() == head.weight.data_ptr()


def _output_head(model: nn.Module) -> nn.Module | None:
    try:
        return model.get_output_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError, TypeError):
        return None


def ternary_candidates(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The layers ternary QAT swaps: exactly ``nn.Linear`` (a subclass may carry a forward of its own that the
    swap back would lose), neither named ``lm_head`` (Axolotl's rule) nor the model's output head by another
    name (e.g. GPT-NeoX's ``embed_out``), which stays in full precision."""
    head = _output_head(model)
    return [(name, module) for name, module in model.named_modules()
            if type(module) is nn.Linear and not name.endswith("lm_head") and module is not head]


def prepare_ternary_linears(model: nn.Module, *, quantize_activations: bool) -> list[str]:
    """Turn the candidate layers into ternary fake-quantised ones in place (their class changes; the parameter
    objects, hooks and state-dict keys stay). Returns their names."""
    names = []
    for name, module in ternary_candidates(model):
        module.__class__ = TernaryFakeQuantizedLinear
        module.weight_fake_quantizer = StraightThroughQuantizer("ternary")
        module.activation_fake_quantizer = StraightThroughQuantizer("int8") if quantize_activations else None
        names.append(name)
    return names


@torch.no_grad()
def bake_ternary_weights(model: nn.Module) -> int:
    """Write each ternary layer's rounded weight into the weight itself and make the layer a plain
    ``nn.Linear`` again (Axolotl's conversion after training). Baked whether or not the quantiser is on at the
    end. Returns how many layers were baked."""
    baked = 0
    for module in model.modules():
        if isinstance(module, TernaryFakeQuantizedLinear):
            module.weight.copy_(ternarize(module.weight))
            module.__class__ = nn.Linear
            del module.weight_fake_quantizer
            del module.activation_fake_quantizer
            baked += 1
    return baked
