"""Quantisation-aware training (runtime/qat.py): torchao's fake quantisation in the tiny model's layers, its
numbers against a hand-written quantiser, gradients through the rounding, the delayed start, the save that
plain transformers loads, resuming, the combinations refused, and runs through compiled bundles.

torchao's integer and float8 fake quantisation is plain PyTorch and runs on the CPU; the fp4 formats need a
GPU (mxfp4 emulated on any CUDA GPU, nvfp4 on Blackwell only) and are marked `gpu`."""

from __future__ import annotations

import math
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from helpers import require_module
from runtime_bundles import (
    build_tiny_model,
    compile_bundle,
    launch,
    metrics,
    safetensors,
    summary,
    train_losses,
    workspace,
    write_config,
)
from tunefile.runtime import checkpoint, qat
from tunefile.schemas.run_plan import QatPlan

require_module("torchao", "quantisation-aware training needs it: pip install 'tunefile[torchao]'")


def plan(weight: str = "int4", activation: str | None = "int8", *, group_size: int = 32,
         quantize_embedding: bool = False, after: int | None = None) -> QatPlan:
    return QatPlan(weight_dtype=weight, activation_dtype=activation, group_size=group_size,
                   quantize_embedding=quantize_embedding, fake_quant_after_n_steps=after)


def tiny(model_dir: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)


def prepared(model_dir: Path, qat_plan: QatPlan, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    module = tiny(model_dir, dtype)
    qat.prepare_qat(module, qat_plan)
    return module


def token_batch(seed: int = 0, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 1000, (2, length), generator=torch.Generator().manual_seed(seed))


def linear_names(module: torch.nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)]


def int4_weight_only(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Int4WeightOnlyConfig's numbers, by hand: each group of a row mapped onto 16 levels from its min to its max."""
    groups = weight.float().reshape(weight.shape[0], -1, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (high - low).clamp(min=1e-6) / 15
    levels = torch.round((groups - low) / step).clamp(0, 15)
    return (levels * step + low).reshape(weight.shape).to(weight.dtype)


def int8_symmetric(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Symmetric int8 per group, by hand: the group's largest magnitude spans half of the 255 steps."""
    groups = weight.float().reshape(weight.shape[0], -1, group_size)
    step = groups.abs().amax(-1, keepdim=True) / 127.5
    # Times the reciprocal, as torchao computes it: a division rounds a few values on a .5 tie the other way.
    return (torch.round(groups * (1.0 / step)).clamp(-128, 127) * step).reshape(weight.shape).to(weight.dtype)


# --- the fake-quantised layers --------------------------------------------------------------------------------

@pytest.mark.parametrize(("weight", "by_hand"), [("int4", int4_weight_only), ("int8", int8_symmetric)])
def test_each_linear_layer_computes_with_its_weights_quantised(tiny_model_dir: Path, weight: str, by_hand) -> None:
    """Weight-only: every linear layer, the output head included (as in Axolotl), now computes exactly what the
    plain layer computes with the hand-quantised weight: it differs from the plain model by the quantisation
    error of its weights, and by nothing else."""
    plain, module = tiny(tiny_model_dir), prepared(tiny_model_dir, plan(weight, None, group_size=32))
    assert qat.fake_quantized_modules(module) == linear_names(plain)  # lm_head included, the embedding not
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1))
    plain_layers = dict(plain.named_modules())
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear):
            ref = plain_layers[name]
            inputs = x[..., :layer.in_features]
            error = F.linear(inputs, by_hand(ref.weight, 32) - ref.weight)
            assert error.abs().max() > 0, name
            torch.testing.assert_close(layer(inputs) - ref(inputs), error, atol=2e-5, rtol=1e-4)
    ids = token_batch()
    assert not torch.equal(module(ids).logits, plain(ids).logits)


def test_activations_are_quantised_per_token_and_the_state_dict_is_the_plain_one(tiny_model_dir: Path) -> None:
    plain, module = tiny(tiny_model_dir), prepared(tiny_model_dir, plan("int4", "int8", quantize_embedding=True))
    layer = module.model.layers[0].mlp.down_proj
    assert layer.weight_fake_quantizer.config.group_size == 32
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(2))
    quantised_x = layer.activation_fake_quantizer(x)
    assert 0 < (quantised_x - x).abs().max() < 0.05 * x.abs().max()
    for row, q_row in zip(x, quantised_x, strict=True):  # int8 per token: at most 256 values in each row
        assert q_row.unique().numel() <= 256 and not torch.equal(row, q_row)
    assert "model.embed_tokens" in qat.fake_quantized_modules(module)  # quantize_embedding: weight-only
    # The same tensors under the same names: a plain checkpoint loads into a prepared model strictly, and back.
    assert module.state_dict().keys() == plain.state_dict().keys()


def test_gradients_pass_straight_through_the_rounding(tiny_model_dir: Path) -> None:
    module = prepared(tiny_model_dir, plan("int4", "int8"))
    layer = module.model.layers[0].self_attn.q_proj
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    upstream = torch.randn(6, layer.out_features, generator=torch.Generator().manual_seed(4))
    layer(x).backward(upstream)
    # d/dx of the layer is the quantised weight's: the activation's rounding passes the gradient unchanged.
    with torch.no_grad():
        quantised_weight = layer.weight_fake_quantizer(layer.weight)
    torch.testing.assert_close(x.grad, upstream @ quantised_weight, atol=1e-5, rtol=1e-5)

    module.zero_grad(set_to_none=True)
    ids = token_batch()
    module(input_ids=ids, labels=ids).loss.backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_a_few_training_steps_reduce_the_loss(tiny_model_dir: Path) -> None:
    module = prepared(tiny_model_dir, plan("int4", "int8", quantize_embedding=True))
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    ids = token_batch(length=32)
    losses = []
    for _ in range(12):
        loss = module(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]


# --- the delayed start --------------------------------------------------------------------------------------

def test_fake_quantisation_starts_after_the_planned_step(tiny_model_dir: Path) -> None:
    ids = token_batch()
    plain_logits = tiny(tiny_model_dir)(ids).logits
    always = prepared(tiny_model_dir, plan("int4", "int8"))(ids).logits
    module = prepared(tiny_model_dir, plan("int4", "int8", after=3))
    schedule = qat.FakeQuantSchedule(plan("int4", "int8", after=3))
    for steps_done in range(3):  # off while fewer than 3 optimizer steps have run
        schedule.at_step(module, steps_done)
        assert torch.equal(module(ids).logits, plain_logits), steps_done
    schedule.at_step(module, 3)
    assert torch.equal(module(ids).logits, always)
    # A run resumed past the start switches on at once: the switch is a function of the step count alone.
    resumed = prepared(tiny_model_dir, plan("int4", "int8", after=3))
    qat.FakeQuantSchedule(plan("int4", "int8", after=3)).at_step(resumed, 7)
    assert torch.equal(resumed(ids).logits, always)


# --- saving and resuming --------------------------------------------------------------------------------------

def test_the_saved_model_loads_with_plain_transformers(tiny_model_dir: Path, tmp_path: Path) -> None:
    module = prepared(tiny_model_dir, plan("int4", "int8", quantize_embedding=True))
    ids = token_batch()
    module(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD(module.parameters(), lr=0.1).step()  # weights that differ from the base model's
    trained = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    qat.strip_fake_quantization(module)
    assert qat.fake_quantized_modules(module) == []
    module.save_pretrained(tmp_path)

    loaded = tiny(tmp_path)
    assert qat.fake_quantized_modules(loaded) == []
    assert type(loaded.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert type(loaded.model.embed_tokens) is torch.nn.Embedding
    assert loaded.state_dict().keys() == trained.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    assert torch.equal(loaded(ids).logits, module(ids).logits)  # both plain now: full precision


def test_a_checkpoint_resumes_into_a_freshly_prepared_model(tiny_model_dir: Path) -> None:
    """A resumed run prepares the model again before loading the checkpoint: the fake quantisers hold no state
    of their own (dynamic scales), so the weights alone reproduce the run."""
    before = prepared(tiny_model_dir, plan("int4", "int8", quantize_embedding=True))
    with torch.no_grad():
        for param in before.parameters():
            param.mul_(1.01)
    again = prepared(tiny_model_dir, plan("int4", "int8", quantize_embedding=True))
    again.load_state_dict(before.state_dict(), strict=True)
    ids = token_batch()
    assert torch.equal(again(ids).logits, before(ids).logits)


# --- where it sits in loading, and what is refused ------------------------------------------------------------

def test_lora_trains_over_fake_quantised_base_layers(tiny_model_dir: Path) -> None:
    """QAT before the adapter: peft wraps the fake-quantised layers, whose frozen weights are quantised in forward
    while the low-rank update stays in full precision; the adapter saves the same tensors as without QAT."""
    from peft import LoraConfig, get_peft_model

    def lora(module: torch.nn.Module) -> torch.nn.Module:
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        return get_peft_model(module, config)

    torch.manual_seed(0)
    plain = lora(tiny(tiny_model_dir))
    torch.manual_seed(0)
    module = lora(prepared(tiny_model_dir, plan("int4", None)))
    q_proj = module.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "FakeQuantizedLinear" and not q_proj.base_layer.weight.requires_grad
    ids = token_batch()
    assert not torch.equal(module(ids).logits, plain(ids).logits)
    module(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in module.named_parameters() if "lora_" in n)
    qat.strip_fake_quantization(module)
    assert qat.fake_quantized_modules(module) == []
    assert module.state_dict().keys() == plain.state_dict().keys()


def test_load_model_applies_qat_before_the_adapter_and_refuses_a_quantised_base(tiny_model_dir: Path) -> None:
    from plan_factory import make_plan
    from tunefile.compiler.render.config_yaml import build_run_plan
    from tunefile.runtime.model import ModelLoadError, load_model

    spec = {"adapter": "lora", "lora_target_linear": True, "qat": {"weight_dtype": "int4", "group_size": 32}}
    model_plan = replace(build_run_plan(make_plan("single", spec=spec)).model, base_model=str(tiny_model_dir),
                         tokenizer=str(tiny_model_dir), precision="fp32", architecture=None, parameters=None)
    module = load_model(model_plan, attn_implementation="sdpa", vocab_size=tiny(tiny_model_dir).config.vocab_size)
    names = qat.fake_quantized_modules(module)
    assert names and all(name.endswith(".base_layer") or name.endswith("lm_head") for name in names)
    with pytest.raises(ModelLoadError, match="qat .*quantised base"):
        load_model(replace(model_plan, load_in_4bit=True), attn_implementation="sdpa", vocab_size=1)


SUPPORTED_ON_CPU = [("int4", None), ("int4", "int8"), ("int8", None), ("int8", "int8"),
                    ("int4", "float8_e4m3fn"), ("float8_e4m3fn", "float8_e4m3fn")]


@pytest.mark.parametrize(("weight", "activation"), SUPPORTED_ON_CPU)
def test_every_integer_and_float8_pair_trains_on_the_cpu(weight: str, activation: str | None) -> None:
    group = qat.FIXED_GROUP_SIZE.get((weight, activation), 32)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.GELU(), torch.nn.Linear(128, 8))
    x = torch.randn(16, 256)
    plain_out = module(x).detach()
    qat.prepare_qat(module, plan(weight, activation, group_size=group))
    assert len(qat.fake_quantized_modules(module)) == 2
    out = module(x)
    assert 0 < (out - plain_out).abs().max() < 0.25 * plain_out.abs().max()
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize(("changes", "message"), [
    ({"weight": "int4", "activation": "int4"}, "cannot fake-quantise int4 weights with int4 activations"),
    ({"weight": "int8", "activation": "float8_e4m3fn"}, "cannot fake-quantise"),
    ({"weight": "float8_e4m3fn", "activation": None}, "cannot fake-quantise float8_e4m3fn weights with unquantised"),
    ({"weight": "nvfp4", "activation": None}, "cannot fake-quantise"),
    ({"weight": "mxfp4", "activation": "int8"}, "cannot fake-quantise"),
    ({"weight": "int4", "activation": "float8_e4m3fn", "group_size": 32}, r"groups of 128.*group_size: 128"),
    ({"weight": "nvfp4", "activation": "nvfp4", "group_size": 32}, r"groups of 16"),
    ({"weight": "mxfp4", "activation": "mxfp4", "group_size": 16}, r"groups of 32"),
    ({"weight": "float8_e4m3fn", "activation": "float8_e4m3fn", "quantize_embedding": True},
     "quantize_embedding: .*int4 or int8 weights"),
    ({"weight": "mxfp4", "activation": "mxfp4", "after": 10}, "fake_quant_after_n_steps"),
])
def test_combinations_torchao_cannot_fake_quantise_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(qat.QatError, match=message):
        qat.check_qat_plan(plan(**changes))


def test_a_group_size_that_does_not_divide_a_layer_is_refused_naming_it(tiny_model_dir: Path) -> None:
    with pytest.raises(qat.QatError, match=r"group_size 48 does not divide the 64 columns of "
                                           r"model\.layers\.0\.self_attn\.q_proj's weight"):
        qat.prepare_qat(tiny(tiny_model_dir), plan("int4", "int8", group_size=48))


def test_fp4_formats_need_a_cuda_gpu_and_all_need_a_recent_torchao(monkeypatch: pytest.MonkeyPatch) -> None:
    for weight in ("nvfp4", "mxfp4"):
        group = qat.FIXED_GROUP_SIZE[(weight, weight)]
        with pytest.raises(qat.QatError, match=f"{weight} fake quantisation needs a CUDA GPU"):
            qat.check_qat(plan(weight, weight, group_size=group), torch.device("cpu"))
    qat.check_qat(plan("int4", "int8"), torch.device("cpu"))  # the integer formats run anywhere
    import torchao

    with monkeypatch.context() as patch:
        patch.setattr(torchao, "__version__", "0.17.0")  # its int4 quantiser ignores the off switch
        with pytest.raises(qat.QatError, match=re.escape("needs torchao 0.18 or later, this is 0.17.0")):
            qat.check_qat(plan("int4", "int8"), torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # what a machine without torchao sees
    with pytest.raises(qat.QatError, match=re.escape("pip install 'tunefile[torchao]'")):
        qat.check_qat(plan("int4", "int8"), torch.device("cpu"))


# --- through compiled bundles ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-model")


def test_a_qat_bundle_trains_and_saves_a_plain_model(tmp_path: Path, tiny_model: Path) -> None:
    root = workspace(tmp_path, tiny_model)
    launch(compile_bundle(write_config(root, qat={"weight_dtype": "int4", "activation_dtype": "int8",
                                                  "group_size": 32})))
    losses = train_losses(root / "out")
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3])
    loaded = tiny(root / "out")
    assert qat.fake_quantized_modules(loaded) == []
    assert safetensors(root / "out" / "model.safetensors").keys() == tiny(tiny_model).state_dict().keys()


def test_a_qat_run_killed_mid_way_resumes_to_the_uninterrupted_weights(tmp_path: Path, tiny_model: Path) -> None:
    """Fake quantisation starts after step 6; run B dies after step 5 and resumes from the checkpoint of step 4,
    so the switch must come back off, then on at the same step as in run A."""
    common = {"max_steps": 10, "save_steps": 4, "auto_resume_from_checkpoints": True,
              "qat": {"weight_dtype": "int4", "activation_dtype": "int8", "group_size": 32,
                      "fake_quant_after_n_steps": 6}}
    uninterrupted = workspace(tmp_path / "a", tiny_model)
    launch(compile_bundle(write_config(uninterrupted, **common)))
    interrupted = workspace(tmp_path / "b", tiny_model)
    bundle = compile_bundle(write_config(interrupted, **common))
    assert launch(bundle, env={"TUNEFILE_FAULT_AFTER_STEP": "5"}, check=False).returncode != 0
    assert [s for s, _ in checkpoint.complete_checkpoints(interrupted / "out")] == [4]
    resumed = launch(bundle)
    log = resumed.stdout + resumed.stderr
    assert "fake quantisation off after 4 optimizer steps" in log and "on after 6 optimizer steps" in log

    weights = "model.safetensors"
    a, b = safetensors(uninterrupted / "out" / weights), safetensors(interrupted / "out" / weights)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses_a = {r["step"]: r["loss"] for r in metrics(uninterrupted / "out") if "loss" in r}
    losses_b = {r["step"]: r["loss"] for r in metrics(interrupted / "out") if "loss" in r}
    assert losses_b == pytest.approx(losses_a, abs=1e-6)


# --- the fp4 formats, on a GPU --------------------------------------------------------------------------------

def _train_on_gpu(model_dir: Path, qat_plan: QatPlan, dtype: torch.dtype = torch.bfloat16) -> list[float]:
    """A few steps in bf16 compute: bf16 weights, or fp32 master weights under bf16 autocast (the runtime's
    full fine-tuning)."""
    module = prepared(model_dir, qat_plan, dtype=dtype).cuda()
    plain = tiny(model_dir, dtype).cuda()
    ids = token_batch(length=32).cuda()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    with autocast:
        assert not torch.equal(module(ids).logits, plain(ids).logits)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        with autocast:
            loss = module(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in module.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mxfp4_fake_quantisation_trains_on_a_gpu(tiny_model_dir: Path, dtype: torch.dtype) -> None:
    mxfp4 = plan("mxfp4", "mxfp4", group_size=32)
    qat.check_qat(mxfp4, torch.device("cuda"))  # emulated: any CUDA GPU
    losses = _train_on_gpu(tiny_model_dir, mxfp4, dtype)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0]


@pytest.mark.gpu
def test_nvfp4_fake_quantisation_trains_on_blackwell_and_is_refused_before(tiny_model_dir: Path) -> None:
    nvfp4 = plan("nvfp4", "nvfp4", group_size=16)
    if torch.cuda.get_device_capability() < qat.NVFP4_MIN_CAPABILITY:
        with pytest.raises(qat.QatError, match="nvfp4 fake quantisation needs a Blackwell GPU"):
            qat.check_qat(nvfp4, torch.device("cuda"))
        return
    qat.check_qat(nvfp4, torch.device("cuda"))
    losses = _train_on_gpu(tiny_model_dir, nvfp4)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0]


@pytest.mark.gpu
def test_an_mxfp4_bundle_trains_in_bf16_on_a_gpu(tmp_path: Path, tiny_model: Path) -> None:
    root = workspace(tmp_path, tiny_model)
    launch(compile_bundle(write_config(root, bf16=True, qat={"weight_dtype": "mxfp4", "activation_dtype": "mxfp4",
                                                             "group_size": 32}),
                          target="h100-80gb", gpus_per_node=1))
    losses = train_losses(root / "out")
    assert all(math.isfinite(v) for v in losses) and sum(losses[-3:]) < sum(losses[:3])
    assert qat.fake_quantized_modules(tiny(root / "out")) == []


@pytest.mark.gpu
def test_an_fsdp2_qat_bundle_trains_sharded(tmp_path: Path, tiny_model: Path) -> None:
    """accelerate shards the fake-quantised model after runtime/model.py returns it: FSDP2 gathers each layer's
    weights before its forward, where the fake quantisers see whole rows; the gathered save is the plain model.
    Two GPUs where the machine has them (one still runs FSDP2: DTensor parameters, the gathered save)."""
    gpus = min(torch.cuda.device_count(), 2)
    root = workspace(tmp_path, tiny_model)
    bundle = compile_bundle(write_config(root, bf16=True, max_steps=12, fsdp_version=2, fsdp_config={},
                                         qat={"weight_dtype": "int4", "activation_dtype": "int8", "group_size": 32}),
                            target="h100-80gb", gpus_per_node=gpus)
    launch(bundle)
    result = summary(root / "out")
    assert result["distributed_type"] == "FSDP" and result["world_size"] == gpus
    losses = train_losses(root / "out")
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses) and sum(losses[-3:]) < sum(losses[:3])
    loaded = tiny(root / "out")
    assert qat.fake_quantized_modules(loaded) == []
    assert loaded.state_dict().keys() == tiny(tiny_model).state_dict().keys()
