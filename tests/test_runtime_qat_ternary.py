"""Ternary quantisation-aware training (runtime/qat_ternary.py, dispatched from runtime/qat.py), Axolotl 0.19's
``qat: {weight_dtype: ternary}``: the weights' three levels per row against a hand-written reference, the int8
per-token activations, gradients straight through both roundings, which layers are swapped (never the output
head), the int8 per-row embedding and its skip under tied weights, the delayed start, the conversion that bakes
the ternary weights into a plain model with the same logits, and a compiled bundle that trains."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import require_module
from runtime_bundles import build_tiny_model, compile_bundle, launch, train_losses, workspace, write_config
from tunefile.runtime import qat, qat_ternary
from tunefile.schemas.run_plan import QatPlan


def require_torchao() -> None:
    """The embedding's int8 fake quantisation is torchao's (Axolotl's config); the ternary layers need no torchao."""
    require_module("torchao", "quantize_embedding needs it: pip install 'tunefile[torchao]'")


def plan(activation: str | None = None, *, quantize_embedding: bool = False, after: int | None = None,
         group_size: int = 32) -> QatPlan:
    return QatPlan(weight_dtype="ternary", activation_dtype=activation, group_size=group_size,
                   quantize_embedding=quantize_embedding, fake_quant_after_n_steps=after)


def tiny(model_dir: Path, **config: object) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **config)


def prepared(model_dir: Path, qat_plan: QatPlan, decisions: dict | None = None, **config: object) -> torch.nn.Module:
    module = tiny(model_dir, **config)
    qat.prepare_qat(module, qat_plan, decisions)
    return module


def token_batch(seed: int = 0, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 1000, (2, length), generator=torch.Generator().manual_seed(seed))


def nudge(module: torch.nn.Module, seed: int = 5) -> None:
    """Move every weight off the base model's, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))


def three_levels_by_hand(weight: torch.Tensor) -> torch.Tensor:
    """BitNet b1.58 by hand: each row's scale is its mean magnitude; an entry beyond half the scale becomes ±scale
    (a tie at exactly half rounds to even, 0), everything else 0."""
    scale = (weight.abs().sum(dim=1, keepdim=True) / weight.shape[1]).clamp(min=1e-5)
    return torch.where(weight.abs() > scale / 2, torch.sign(weight), torch.zeros_like(weight)) * scale


def int8_per_token_by_hand(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per token by hand: the token's largest magnitude is 127 steps; everything the nearest step."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for i, row in enumerate(rows):
        step = max(row.abs().max().item(), 1e-5) / 127
        out[i] = torch.round(row / step) * step
    return out.reshape(x.shape)


def int8_per_row_by_hand(table: torch.Tensor) -> torch.Tensor:
    """torchao's symmetric int8 per channel, by hand: the row's largest magnitude spans half of the 255 steps."""
    step = (table.abs().amax(dim=1, keepdim=True) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
    return torch.round(table * (1.0 / step)).clamp(-128, 127) * step  # times the reciprocal, as torchao


# --- the three levels ------------------------------------------------------------------------------------------

def test_each_row_takes_three_values_its_absmean_scales() -> None:
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 16)[:, None]
    weight[3] = 0.0  # an all-zero row: scale floored, levels all 0
    quantizer = qat_ternary.StraightThroughQuantizer("ternary")
    rounded = quantizer(weight)
    torch.testing.assert_close(rounded, three_levels_by_hand(weight), rtol=1e-6, atol=0)
    absmean = weight.abs().mean(dim=1)
    for row, original, scale in zip(rounded, weight, absmean, strict=True):
        levels = set(row.unique().tolist())
        assert levels <= {-scale.item(), 0.0, scale.item()}, levels
        if scale > 0:
            assert len(levels) == 3
            nearest = torch.stack([(original - level).abs() for level in (-scale, 0.0, scale)]).amin(0)
            torch.testing.assert_close((row - original).abs(), nearest, rtol=1e-6, atol=1e-7)
    assert torch.equal(rounded[3], torch.zeros(64))


def test_activations_are_int8_per_token() -> None:
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)) * torch.arange(1, 6)[None, :, None]
    x[0, 0] = 0.0
    quantized = qat_ternary.StraightThroughQuantizer("int8")(x)
    torch.testing.assert_close(quantized, int8_per_token_by_hand(x), rtol=1e-6, atol=1e-7)
    for token, original in zip(quantized.reshape(-1, 64), x.reshape(-1, 64), strict=True):
        assert token.unique().numel() <= 255
        if original.abs().max() > 0:  # the largest magnitude survives exactly (127 steps of absmax/127)
            peak = original.abs().argmax()
            torch.testing.assert_close(token[peak], original[peak], rtol=1e-6, atol=0)
            assert not torch.equal(token, original)
    assert torch.equal(quantized[0, 0], torch.zeros(64))


def test_gradients_pass_straight_through_both_roundings() -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 32))
    qat.prepare_qat(module, plan("int8"))
    layer = module[0]
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    upstream = torch.randn(6, 32, generator=torch.Generator().manual_seed(4))
    out = layer(x)
    with torch.no_grad():
        weight_q, x_q = three_levels_by_hand(layer.weight), int8_per_token_by_hand(x)
    torch.testing.assert_close(out, F.linear(x_q, weight_q, layer.bias), rtol=1e-5, atol=1e-5)
    out.backward(upstream)
    # The roundings are the identity in backward: each gradient is the plain linear's at the rounded values.
    torch.testing.assert_close(x.grad, upstream @ weight_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, upstream.T @ x_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, upstream.sum(0))


# --- the model: which layers, the embedding, the switch ------------------------------------------------------------

def test_every_linear_layer_but_the_output_head_turns_ternary(tiny_model_dir: Path) -> None:
    plain, module = tiny(tiny_model_dir), prepared(tiny_model_dir, plan())
    linears = [name for name, m in plain.named_modules() if isinstance(m, torch.nn.Linear)]
    assert qat.fake_quantized_modules(module) == [name for name in linears if name != "lm_head"]
    assert type(module.lm_head) is torch.nn.Linear and type(module.model.embed_tokens) is torch.nn.Embedding
    assert module.state_dict().keys() == plain.state_dict().keys()  # the quantisers hold no state
    layer, plain_layer = module.model.layers[0].mlp.down_proj, plain.model.layers[0].mlp.down_proj
    assert layer.activation_fake_quantizer is None  # weight-only
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(layer(x), F.linear(x, three_levels_by_hand(plain_layer.weight)), rtol=1e-5, atol=1e-6)
    ids = token_batch()
    assert not torch.equal(module(ids).logits, plain(ids).logits)
    # group_size does not apply: one scale per row, whatever the plan carries (48 divides no width here)
    qat.prepare_qat(tiny(tiny_model_dir), plan(group_size=48))


def test_an_output_head_by_another_name_stays_full_precision() -> None:
    class Model(torch.nn.Module):  # GPT-NeoX calls its head embed_out
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.embed_out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.embed_out

    model = Model()
    qat.prepare_qat(model, plan())
    assert qat.fake_quantized_modules(model) == ["proj"]
    sequential = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    qat.prepare_qat(sequential, plan())  # no head to tell: every linear layer
    assert qat.fake_quantized_modules(sequential) == ["0", "2"]


def test_quantize_embedding_fake_quantises_the_table_in_int8_per_row(tiny_model_dir: Path) -> None:
    require_torchao()
    decisions: dict = {}
    module = prepared(tiny_model_dir, plan("int8", quantize_embedding=True), decisions)
    assert "model.embed_tokens" in qat.fake_quantized_modules(module) and "lm_head" not in \
        qat.fake_quantized_modules(module) and decisions == {}
    ids = token_batch()
    table = module.model.embed_tokens.weight
    assert torch.equal(module.model.embed_tokens(ids), F.embedding(ids, int8_per_row_by_hand(table)))


def test_a_tied_output_head_keeps_the_embedding_unquantised(tiny_model_dir: Path) -> None:
    """As Axolotl: quantising a table the output head shares would quantise the head, which ternary QAT keeps in
    full precision, so quantize_embedding is skipped, with the reason in the runtime decisions."""
    require_torchao()
    module = tiny(tiny_model_dir)
    assert not qat_ternary.has_tied_output_embedding(module)
    module.lm_head.weight = module.model.embed_tokens.weight  # tied by storage (the config does not say so)
    assert qat_ternary.has_tied_output_embedding(module)
    decisions: dict = {}
    qat.prepare_qat(module, plan("int8", quantize_embedding=True), decisions)
    names = qat.fake_quantized_modules(module)
    assert "model.embed_tokens" not in names and "lm_head" not in names and names
    assert "quantize_embedding not applied" in decisions["qat_embedding"]
    ids = token_batch()
    table = module.model.embed_tokens.weight
    assert type(module.model.embed_tokens) is torch.nn.Embedding and type(module.lm_head) is torch.nn.Linear
    assert torch.equal(module.model.embed_tokens(ids), F.embedding(ids, table))  # the table unrounded
    # The config saying so counts too (before the weights are tied, or on meta tensors).
    module.config.tie_word_embeddings = True
    module.lm_head.weight = torch.nn.Parameter(module.lm_head.weight.detach().clone())
    assert qat_ternary.has_tied_output_embedding(module)


def test_fake_quantisation_starts_after_the_planned_step(tiny_model_dir: Path) -> None:
    require_torchao()
    ids = token_batch()
    plain_logits = tiny(tiny_model_dir)(ids).logits
    always = prepared(tiny_model_dir, plan("int8", quantize_embedding=True))(ids).logits
    delayed = plan("int8", quantize_embedding=True, after=2)
    module, schedule = prepared(tiny_model_dir, delayed), qat.FakeQuantSchedule(delayed)
    for steps_done in range(2):
        schedule.at_step(module, steps_done)
        assert torch.equal(module(ids).logits, plain_logits), steps_done
    schedule.at_step(module, 2)
    assert torch.equal(module(ids).logits, always)


def test_a_few_training_steps_reduce_the_loss(tiny_model_dir: Path) -> None:
    require_torchao()
    module = prepared(tiny_model_dir, plan("int8", quantize_embedding=True))
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    ids = token_batch(length=32)
    losses = []
    for _ in range(12):
        loss = module(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0]


# --- conversion and the saved model --------------------------------------------------------------------------------

def test_conversion_bakes_the_ternary_weights_and_keeps_the_logits(tiny_model_dir: Path, tmp_path: Path) -> None:
    module = prepared(tiny_model_dir, plan())
    nudge(module)
    ids = token_batch()
    fake_logits = module(ids).logits
    trained = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    ternary_names = {f"{name}.weight" for name in qat.fake_quantized_modules(module)}
    qat.strip_fake_quantization(module)
    module.save_pretrained(tmp_path)

    loaded = tiny(tmp_path)
    assert qat.fake_quantized_modules(loaded) == [] and type(loaded.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert torch.equal(loaded(ids).logits, fake_logits)  # the baked weights are the ones forward used
    for name, tensor in loaded.state_dict().items():
        if name in ternary_names:
            assert torch.equal(tensor, three_levels_by_hand(trained[name])), name
            assert all(row.unique().numel() <= 3 for row in tensor), name
        else:  # the output head, the norms and the embedding: the trained full-precision values
            assert torch.equal(tensor, trained[name]), name


def test_conversion_with_int8_activations_and_embedding(tiny_model_dir: Path) -> None:
    """As Axolotl: the weights are baked, the activation rounding (in forward) is not, and the embedding table is
    saved in full precision (its int8 rounding left to a later quantise step)."""
    require_torchao()
    module = prepared(tiny_model_dir, plan("int8", quantize_embedding=True))
    nudge(module)
    ids = token_batch()
    table = module.model.embed_tokens.weight.detach().clone()
    for layer in module.modules():
        if isinstance(layer, qat_ternary.TernaryFakeQuantizedLinear):
            layer.activation_fake_quantizer.enabled = False
    module.model.embed_tokens.weight_fake_quantizer.enabled = False
    weights_only = module(ids).logits
    qat.strip_fake_quantization(module)
    assert qat.fake_quantized_modules(module) == [] and type(module.model.embed_tokens) is torch.nn.Embedding
    assert torch.equal(module.model.embed_tokens.weight, table)
    assert torch.equal(module(ids).logits, weights_only)


def test_a_checkpoint_resumes_into_a_freshly_prepared_model(tiny_model_dir: Path) -> None:
    require_torchao()
    before = prepared(tiny_model_dir, plan("int8", quantize_embedding=True))
    nudge(before)
    again = prepared(tiny_model_dir, plan("int8", quantize_embedding=True))
    again.load_state_dict(before.state_dict(), strict=True)
    ids = token_batch()
    assert torch.equal(again(ids).logits, before(ids).logits)


def test_lora_trains_over_ternary_base_layers(tiny_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    module = get_peft_model(prepared(tiny_model_dir, plan("int8")), config)
    q_proj = module.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer) is qat_ternary.TernaryFakeQuantizedLinear
    ids = token_batch()
    module(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.named_parameters() if "lora_" in n)
    qat.strip_fake_quantization(module)
    assert qat.fake_quantized_modules(module) == []
    assert all(row.unique().numel() <= 3 for row in q_proj.base_layer.weight)


# --- what ternary needs ----------------------------------------------------------------------------------------

def test_torchao_is_needed_only_for_the_embedding(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # what a machine without torchao sees
    cpu = torch.device("cpu")
    qat.check_qat(plan("int8"), cpu)
    module = prepared(tiny_model_dir, plan("int8", after=1))
    qat.FakeQuantSchedule(plan("int8", after=1)).at_step(module, 0)
    assert not any(layer.weight_fake_quantizer.enabled for layer in module.modules()
                   if isinstance(layer, qat_ternary.TernaryFakeQuantizedLinear))
    qat.strip_fake_quantization(module)
    assert qat.fake_quantized_modules(module) == []
    with pytest.raises(qat.QatError, match=re.escape("pip install 'tunefile[torchao]'")):
        qat.check_qat(plan("int8", quantize_embedding=True), cpu)


def test_only_int8_activations_go_with_ternary_weights() -> None:
    for activation in ("int4", "float8_e4m3fn"):
        with pytest.raises(qat.QatError, match="cannot fake-quantise ternary weights"):
            qat.check_qat_plan(plan(activation))


# --- through a compiled bundle -------------------------------------------------------------------------------

def test_a_ternary_bundle_trains_and_saves_ternary_weights(tmp_path: Path) -> None:
    require_torchao()
    model_dir = build_tiny_model(tmp_path / "tiny-model")
    root = workspace(tmp_path, model_dir)
    launch(compile_bundle(write_config(root, max_steps=10, qat={"weight_dtype": "ternary", "activation_dtype": "int8",
                                                               "quantize_embedding": True})))
    losses = train_losses(root / "out")
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3])
    saved = tiny(root / "out")
    assert qat.fake_quantized_modules(saved) == []
    assert all(row.unique().numel() <= 3 for row in saved.model.layers[0].self_attn.o_proj.weight)
    assert saved.lm_head.weight[0].unique().numel() > 3  # the output head trained in full precision
