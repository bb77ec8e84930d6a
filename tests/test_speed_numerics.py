"""The numerics of the speed features on the CPU, where test_runtime_kernels.py and test_runtime_model_options.py
leave gaps: each one must train exactly what the plain path trains.

- The fused loss (losses.linear_token_loss_sum): with a kernel that works the way Liger's does (the gradients
  computed during the forward, a chunk of rows at a time, and only scaled in the backward), for chunks of one row,
  of a size that does not divide the rows, of all of them and of more, with ignored labels (scattered, a whole row,
  a row's first prediction), a bias and a softcap: the same sum, count and gradients as the plain cross-entropy of
  the logits, also under the scale the loop multiplies the sum by.
- Several optimizer steps of a LoRA model (dropout on, packed rows) loaded by the runtime: with gradient
  checkpointing (reentrant and not), activation offloading's saved-tensor hooks around the forward, the fused
  loss, and all of them together, the losses and the trained weights are the plain run's. A recomputation that
  draws other dropout masks (preserve_rng_state off) is caught by the same comparison.

Not here: Liger's and cut-cross-entropy's Triton kernels and offloading's copies to pinned memory need a CUDA
GPU (the `gpu` tests of those two files run them); on the CPU the offloading hooks keep CPU tensors where they
are, so what this file checks of offloading is that the hooks around the forward change nothing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from plan_factory import make_plan
from tunefile.compiler.render.config_yaml import build_run_plan
from tunefile.runtime import attention, kernels, offload
from tunefile.runtime.losses import IGNORE_INDEX, linear_token_loss_sum, token_loss_sum
from tunefile.runtime.model import load_model

# --- the fused loss against the logits' cross-entropy ----------------------------------------------------------


class GradientsInForward(torch.autograd.Function):
    """A linear cross-entropy SUM computed like Liger's fused kernel: each chunk of rows makes its logits, adds
    its loss and writes its share of the gradients at once, so no more than one chunk of logits ever exists; the
    backward only scales the stored gradients by the incoming one."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, softcap: float | None, chunk: int) -> torch.Tensor:
        grad_hidden, grad_weight = torch.zeros_like(hidden), torch.zeros_like(weight)
        grad_bias = None if bias is None else torch.zeros_like(bias)
        total = torch.zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            rows, rows_targets = hidden[start:start + chunk], targets[start:start + chunk]
            logits = F.linear(rows, weight, bias).float()
            capped = softcap * torch.tanh(logits / softcap) if softcap is not None else logits
            log_probs = capped.log_softmax(dim=-1)
            scored = (rows_targets != IGNORE_INDEX).nonzero().squeeze(1)
            total = total - log_probs[scored, rows_targets[scored]].sum()
            grad_logits = torch.zeros_like(log_probs)  # d(sum)/d(capped): softmax − one-hot on the scored rows
            grad_logits[scored] = log_probs[scored].exp()
            grad_logits[scored, rows_targets[scored]] -= 1
            if softcap is not None:
                grad_logits = grad_logits * (1 - torch.tanh(logits / softcap) ** 2)
            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden[start:start + chunk] = grad_logits @ weight
            grad_weight += grad_logits.T @ rows
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (grad_hidden * grad_output, grad_weight * grad_output,
                None if grad_bias is None else grad_bias * grad_output, None, None, None)


def gradients_in_forward(chunk: int) -> kernels.LinearCrossEntropySum:
    def loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 softcap: float | None) -> torch.Tensor:
        return GradientsInForward.apply(hidden, weight, bias, targets, softcap, chunk)

    return loss_sum


def labels_with_ignored_tokens(batch: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels = labels.masked_fill(torch.rand(batch, length, generator=generator) < 0.3, IGNORE_INDEX)
    labels[1] = IGNORE_INDEX  # a row with nothing to learn (a prompt longer than the row)
    labels[2, 1] = IGNORE_INDEX  # the row's first prediction
    return labels


def plain_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                        softcap: float | None, reduction: str) -> torch.Tensor:
    """Next-token cross-entropy over the label tokens from the full logits (written out here, not the runtime's
    token_loss_sum)."""
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


@pytest.mark.parametrize("chunk", [1, 7, 44, 1000])  # one row; not a divisor of the 44 rows; all of them; more
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_a_chunked_kernel_with_gradients_from_its_forward_gives_the_plain_loss(
        chunk: int, softcap: float | None, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(4, 11, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    bias = torch.randn(50, generator=generator, requires_grad=True) if with_bias else None
    labels = labels_with_ignored_tokens(4, 11, 50, generator)
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    scale = 0.37  # what the loop multiplies the sum by: accumulation × ranks / the step's label tokens

    plain = plain_cross_entropy(hidden, weight, bias, labels, softcap, "sum")
    plain_grads = torch.autograd.grad(plain * scale, inputs)
    fused, count = linear_token_loss_sum(hidden, weight, bias, labels, dtype=torch.float32, softcap=softcap,
                                         linear_cross_entropy=gradients_in_forward(chunk))
    fused_grads = torch.autograd.grad(fused * scale, inputs)

    expected_count = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert int(count) == expected_count and 0 < expected_count < 40
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    # The loss the loop logs (the sum over the count) is the mean cross-entropy over the label tokens.
    mean = plain_cross_entropy(hidden, weight, bias, labels, softcap, "mean")
    torch.testing.assert_close(fused / count, mean, rtol=1e-5, atol=1e-6)
    for got, want in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --- training with the speed features equals plain training ---------------------------------------------------

@dataclass(frozen=True)
class Features:
    checkpointing: dict[str, Any] | None = None  # gradient_checkpointing_kwargs; None: off
    offloading: bool = False
    fused_loss: bool = False


REENTRANT, NON_REENTRANT = {"use_reentrant": True}, {"use_reentrant": False}
VARIANTS = {
    "checkpointing, reentrant": Features(checkpointing=REENTRANT),
    "checkpointing, non-reentrant": Features(checkpointing=NON_REENTRANT),
    "activation offloading": Features(offloading=True),
    "offloading with checkpointing (gradient_checkpointing: offload)": Features(checkpointing=REENTRANT,
                                                                                offloading=True),
    "fused loss": Features(fused_loss=True),
    "fused loss with reentrant checkpointing": Features(checkpointing=REENTRANT, fused_loss=True),
    "fused loss with non-reentrant checkpointing": Features(checkpointing=NON_REENTRANT, fused_loss=True),
    "all of them": Features(checkpointing=REENTRANT, offloading=True, fused_loss=True),
}
LORA = {"adapter": "lora", "lora_target_linear": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1}
STEPS = 3


def load(model_dir: Path, features: Features) -> torch.nn.Module:
    """The tiny model as the runtime loads it (load_model: checkpointing, then the adapter) from the plan the
    compiler writes for these features, in fp32."""
    from transformers import AutoConfig

    spec = dict(LORA)
    if features.checkpointing is not None:
        spec |= {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": features.checkpointing}
    plan = build_run_plan(make_plan("single", spec=spec)).model
    plan = replace(plan, base_model=str(model_dir), tokenizer=str(model_dir), precision="fp32", architecture=None,
                   parameters=None)
    torch.manual_seed(0)  # the same LoRA initialisation in every variant
    module = load_model(plan, attn_implementation="sdpa", vocab_size=AutoConfig.from_pretrained(model_dir).vocab_size)
    # LoRA starts as a no-op (B = 0), which would leave A without a gradient in the first step: start it mid-run.
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    module.train()
    return module


def packed_batch(step: int) -> tuple[dict[str, Any], torch.Tensor]:
    """Two rows of 32 tokens, each packing samples of 9, 16 and 7 tokens, isolated as the trainer isolates them
    on the CPU (a block-diagonal causal mask); a prompt and each sample's first prediction carry no loss."""
    generator = torch.Generator().manual_seed(100 + step)
    input_ids = torch.randint(8, 1024, (2, 32), generator=generator)
    position_ids = torch.cat([torch.arange(9), torch.arange(16), torch.arange(7)]).repeat(2, 1)
    labels = input_ids.clone()
    labels[:, [9, 25]] = IGNORE_INDEX
    labels[0, 9:14] = IGNORE_INDEX
    inputs = {"input_ids": input_ids, "position_ids": position_ids}
    inputs |= attention.packing_forward_kwargs("block_mask", position_ids, attn_implementation="sdpa",
                                               dtype=torch.float32)
    return inputs, labels


@dataclass
class Run:
    losses: list[float]
    gradients: list[dict[str, torch.Tensor]]  # of each step, before clipping
    weights: dict[str, torch.Tensor]  # after the last step


def train(model_dir: Path, features: Features) -> Run:
    """STEPS steps of the trainer's step: the forward under the offloading hooks, the loss sum over the label
    count, clipping at 1, then the update. SGD with momentum, not AdamW: Adam's first steps move every weight by
    about ±lr whatever the size of its gradient, so a gradient that is zero up to rounding (different rounding in
    a chunked loss) would move weights apart; SGD keeps the weights' differences those of the gradients."""
    module = load(model_dir, features)
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([p for _, p in named], lr=0.5, momentum=0.9)
    fused = (kernels.fused_loss(module, "reference", gradients_in_forward(13), dtype=torch.float32)
             if features.fused_loss else None)
    torch.manual_seed(1)  # the dropout masks
    run = Run([], [], {})
    for step in range(STEPS):
        inputs, labels = packed_batch(step)
        hooks = offload.SavedActivationsOnCpu(pin_memory=False) if features.offloading else contextlib.nullcontext()
        with hooks:
            if fused is not None:
                loss_sum, count = fused(module, inputs, labels)
            else:
                loss_sum, count = token_loss_sum(module(**inputs, use_cache=False).logits, labels)
        (loss_sum / count).backward()
        run.gradients.append({name: p.grad.clone() for name, p in named})
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.losses.append(float(loss_sum.detach() / count))
    run.weights = {name: p.detach().clone() for name, p in named}
    return run


@pytest.fixture(scope="module")
def plain_run(tiny_model_dir: Path) -> Run:
    return train(tiny_model_dir, Features())


def assert_same_gradients(run: Run, plain: Run) -> None:
    for step, (gradients, plain_gradients) in enumerate(zip(run.gradients, plain.gradients, strict=True), 1):
        assert sorted(gradients) == sorted(plain_gradients)
        for name, gradient in plain_gradients.items():
            torch.testing.assert_close(gradients[name], gradient, rtol=1e-4, atol=1e-7, msg=f"step {step}: {name}")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_training_with_the_feature_is_plain_training(name: str, tiny_model_dir: Path, plain_run: Run) -> None:
    run = train(tiny_model_dir, VARIANTS[name])
    assert any("lora_B" in n for n in run.weights)
    assert run.losses == pytest.approx(plain_run.losses, rel=1e-5)
    assert_same_gradients(run, plain_run)
    before = dict(load(tiny_model_dir, Features()).named_parameters())
    for weight_name, weight in plain_run.weights.items():
        # Every weight moved far beyond the tolerance, or the comparison below would say little.
        assert (weight - before[weight_name].detach()).abs().max() > 1e-3, f"{weight_name} hardly trained"
        torch.testing.assert_close(run.weights[weight_name], weight, rtol=1e-4, atol=1e-6, msg=weight_name)


def test_a_recomputation_with_other_dropout_masks_is_caught(tiny_model_dir: Path, plain_run: Run) -> None:
    """Without preserve_rng_state, checkpointing recomputes each layer with fresh dropout masks, so the gradients
    belong to no forward that ran: the comparison above must see that."""
    run = train(tiny_model_dir, Features(checkpointing={"use_reentrant": False, "preserve_rng_state": False}))
    assert run.losses[0] == pytest.approx(plain_run.losses[0], rel=1e-6)  # the forward itself is the same
    with pytest.raises(AssertionError):
        assert_same_gradients(run, plain_run)
