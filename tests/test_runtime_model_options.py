"""The parameter and memory options of an Axolotl config in the runtime: unfrozen_parameters (runtime/freeze.py),
LoRA's regex targets, target_parameters, fan_in_fan_out and use_rslora, gradient_checkpointing_kwargs
(runtime/model.py) and activation offloading (runtime/offload.py). Model plans come from the real compiler
(plan_factory) pointed at the tiny model; one end-to-end run goes through a compiled bundle."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import require_module
from plan_factory import make_plan
from runtime_bundles import (
    build_tiny_model,
    compile_bundle,
    launch,
    metrics,
    safetensors,
    train_losses,
    workspace,
    write_config,
)
from tunefile.compiler.render.config_yaml import build_run_plan
from tunefile.runtime import freeze, offload
from tunefile.runtime.model import ModelLoadError, add_adapter, load_model, lora_parameter_options
from tunefile.runtime.optim import build_optimizer
from tunefile.schemas.run_plan import LoraPlan, ModelPlan, OptimizerPlan, RunPlan


def compiled(**spec: Any) -> RunPlan:
    return build_run_plan(make_plan("single", spec={"adapter": None, **spec}))


def model_plan(model_dir: Path, **spec: Any) -> ModelPlan:
    """The compiler's model section for ``spec``, on the tiny model, in fp32 (the CPU's precision)."""
    return replace(compiled(**spec).model, base_model=str(model_dir), tokenizer=str(model_dir), precision="fp32",
                   architecture=None, parameters=None)


def load(model_dir: Path, **spec: Any) -> torch.nn.Module:
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size  # no resize: the tokenizer adds nothing here
    torch.manual_seed(0)  # the same random LoRA initialisation on every load
    module = load_model(model_plan(model_dir, **spec), attn_implementation="sdpa", vocab_size=vocab)
    module.train()
    return module


def sgd_free_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW as the plan builds it, without weight decay, so a parameter changes only through its gradient."""
    plan: OptimizerPlan = replace(compiled(optimizer="adamw_torch").optimizer, learning_rate=1e-2, weight_decay=0.0)
    return build_optimizer(module, plan, device_type="cpu")


def token_batch(seed: int = 0, *, low: int = 0, high: int = 1000, length: int = 24) -> torch.Tensor:
    return torch.randint(low, high, (2, length), generator=torch.Generator().manual_seed(seed))


def backward(module: torch.nn.Module, input_ids: torch.Tensor) -> None:
    module(input_ids=input_ids, labels=input_ids).loss.backward()


def gradients(module: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    backward(module, input_ids)
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


# --- unfrozen_parameters ----------------------------------------------------------------------------------------

def test_unfrozen_parameters_train_exactly_the_matching_parameters(tiny_model_dir: Path) -> None:
    module = load(tiny_model_dir, unfrozen_parameters=["model.layers.1.mlp", "lm_head"])
    params = dict(module.named_parameters())
    expected = {name for name in params if name.startswith(("model.layers.1.mlp.", "lm_head."))}
    assert expected and len(expected) < len(params)
    assert {name for name, p in params.items() if p.requires_grad} == expected
    optimizer = sgd_free_optimizer(module)
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(params[n]) for n in expected}

    before = {name: p.detach().clone() for name, p in params.items()}
    backward(module, token_batch())
    optimizer.step()
    changed = {name for name, p in params.items() if not torch.equal(p.detach(), before[name])}
    assert changed == expected


def test_patterns_read_as_axolotl_reads_them() -> None:
    """re.match (anchored at the start only), a dot is a literal dot except in `.+`, an optional row range."""
    layer_one = freeze.parse_pattern("model.layers.1.mlp")
    assert layer_one.matches("model.layers.1.mlp.up_proj.weight")
    assert layer_one.matches("model.layers.11.mlp.up_proj.weight") is False
    assert freeze.parse_pattern("model.layers.1").matches("model.layers.11.mlp.up_proj.weight")  # a prefix
    assert not layer_one.matches("modelXlayers.1.mlp.up_proj.weight")  # the dot is not "any character"
    assert not freeze.parse_pattern("layers.1.mlp").matches("model.layers.1.mlp.up_proj.weight")  # from the start
    assert freeze.parse_pattern("model.+down_proj").matches("model.layers.0.mlp.down_proj.weight")
    assert freeze.parse_pattern(r"^lm_head.weight$").matches("lm_head.weight")
    assert [freeze.parse_pattern(text).rows for text in ("e.weight[:32]", "e.weight[4:]", "e.weight[3]",
                                                         "e.weight[2:9]", "e.weight")] == \
        [(0, 32), (4, None), (3, 4), (2, 9), None]
    with pytest.raises(freeze.UnfrozenParametersError, match="ends before it starts"):
        freeze.parse_pattern("e.weight[9:2]")
    with pytest.raises(freeze.UnfrozenParametersError, match="not a regular expression"):
        freeze.parse_pattern("model.layers.(")


def test_a_row_range_trains_only_those_rows(tiny_model_dir: Path) -> None:
    module = load(tiny_model_dir, unfrozen_parameters=["model.embed_tokens.weight[:16]"])
    embeddings = module.get_input_embeddings()
    embedding = embeddings.weight
    assert [name for name, p in module.named_parameters() if p.requires_grad] == ["model.embed_tokens.weight"]
    input_ids = torch.cat([token_batch(high=16), token_batch(1, low=16, high=1000)], dim=1)
    before = embedding.detach().clone()
    optimizer = sgd_free_optimizer(module)
    backward(module, input_ids)
    assert torch.count_nonzero(embedding.grad[16:]) == 0 and torch.count_nonzero(embedding.grad[:16]) > 0
    optimizer.step()
    # The pad token's row gets no gradient from nn.Embedding itself (padding_idx).
    used_low = sorted(set(input_ids[:, :24].flatten().tolist()) - {embeddings.padding_idx})
    assert torch.equal(embedding.detach()[16:], before[16:])  # rows of tokens the batch used did not move
    assert all(not torch.equal(embedding.detach()[row], before[row]) for row in used_low)


def test_a_row_range_beyond_the_parameter_is_an_error(tiny_model_dir: Path) -> None:
    with pytest.raises(freeze.UnfrozenParametersError, match="rows up to 5000"):
        load(tiny_model_dir, unfrozen_parameters=["model.embed_tokens.weight[:5000]"])


def test_patterns_that_match_nothing_are_an_error(tiny_model_dir: Path) -> None:
    with pytest.raises(freeze.UnfrozenParametersError, match="nothing would train.*model.embed_tokens.weight"):
        load(tiny_model_dir, unfrozen_parameters=["transformer.h.0.", "decoder.layers"])


def test_one_unmatched_pattern_is_named_in_the_log(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="tunefile.runtime.freeze"):
        load(tiny_model_dir, unfrozen_parameters=["lm_head", "decoder.layers"])
    assert "decoder.layers matches no parameter" in caplog.text
    assert "1 of" in caplog.text and "parameter tensors train" in caplog.text


def test_row_ranges_are_refused_under_fsdp() -> None:
    with pytest.raises(freeze.UnfrozenParametersError, match="FSDP"):
        freeze.check_row_ranges_supported(("model.embed_tokens.weight[:16]",), fsdp=True)
    freeze.check_row_ranges_supported(("model.embed_tokens.weight[:16]",), fsdp=False)
    freeze.check_row_ranges_supported(("model.layers.1.",), fsdp=True)
    freeze.check_row_ranges_supported(None, fsdp=True)


# --- gradient checkpointing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"use_reentrant": True}, {"use_reentrant": False, "preserve_rng_state": False}])
def test_gradient_checkpointing_kwargs_reach_every_layer(tiny_model_dir: Path, kwargs: dict[str, Any]) -> None:
    module = load(tiny_model_dir, gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs)
    layers = module.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert all(layer._gradient_checkpointing_func.keywords == kwargs for layer in layers)


def test_reentrant_checkpointing_still_trains_layers_behind_frozen_embeddings(tiny_model_dir: Path) -> None:
    """Reentrant checkpointing gives no gradient to a layer whose input needs none, and frozen embeddings give
    such an input: the layers would silently stop learning. The gradients must equal those without it."""
    spec = {"unfrozen_parameters": ["model.layers.1."]}
    plain = gradients(load(tiny_model_dir, **spec), token_batch())
    checkpointed = gradients(load(tiny_model_dir, gradient_checkpointing=True,
                                  gradient_checkpointing_kwargs={"use_reentrant": True}, **spec), token_batch())
    assert plain and sorted(checkpointed) == sorted(plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


def test_reentrant_checkpointing_trains_a_lora_adapter(tiny_model_dir: Path) -> None:
    lora = {"adapter": "lora", "lora_target_linear": True}
    plain = gradients(load(tiny_model_dir, **lora), token_batch())
    checkpointed = gradients(load(tiny_model_dir, gradient_checkpointing=True,
                                  gradient_checkpointing_kwargs={"use_reentrant": True}, **lora), token_batch())
    assert any("lora_B" in name for name in plain) and sorted(checkpointed) == sorted(plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


# --- LoRA options -----------------------------------------------------------------------------------------------

def lora_plan(**spec: Any) -> LoraPlan:
    lora = compiled(adapter="lora", lora_target_linear=False, **spec).model.lora
    assert lora is not None
    return lora


def lora_module_names(model: torch.nn.Module) -> set[str]:
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name.removeprefix(prefix) for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_a_regex_target_puts_lora_on_exactly_the_modules_it_fully_matches(tiny_model_dir: Path) -> None:
    pattern = r"model\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.down_proj)"
    lora = lora_plan(lora_target_modules=pattern)
    assert lora.target_modules_regex == pattern and lora.target_modules is None
    base = load(tiny_model_dir)
    expected = {name for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)
                and re.fullmatch(pattern, name)}
    assert expected and len(expected) == 3 * len(base.model.layers)
    assert lora_module_names(add_adapter(base, lora)) == expected


def test_lora_on_moe_expert_parameters(tmp_path: Path) -> None:
    """target_parameters: LoRA on experts stored as one 3-D nn.Parameter (transformers 5's MoE layout)."""
    from peft.tuners.lora import ParamWrapper
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                             num_experts_per_tok=2))
    experts = [name for name, _ in model.named_parameters() if name.endswith("experts.gate_up_proj")]
    assert experts, "the tiny Mixtral keeps its experts as one parameter"
    lora = lora_plan(lora_target_modules=["q_proj"], lora_target_parameters=["mlp.experts.gate_up_proj"])
    peft_model = add_adapter(model, lora)
    wrapped = [name for name, m in peft_model.named_modules() if isinstance(m, ParamWrapper)]
    assert [name.removeprefix("base_model.model.") for name in wrapped] == ["model.layers.0.mlp.experts"]
    backward(peft_model, token_batch(high=128, length=8))
    trained = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert any(name.startswith(wrapped[0]) and "lora_B" in name for name in trained)
    expert_b = [p for name, p in peft_model.named_parameters() if name.startswith(wrapped[0]) and "lora_B" in name]
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in expert_b)


def test_target_parameters_need_a_peft_that_has_them() -> None:
    lora = lora_plan(lora_target_parameters=["mlp.experts.gate_up_proj"])
    assert lora_parameter_options(lora, {"target_parameters": None}) == \
        {"target_parameters": ["mlp.experts.gate_up_proj"]}
    assert lora_parameter_options(replace(lora, target_parameters=None), {}) == {}
    with pytest.raises(ModelLoadError, match="peft>=0.17"):
        lora_parameter_options(lora, {"r": None, "lora_alpha": None})


def test_fan_in_fan_out_and_rslora_reach_the_adapter() -> None:
    """GPT-2 keeps its projections as Conv1D, (in, out) weights: the case fan_in_fan_out is for."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    lora = lora_plan(lora_target_modules=["c_attn"], lora_r=4, lora_alpha=8, lora_fan_in_fan_out=True,
                     peft_use_rslora=True)
    peft_model = add_adapter(model, lora)
    config = peft_model.peft_config["default"]
    assert (config.fan_in_fan_out, config.use_rslora) == (True, True)
    layer = peft_model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out
    assert layer.scaling["default"] == pytest.approx(lora.alpha / math.sqrt(lora.r))
    peft_model(input_ids=token_batch(high=128, length=8))  # the (in, out) weight multiplies the right way


def test_without_rslora_updates_scale_by_alpha_over_r(tiny_model_dir: Path) -> None:
    lora = lora_plan(lora_target_modules=["q_proj"], lora_r=4, lora_alpha=8)
    peft_model = add_adapter(load(tiny_model_dir), lora)
    assert peft_model.peft_config["default"].use_rslora is False
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(lora.alpha / lora.r)


# --- activation offloading --------------------------------------------------------------------------------------

def test_activation_offloading_is_decided_for_the_machine() -> None:
    off = offload.decide_activation_offloading(False, device_type="cuda")
    assert off == offload.ActivationOffloading(False, False, None) and off.record() == {}
    on_gpu = offload.decide_activation_offloading(True, device_type="cuda")
    assert (on_gpu.enabled, on_gpu.pin_memory, on_gpu.fallback) == (True, True, None)
    assert on_gpu.record() == {"activation_offloading": True, "activation_offloading_fallback": None}
    assert isinstance(on_gpu.context(), offload.SavedActivationsOnCpu)
    on_cpu = offload.decide_activation_offloading(True, device_type="cpu")
    assert not on_cpu.enabled and "cpu" in on_cpu.fallback
    assert on_cpu.record() == {"activation_offloading": False, "activation_offloading_fallback": on_cpu.fallback}
    assert not isinstance(on_cpu.context(), offload.SavedActivationsOnCpu)


def test_parameters_and_cpu_tensors_are_saved_where_they_are() -> None:
    hooks = offload.SavedActivationsOnCpu(pin_memory=False)
    weight, activation = torch.nn.Parameter(torch.ones(3)), torch.ones(3)
    assert hooks.pack_hook(weight) is weight and hooks.unpack_hook(weight) is weight
    assert hooks.pack_hook(activation) is activation


@pytest.mark.gpu
def test_offloaded_activations_live_in_pinned_cpu_memory_and_come_back() -> None:
    hooks = offload.SavedActivationsOnCpu(pin_memory=True)
    activation = torch.randn(64, 64, device="cuda")
    device, host = hooks.pack_hook(activation)
    assert device == activation.device and host.device.type == "cpu" and host.is_pinned()
    restored = hooks.unpack_hook((device, host))
    assert restored.device == activation.device and torch.equal(restored, activation)
    weight = torch.nn.Parameter(torch.randn(4, device="cuda"))
    assert hooks.pack_hook(weight) is weight


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", [False, True])
def test_offloading_frees_gpu_memory_and_keeps_the_gradients(tiny_model_dir: Path, checkpointing: bool) -> None:
    spec = {"gradient_checkpointing": checkpointing, "gradient_checkpointing_kwargs": {"use_reentrant": True}}
    module = load(tiny_model_dir, **spec).cuda()
    input_ids = torch.randint(0, 1000, (8, 512), generator=torch.Generator().manual_seed(0)).cuda()
    runs = {}
    for enabled in (False, True):
        choice = offload.decide_activation_offloading(enabled, device_type="cuda")
        module.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        with choice.context():
            loss = module(input_ids=input_ids, labels=input_ids).loss
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - start  # what the graph keeps on the GPU for the backward
        loss.backward()
        runs[enabled] = held, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    (held_plain, grads_plain), (held_offloaded, grads_offloaded) = runs[False], runs[True]
    assert held_offloaded < held_plain / 2, (held_offloaded, held_plain)
    assert sorted(grads_offloaded) == sorted(grads_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_offloaded[name], grad, msg=name)


# --- end to end -------------------------------------------------------------------------------------------------

def test_a_bundle_with_these_options_trains_what_it_should(tmp_path: Path,
                                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    model_dir = build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-model")
    root = workspace(tmp_path, model_dir)
    unfrozen = ["model.layers.1.", "lm_head"]
    config = write_config(root, max_steps=12, adam_beta2=0.95, adam_epsilon=1e-7, gradient_checkpointing=True,
                          activation_offloading=True, unfrozen_parameters=unfrozen)
    launch(compile_bundle(config))
    out = root / "out"
    decisions = next(record["runtime_decisions"] for record in metrics(out) if "runtime_decisions" in record)
    assert "optimizer" not in decisions  # adamw_torch runs everywhere: nothing to decide, nothing recorded
    assert decisions["activation_offloading"] is False and "cpu" in decisions["activation_offloading_fallback"]
    losses = train_losses(out)
    assert losses[-1] < losses[0]
    original, trained = safetensors(model_dir / "model.safetensors"), safetensors(out / "model.safetensors")
    assert sorted(trained) == sorted(original)
    moved = {name for name in original if not torch.equal(original[name], trained[name])}
    assert moved == {name for name in original if name.startswith(("model.layers.1.", "lm_head."))}


@pytest.mark.gpu
def test_on_a_gpu_the_trainer_offloads_and_steps_torchao_and_resumes_its_state(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Through a bundle on one GPU: activations offloaded, torchao's 8-bit AdamW, reentrant checkpointing
    behind frozen embeddings; a crash after step 6 resumes from checkpoint-4 with the 8-bit optimizer state."""
    require_module("torchao", "pip install 'tunefile[torchao]'")
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA; deselect them with -m 'not gpu'")
    model_dir = build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-model")
    root = workspace(tmp_path, model_dir)
    config = write_config(root, max_steps=12, save_steps=4, auto_resume_from_checkpoints=True, bf16=True,
                          optimizer="adamw_torch_8bit",
                          gradient_checkpointing=True, activation_offloading=True,
                          unfrozen_parameters=["model.layers.", "lm_head"])
    bundle = compile_bundle(config, target="h100-80gb", gpus_per_node=1)
    crashed = launch(bundle, env={"TUNEFILE_FAULT_AFTER_STEP": "6"}, check=False)
    assert crashed.returncode != 0 and "step 6/12" in crashed.stdout, crashed.stderr[-4000:]
    resumed = launch(bundle)
    assert re.search(r"resumed from \S*checkpoint-4 at step 4", resumed.stdout + resumed.stderr)
    out = root / "out"
    decisions = [record["runtime_decisions"] for record in metrics(out) if "runtime_decisions" in record]
    assert decisions and all(d["activation_offloading"] is True and d["activation_offloading_fallback"] is None
                             and d["optimizer"] == "adamw_torch_8bit" for d in decisions)
    records = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[-1]["loss"] < records[0]["loss"]
