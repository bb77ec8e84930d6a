"""LoRA dropout with replayed masks (runtime/lora_dropout.py): peft's masks and gradients exactly, less activation
memory, and the same masks when gradient checkpointing recomputes a layer."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional

from tunefile.runtime.lora_dropout import (
    ReplayedDropoutLinear,
    _DroppedInputLinear,
    recompute_lora_dropout,
    replay_dropout,
)


def test_a_replay_draws_the_same_mask_and_leaves_the_generator_where_it_was() -> None:
    x = torch.ones(64, 512)
    state = torch.get_rng_state()
    dropped, mask = torch.native_dropout(x, 0.25, True)
    after = torch.get_rng_state()
    replayed, replayed_mask = replay_dropout(x, 0.25, state)
    assert torch.equal(replayed, dropped) and torch.equal(replayed_mask, mask)
    assert torch.equal(torch.get_rng_state(), after)  # the stream goes on as if nothing had been replayed
    assert (~mask).float().mean().item() == pytest.approx(0.25, abs=0.01)


def test_gradients_are_exact_in_double_precision() -> None:
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)

    def same_mask_every_call(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(1234)  # gradcheck calls the function many times; each must drop the same elements
        return _DroppedInputLinear.apply(a, w, 0.3)

    assert torch.autograd.gradcheck(same_mask_every_call, (x, weight))


@pytest.mark.parametrize("autocast", [False, True])
def test_forward_and_backward_equal_linear_on_the_dropped_input(autocast: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16, requires_grad=True)
    weight = torch.randn(8, 16, requires_grad=True)
    grad = torch.randn(2, 6, 8)
    torch.manual_seed(99)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = _DroppedInputLinear.apply(x, weight, 0.1)
    out.backward(grad)
    got = (out.detach(), x.grad.clone(), weight.grad.clone())
    x.grad = weight.grad = None
    torch.manual_seed(99)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected_out = functional.linear(functional.dropout(x, 0.1, True), weight)
    expected_out.backward(grad)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-6, "atol": 1e-6}
    assert got[0].dtype == expected_out.dtype
    for a, b in zip(got, (expected_out.detach(), x.grad, weight.grad), strict=True):
        torch.testing.assert_close(a.float(), b.float(), **tolerance)


# --- on a LoRA model ------------------------------------------------------------------------------------------


def lora_model(dropout: float, *, checkpointing: bool = False) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(config)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                            init_lora_weights=False))  # B not zero: A's gradient is not zero
    return model.train()


def lora_gradients(model: torch.nn.Module, ids: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


IDS = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(3))


def test_every_vanilla_adapter_is_patched_and_the_state_dict_is_unchanged() -> None:
    model = lora_model(0.1)
    keys = list(model.state_dict())
    decision = recompute_lora_dropout(model, strategy="single")
    adapters = [m for m in model.modules() if isinstance(m, ReplayedDropoutLinear)]
    assert decision == {"lora_dropout_recompute": 2 * 7} and len(adapters) == 14  # 2 layers × q k v o gate up down
    assert all(isinstance(m.lora_dropout["default"], torch.nn.Identity) for m in model.modules()
               if hasattr(m, "lora_dropout"))
    assert list(model.state_dict()) == keys


def test_training_computes_what_peft_computes_mask_for_mask() -> None:
    plain, patched = lora_model(0.2), lora_model(0.2)
    recompute_lora_dropout(patched, strategy="single")
    expected, got = lora_gradients(plain, IDS, seed=11), lora_gradients(patched, IDS, seed=11)
    assert got.keys() == expected.keys() and any("lora_A" in name for name in got)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_evaluation_and_no_dropout_give_peft_outputs_exactly() -> None:
    plain, patched = lora_model(0.1), lora_model(0.1)
    recompute_lora_dropout(patched, strategy="ddp")
    plain.eval()
    patched.eval()
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=IDS).logits, plain(input_ids=IDS).logits, rtol=0, atol=0)
    assert recompute_lora_dropout(lora_model(0.0), strategy="single") == {"lora_dropout_recompute": 0}


@pytest.mark.parametrize("strategy, zero_stage, words", [
    ("fsdp", None, "under fsdp,"), ("deepspeed", 3, "under deepspeed ZeRO-3 gathering module by module,")])
def test_fsdp_and_zero3_by_module_keep_peft_dropout_with_the_reason(strategy: str, zero_stage: int | None,
                                                                    words: str) -> None:
    model = lora_model(0.1)
    decision = recompute_lora_dropout(model, strategy=strategy, zero_stage=zero_stage)
    assert decision["lora_dropout_recompute"] is False
    assert words in decision["lora_dropout_recompute_fallback"]
    assert not any(isinstance(m, ReplayedDropoutLinear) for m in model.modules())


@pytest.mark.parametrize("zero_stage, whole", [(1, False), (2, False), (3, True)])
def test_deepspeed_replays_where_the_weights_stay_for_the_layer(zero_stage: int, whole: bool) -> None:
    """ZeRO-1/2 leave the weights alone; ZeRO-3 gathering whole decoder layers keeps lora_A for the layer's backward
    (the training itself under ZeRO-3 is tests/test_zero3_gathering.py's)."""
    model = lora_model(0.1)
    decision = recompute_lora_dropout(model, strategy="deepspeed", zero_stage=zero_stage, layers_gathered_whole=whole)
    assert decision["lora_dropout_recompute"] > 0
    assert any(isinstance(m, ReplayedDropoutLinear) for m in model.modules())


def saved_bytes(model: torch.nn.Module) -> int:
    """Bytes autograd keeps for the backward pass of one forward (each tensor's storage counted once)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=IDS, labels=IDS).loss.backward()
    return sum(storages.values())


def test_it_keeps_less_for_the_backward_pass() -> None:
    plain, patched = lora_model(0.1), lora_model(0.1)
    recompute_lora_dropout(patched, strategy="single")
    before, after = saved_bytes(plain), saved_bytes(patched)
    assert after < 0.8 * before, (before, after)


def test_gradient_checkpointing_recomputes_the_same_masks() -> None:
    """A checkpointed layer's forward runs twice; the second must draw the masks of the first, or the gradients
    would belong to another dropout than the loss."""
    plain = lora_model(0.2)
    recompute_lora_dropout(plain, strategy="single")
    checkpointed = lora_model(0.2, checkpointing=True)
    recompute_lora_dropout(checkpointed, strategy="single")
    expected, got = lora_gradients(plain, IDS, seed=5), lora_gradients(checkpointed, IDS, seed=5)
    assert got.keys() == expected.keys() and any("lora_A" in name for name in got)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # and the masks are drawn afresh at every step: another seed, other gradients
    assert not torch.equal(lora_gradients(plain, IDS, seed=6)[name], expected[name])
