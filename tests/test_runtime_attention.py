"""Packed samples must not see each other: the loss of a packed batch equals the token-weighted mean
of the separate samples' losses (fp32, 1e-5), on a tiny model, on CPU."""

from __future__ import annotations

import pytest
import torch

from tunefile.runtime import attention
from tunefile.runtime.losses import token_loss_sum


def _tiny_model(attn_implementation: str, arch: str = "llama") -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()


def _samples() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (n,), generator=generator) for n in (7, 12, 5, 9)]


def _packed(samples: list[torch.Tensor], rows: list[list[int]], length: int) -> dict[str, torch.Tensor]:
    """What the data side's collate produces: samples end to end, position ids restarting at 0, the
    first label of each sample masked (it would be predicted from the previous sample), padding after."""
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), -100)
    position_ids = torch.zeros(len(rows), length, dtype=torch.long)
    for r, members in enumerate(rows):
        cursor = 0
        for i in members:
            n = samples[i].numel()
            input_ids[r, cursor:cursor + n] = samples[i]
            labels[r, cursor + 1:cursor + n] = samples[i][1:]
            position_ids[r, cursor:cursor + n] = torch.arange(n)
            cursor += n
        position_ids[r, cursor:] = torch.arange(length - cursor)  # padding: its own segment
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def _separate_mean(model: torch.nn.Module, samples: list[torch.Tensor]) -> torch.Tensor:
    total, tokens = torch.zeros((), dtype=torch.float64), 0
    for s in samples:
        logits = model(input_ids=s[None]).logits
        loss_sum, count = token_loss_sum(logits, s[None])
        total += loss_sum.double()
        tokens += int(count)
    return total / tokens


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_loss_equals_token_weighted_mean_of_separate_losses(attn_implementation: str, arch: str) -> None:
    model = _tiny_model(attn_implementation, arch)
    samples = _samples()
    batch = _packed(samples, rows=[[0, 1, 2], [3]], length=26)
    extra = attention.packing_forward_kwargs("block_mask", batch["position_ids"],
                                             attn_implementation=attn_implementation, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       **extra).logits
        loss_sum, count = token_loss_sum(logits, batch["labels"])
        packed = loss_sum.double() / count
        separate = _separate_mean(model, samples)
    assert int(count) == sum(s.numel() - 1 for s in samples)
    assert abs(packed.item() - separate.item()) < 1e-5


def test_without_isolation_the_losses_differ() -> None:
    """The check above has teeth: plain causal attention over the same packed row gives another loss."""
    model = _tiny_model("sdpa")
    samples = _samples()
    batch = _packed(samples, rows=[[0, 1, 2], [3]], length=26)
    with torch.no_grad():
        # Positions counting straight through the row: nothing tells the model where samples start.
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        loss_sum, count = token_loss_sum(logits, batch["labels"])
        separate = _separate_mean(model, samples)
    assert abs((loss_sum.double() / count).item() - separate.item()) > 1e-4  # 10× the tolerance above


def test_block_mask_is_block_diagonal_and_causal() -> None:
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = attention.block_causal_mask(position_ids)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)
    additive = attention.block_causal_mask(position_ids, additive_dtype=torch.float32)[0, 0]
    assert torch.equal(additive == 0, expected)


def test_varlen_metadata_flattens_rows() -> None:
    position_ids = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    meta = attention.varlen_metadata(position_ids)
    assert meta["cu_seq_lens_q"].tolist() == [0, 3, 5, 10]
    assert meta["max_length_q"] == 5


def test_torch_varlen_falls_back_to_block_mask_on_cpu() -> None:
    mode, impl = attention.choose_packing_attention("torch_varlen", sample_packing=True, attn_implementation="sdpa",
                                                    device_type="cpu")
    assert (mode, impl) == ("block_mask", "sdpa")
    assert attention.choose_packing_attention("block_mask", sample_packing=False, attn_implementation="sdpa",
                                              device_type="cpu") == (None, "sdpa")


def test_flash_attention_without_flash_attn_installed_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # A bundle compiled with flash_attention: true landing on a machine without the package keeps training.
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: False)
    assert attention.choose_packing_attention("flash_varlen", sample_packing=True,
                                              attn_implementation="flash_attention_2",
                                              device_type="cpu") == ("block_mask", "sdpa")
    assert attention.choose_packing_attention(None, sample_packing=False, attn_implementation="flash_attention_2",
                                              device_type="cpu") == (None, "sdpa")


@pytest.mark.gpu
def test_torch_varlen_matches_block_mask_on_cuda() -> None:
    if not attention.torch_varlen_available("cuda"):
        pytest.skip("torch.nn.attention.varlen or CUDA is missing")
    samples = _samples()
    batch = {k: v.cuda() for k, v in _packed(samples, rows=[[0, 1, 2], [3]], length=26).items()}
    losses = {}
    for mode in ("block_mask", "torch_varlen"):
        mode, impl = attention.choose_packing_attention(mode, sample_packing=True, attn_implementation="sdpa",
                                                        device_type="cuda")
        model = _tiny_model(impl).cuda().to(torch.bfloat16)
        extra = attention.packing_forward_kwargs(mode, batch["position_ids"], attn_implementation=impl,
                                                 dtype=torch.bfloat16)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                           **extra).logits
            loss_sum, count = token_loss_sum(logits.float(), batch["labels"])
        losses[mode] = (loss_sum / count).item()
    assert abs(losses["block_mask"] - losses["torch_varlen"]) < 2e-2
