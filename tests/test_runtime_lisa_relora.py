"""LISA (runtime/lisa.py) and ReLoRA (runtime/relora.py) in the runtime, unit by unit: which layers train and
when, the restart's merge, re-initialisation, optimizer pruning, learning-rate scale, checkpoint replay and the
merged output. Plans are built directly (LisaPlan / ReloraPlan on a compiled model section); the trainer's
accelerator is replaced by a stand-in that records what is asked of it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from plan_factory import make_plan
from tunefile.compiler.render.config_yaml import build_run_plan
from tunefile.runtime import lisa, relora
from tunefile.runtime.model import load_model
from tunefile.runtime.optim import build_optimizer, build_scheduler
from tunefile.schemas.run_plan import LisaPlan, ModelPlan, OptimizerPlan, ReloraPlan, SchedulePlan

SEED = 7


class StandInAccelerator:
    """What LayerSampler and ReloraRestarts use of accelerate's Accelerator, for one process."""

    is_main_process = True

    def __init__(self, strategy: str = "NO") -> None:
        self.distributed_type = SimpleNamespace(value=strategy)
        self.ddp_handler = None
        self.registered: list[Any] = []

    def register_for_checkpointing(self, obj: Any) -> None:
        self.registered.append(obj)

    def unwrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def wait_for_everyone(self) -> None: ...


def compiled_model(model_dir: Path, **spec: Any) -> ModelPlan:
    """The compiler's model section for ``spec`` on the tiny model, in fp32 (the CPU's precision)."""
    plan = build_run_plan(make_plan("single", spec={"adapter": None, **spec}))
    return replace(plan.model, base_model=str(model_dir), tokenizer=str(model_dir), precision="fp32",
                   architecture=None, parameters=None)


def optimizer_plan(**changes: Any) -> OptimizerPlan:
    plan = build_run_plan(make_plan("single", spec={"optimizer": "adamw_torch"})).optimizer
    return replace(plan, learning_rate=1e-2, **changes)


def schedule_plan(**changes: Any) -> SchedulePlan:
    return replace(build_run_plan(make_plan("single")).schedule, **changes)


def tiny_vocabulary(model_dir: Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).vocab_size


# --- LISA ---------------------------------------------------------------------------------------------------

def six_layer_model(**config: Any) -> torch.nn.Module:
    """A Llama of six layers (the tiny model has two), so that a draw has something to choose from."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                                        num_attention_heads=2, num_key_value_heads=1, **config))


def lisa_model_plan(*, n_layers: int = 2, step_interval: int = 5, **spec: Any) -> ModelPlan:
    """A full fine-tune's model section with LISA (these tests build their models themselves)."""
    return replace(compiled_model(Path("unused"), **spec),
                   lisa=LisaPlan(n_layers=n_layers, step_interval=step_interval, layers_attribute="model.layers"))


def training_layers(model: torch.nn.Module) -> list[int]:
    """The layers whose parameters all train; a layer with only some of them training fails the test."""
    active = []
    for index, layer in enumerate(model.model.layers):
        flags = {p.requires_grad for p in layer.parameters()}
        assert len(flags) == 1, f"layer {index} is partly frozen"
        if flags == {True}:
            active.append(index)
    return active


def test_a_switch_trains_exactly_n_layers_and_everything_outside_the_layers() -> None:
    model = six_layer_model()
    sampler = lisa.LayerSampler(lisa_model_plan(n_layers=2), seed=SEED)
    for steps_done in (0, 5, 10, 15):
        sampler.at_step(model, steps_done)
        assert training_layers(model) == list(sampler.active) and len(sampler.active) == 2
        # As Axolotl's callback: only the layer list is touched; embeddings, final norm and head keep training.
        outside = [name for name, p in model.named_parameters() if not name.startswith("model.layers.")]
        assert outside and all(dict(model.named_parameters())[name].requires_grad for name in outside)
    assert sampler.record() == {"lisa_active_layers": list(sampler.active)}


def test_the_draw_is_a_function_of_the_seed_and_the_window_so_a_resumed_run_draws_the_same() -> None:
    plan = lisa_model_plan(n_layers=2, step_interval=5)
    model = six_layer_model()
    sampler = lisa.LayerSampler(plan, seed=SEED)
    seen = []
    for steps_done in range(20):
        sampler.at_step(model, steps_done)
        expected = lisa.draw_layers(seed=SEED, window=steps_done // 5, total_layers=6, n_layers=2)
        assert sampler.active == expected and training_layers(model) == list(expected)
        seen.append(sampler.active)
    assert len({seen[i] for i in range(0, 20, 5)}) > 1  # the layers do change between windows
    # A resumed run: a fresh model and sampler at step 12 train what the unbroken run trained at step 12.
    resumed_model, resumed = six_layer_model(), lisa.LayerSampler(plan, seed=SEED)
    resumed.at_step(resumed_model, 12)
    assert resumed.active == seen[12] and training_layers(resumed_model) == list(seen[12])
    # Another seed, other draws.
    other = [lisa.draw_layers(seed=SEED + 1, window=w, total_layers=6, n_layers=2) for w in range(8)]
    assert other != [lisa.draw_layers(seed=SEED, window=w, total_layers=6, n_layers=2) for w in range(8)]


def test_the_optimizer_built_once_updates_the_active_layers_only() -> None:
    """Built over every parameter before the first freeze; a frozen layer gets no gradient, so AdamW leaves it
    alone (no weight decay either), and switching layers needs no new optimizer."""
    model = six_layer_model()
    optimizer = build_optimizer(model, optimizer_plan(weight_decay=0.1), device_type="cpu")
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == \
        sum(p.numel() for p in model.parameters())
    sampler = lisa.LayerSampler(lisa_model_plan(n_layers=2, step_interval=2), seed=SEED)
    inputs = torch.randint(0, 64, (2, 8))
    for steps_done in range(6):
        sampler.at_step(model, steps_done)
        before = [[p.detach().clone() for p in layer.parameters()] for layer in model.model.layers]
        head_before = model.lm_head.weight.detach().clone()
        model(input_ids=inputs, labels=inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for index, layer in enumerate(model.model.layers):
            changed = any(not torch.equal(old, new) for old, new in zip(before[index], layer.parameters(), strict=True))
            assert changed == (index in sampler.active), (steps_done, index, sampler.active)
        assert not torch.equal(head_before, model.lm_head.weight)


def test_lisa_keeps_parameters_the_plan_froze_frozen() -> None:
    """A drawn layer trains the parameters that trained when LISA took over (the ones in the optimizer)."""
    model = six_layer_model()
    for layer in model.model.layers:
        layer.input_layernorm.weight.requires_grad_(False)  # as unfrozen_parameters might leave them
    sampler = lisa.LayerSampler(lisa_model_plan(n_layers=3), seed=SEED)
    for steps_done in (0, 5):
        sampler.at_step(model, steps_done)
        for index, layer in enumerate(model.model.layers):
            assert not layer.input_layernorm.weight.requires_grad
            assert layer.self_attn.q_proj.weight.requires_grad == (index in sampler.active)


@pytest.mark.parametrize(("changes", "message"), [
    ({"layers_attribute": "model.blocks"}, "has no such attribute"),
    ({"layers_attribute": "model.norm"}, "not a list of layers"),
    ({"n_layers": 7}, "has only 6 layers"),
])
def test_a_layer_path_or_count_the_model_does_not_have_is_an_error(changes: dict[str, Any],
                                                                    message: str) -> None:
    plan = lisa_model_plan()
    plan = replace(plan, lisa=replace(plan.lisa, **changes))
    with pytest.raises(lisa.LisaError, match=message):
        lisa.LayerSampler(plan, seed=SEED).at_step(six_layer_model(), 0)


@pytest.mark.parametrize("strategy", ["FSDP", "DEEPSPEED"])
def test_lisa_is_refused_where_the_wrapper_fixes_the_trainable_parameters(strategy: str) -> None:
    with pytest.raises(lisa.LisaError, match=strategy):
        lisa.LayerSampler(lisa_model_plan(), seed=SEED).before_wrapping(
            StandInAccelerator(strategy), six_layer_model())


def test_lisa_is_refused_with_an_adapter() -> None:
    plan = replace(lisa_model_plan(), adapter="lora")
    with pytest.raises(lisa.LisaError, match="adapter"):
        lisa.LayerSampler(plan, seed=SEED).before_wrapping(StandInAccelerator(), six_layer_model())


def test_under_ddp_frozen_layers_may_sit_out_and_checkpointing_is_made_non_reentrant() -> None:
    """DDP needs its unused-parameter search for the frozen layers, which reentrant checkpointing breaks ("mark a
    variable ready only once"): the layers are checkpointed without reentrancy, and the decision recorded."""
    plan = lisa_model_plan(gradient_checkpointing=True)
    assert plan.gradient_checkpointing_kwargs.get("use_reentrant") is True  # Axolotl's default, as compiled
    model = six_layer_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(plan.gradient_checkpointing_kwargs))
    accelerator = StandInAccelerator("MULTI_CPU")
    sampler = lisa.LayerSampler(plan, seed=SEED)
    sampler.before_wrapping(accelerator, model)
    assert accelerator.ddp_handler.find_unused_parameters
    assert all(layer._gradient_checkpointing_func.keywords["use_reentrant"] is False for layer in model.model.layers)
    assert "use_reentrant: false" in sampler.decisions()["lisa_gradient_checkpointing"]
    # One process: nothing to change.
    single, untouched = lisa.LayerSampler(plan, seed=SEED), six_layer_model()
    single.before_wrapping(StandInAccelerator("NO"), untouched)
    assert single.decisions() == {} and lisa.LayerSampler(replace(plan, lisa=None), seed=SEED).record() == {}


# --- ReLoRA -------------------------------------------------------------------------------------------------

def relora_plan(**changes: Any) -> ReloraPlan:
    values = {"restart_steps": 5, "warmup_steps": 2, "anneal_steps": 1, "min_lr_scale": 0.001, "prune_ratio": 0.9,
              "prune_method": "magnitude", "cpu_offload": False} | changes
    return ReloraPlan(**values)


def lora_model(model_dir: Path, **relora_changes: Any) -> tuple[ModelPlan, torch.nn.Module]:
    """The tiny model with a LoRA adapter on every linear layer, fp32, in eval mode (no dropout), its B matrices
    made non-zero so that the adapter changes the output."""
    plan = replace(compiled_model(model_dir, adapter="lora", lora_target_linear=True, lora_r=4, lora_alpha=8),
                   relora=relora_plan(**relora_changes))
    torch.manual_seed(0)
    model = load_model(plan, attn_implementation="sdpa", vocab_size=tiny_vocabulary(model_dir))
    model.eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return plan, model


def attached(plan: ModelPlan, model: torch.nn.Module) -> relora.ReloraRestarts:
    restarts = relora.ReloraRestarts(plan, seed=SEED)
    accelerator = StandInAccelerator()
    restarts.before_wrapping(accelerator)
    restarts.attach(model, build_optimizer(model, optimizer_plan(), device_type="cpu"), accelerator)
    assert accelerator.registered == [restarts]  # checkpointed with every save
    return restarts


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(3, 40).reshape(1, -1)).logits


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" not in name}


def test_a_restart_merges_the_update_and_keeps_the_models_function(tiny_model_dir: Path) -> None:
    plan, model = lora_model(tiny_model_dir)
    restarts = attached(plan, model)
    before, weights = logits(model), base_weights(model)
    layer = restarts.layers["model.layers.0.self_attn.q_proj"]
    a, b = (f.detach().clone() for f in relora.factors(layer))
    restarts.restart()
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)
    # The base absorbed B·A·scaling; the new adapter is peft's initialisation: A redrawn, B zero.
    merged = layer.get_base_layer().weight
    torch.testing.assert_close(merged, weights["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
                               + (b @ a) * layer.scaling["default"], rtol=0, atol=1e-7)
    new_a, new_b = relora.factors(layer)
    assert not torch.equal(new_a, a) and torch.count_nonzero(new_b) == 0
    bound = 1 / a.shape[1] ** 0.5  # Kaiming-uniform with a=√5: U(-1/√fan_in, 1/√fan_in)
    assert new_a.abs().max() <= bound and new_a.std() > bound / 3
    assert restarts.restarts == 1 and restarts.record() == {"relora_restarts": 1}


def test_the_merge_on_the_cpu_gives_the_same_weights(tiny_model_dir: Path) -> None:
    plan, model = lora_model(tiny_model_dir)
    offloaded_plan, offloaded = lora_model(tiny_model_dir, cpu_offload=True)
    attached(plan, model).restart()
    attached(offloaded_plan, offloaded).restart()
    for (name, weight), other in zip(base_weights(model).items(), base_weights(offloaded).values(), strict=True):
        assert torch.equal(weight, other), name


def test_restarts_happen_after_each_multiple_of_restart_steps_but_not_after_the_last(tiny_model_dir: Path) -> None:
    plan, model = lora_model(tiny_model_dir, restart_steps=5)
    restarts = attached(plan, model)
    done = [step for step in range(1, 16) if restarts.after_step(step, total_steps=15)]
    assert done == [5, 10] and restarts.restarts == 2


def test_the_reinitialisation_is_seeded(tiny_model_dir: Path) -> None:
    """Every rank and every resumed run draws the same fresh adapter, whatever the global generators did."""
    drawn = []
    for seed in (SEED, SEED, SEED + 1):
        plan, model = lora_model(tiny_model_dir)
        restarts = relora.ReloraRestarts(plan, seed=seed)
        restarts.attach(model, build_optimizer(model, optimizer_plan(), device_type="cpu"), StandInAccelerator())
        torch.manual_seed(seed * 1000)  # a different global state each time
        restarts.restart()
        drawn.append(relora.factors(restarts.layers["model.layers.1.mlp.down_proj"])[0].detach().clone())
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])


def test_a_resumed_run_replays_the_restarts_bit_for_bit(tiny_model_dir: Path, tmp_path: Path) -> None:
    plan, model = lora_model(tiny_model_dir)
    restarts = attached(plan, model)
    for _ in range(2):
        restarts.restart()
        with torch.no_grad():  # stands in for the training between restarts
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.05)
    torch.save(restarts.state_dict(), tmp_path / "custom_checkpoint_0.pkl")  # as accelerate's save_state does
    trained_adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    fresh_plan, fresh = lora_model(tiny_model_dir)
    with torch.no_grad():  # accelerate's load_state loads the adapter before the custom objects
        for name, param in fresh.named_parameters():
            if "lora_" in name:
                param.copy_(trained_adapter[name])
    resumed = attached(fresh_plan, fresh)
    resumed.load_state_dict(torch.load(tmp_path / "custom_checkpoint_0.pkl", weights_only=False))
    assert resumed.restarts == 2
    for (name, weight), other in zip(base_weights(model).items(), base_weights(fresh).values(), strict=True):
        assert torch.equal(weight, other), name
    for name, param in fresh.named_parameters():  # the replay left the checkpoint's adapter in place
        if "lora_" in name:
            assert torch.equal(param, trained_adapter[name]), name
    assert torch.equal(logits(fresh), logits(model))


def test_a_checkpoint_of_another_adapter_is_refused(tiny_model_dir: Path) -> None:
    plan, model = lora_model(tiny_model_dir)
    restarts = attached(plan, model)
    restarts.restart()
    state = restarts.state_dict()
    state["factors"][0] = {key.replace("q_proj", "qq_proj"): value for key, value in state["factors"][0].items()}
    with pytest.raises(relora.ReloraError, match="another adapter config"):
        attached(*lora_model(tiny_model_dir)).load_state_dict(state)


def test_the_saved_output_is_the_merged_model(tiny_model_dir: Path, tmp_path: Path, tiny_tokenizer: Any) -> None:
    """As Axolotl's: no adapter, the whole model with every restart's update and the last adapter merged; it
    loads with plain transformers and computes what the adapter model computed."""
    from transformers import AutoModelForCausalLM

    plan, model = lora_model(tiny_model_dir)
    restarts = attached(plan, model)
    restarts.restart()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    expected = logits(model)
    restarts.save_merged_model(StandInAccelerator(), model, tiny_tokenizer, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(saved), expected, rtol=0, atol=1e-5)


def test_the_restart_scale_is_axolotls_jagged_formula() -> None:
    """JaggedLRRestartScheduler: 1 through the first cycle up to restart − anneal; then per cycle a warm-up from the
    floor over warmup steps and a decay to the floor over the last anneal steps."""
    scale = relora.jagged_multiplier(relora_plan(restart_steps=10, warmup_steps=3, anneal_steps=4, min_lr_scale=0.01))
    floor = 0.01

    def between(t: float) -> float:
        return t * (1 - floor) + floor

    expected = {0: 1.0, 5: 1.0, 6: between(1.0), 7: between(3 / 4), 9: between(1 / 4), 10: floor,
                11: between(1 / 3), 12: between(2 / 3), 13: 1.0, 16: 1.0, 17: between(3 / 4), 20: floor}
    assert {step: scale(step) for step in expected} == pytest.approx(expected)
    # Axolotl's default anneal of 1 anneals nothing; a warm-up longer than a cycle reaches into the first one.
    assert [relora.jagged_multiplier(relora_plan(restart_steps=5, warmup_steps=10, anneal_steps=1,
                                                 min_lr_scale=0.0))(s) for s in (3, 4, 5, 9)] == \
        pytest.approx([1.0, 0.4, 0.0, 0.4])


def test_the_jagged_schedule_multiplies_the_plans_own(tiny_model_dir: Path) -> None:
    schedule = schedule_plan(lr_scheduler="cosine", warmup_steps=3, warmup_ratio=None, min_lr_ratio=0.1)
    plan = relora_plan(restart_steps=6, warmup_steps=2, anneal_steps=2)
    optimizers = [torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0) for _ in range(2)]
    jagged = relora.build_jagged_scheduler(optimizers[0], schedule, plan, total_steps=20)
    plain = build_scheduler(optimizers[1], schedule, total_steps=20)
    scale = relora.jagged_multiplier(plan)
    for step in range(20):
        assert jagged.get_last_lr()[0] == pytest.approx(plain.get_last_lr()[0] * scale(step)), step
        for optimizer, scheduler in zip(optimizers, (jagged, plain), strict=True):
            optimizer.step()  # no gradients: nothing moves, but the schedulers see the order they expect
            scheduler.step()


def test_magnitude_pruning_zeroes_the_smallest_entries() -> None:
    tensor = torch.randn(40, 25, generator=torch.Generator().manual_seed(0))
    original = tensor.clone()
    relora.prune_by_magnitude_(tensor, 0.9)
    assert int((tensor == 0).sum()) == 900
    kept = tensor != 0
    assert original.abs()[kept].min() > original.abs()[~kept].max()
    assert torch.equal(tensor[kept], original[kept])


@pytest.mark.parametrize("ratio", [0.5, 0.9, 0.999])
def test_random_pruning_zeroes_the_expected_share(ratio: float) -> None:
    tensor = torch.rand(100_000) + 0.5  # no zeros to begin with
    relora.prune_at_random_(tensor, ratio, torch.Generator().manual_seed(1))
    assert float((tensor == 0).float().mean()) == pytest.approx(ratio, abs=0.005)


@pytest.mark.parametrize("method", ["magnitude", "random", "reset"])
def test_a_restart_prunes_the_adapters_optimizer_state(tiny_model_dir: Path, method: str) -> None:
    ratio = 0.999 if method == "reset" else 0.9
    plan, model = lora_model(tiny_model_dir, prune_method=method, prune_ratio=ratio)
    model.train()
    restarts = attached(plan, model)
    inputs = torch.arange(3, 40).reshape(1, -1)
    model(input_ids=inputs, labels=inputs).loss.backward()
    restarts.optimizer.step()
    params = [p for layer in restarts.layers.values() for p in relora.factors(layer)]
    steps = [restarts.optimizer.state[p]["step"].clone() for p in params]
    restarts.restart()
    moments = torch.cat([restarts.optimizer.state[p][key].flatten() for p in params
                         for key in ("exp_avg", "exp_avg_sq")])
    # Per tensor round(ratio·n) for magnitude, a random ratio share otherwise (entries that were 0 stay 0).
    assert float((moments == 0).float().mean()) == pytest.approx(ratio, abs=0.01)
    assert all(torch.equal(restarts.optimizer.state[p]["step"], s) for p, s in zip(params, steps, strict=True))


@pytest.mark.parametrize("strategy", ["FSDP", "DEEPSPEED"])
def test_relora_is_refused_where_the_base_is_sharded(tiny_model_dir: Path, strategy: str) -> None:
    plan = replace(compiled_model(tiny_model_dir, adapter="lora"), relora=relora_plan())
    with pytest.raises(relora.ReloraError, match=strategy):
        relora.ReloraRestarts(plan, seed=SEED).before_wrapping(StandInAccelerator(strategy))


def test_relora_merges_linear_layers_only(tiny_model_dir: Path) -> None:
    plan = replace(compiled_model(tiny_model_dir, adapter="lora", lora_target_linear=False,
                                  lora_target_modules=["q_proj", "embed_tokens"]),
                   relora=relora_plan())
    model = load_model(plan, attn_implementation="sdpa", vocab_size=tiny_vocabulary(tiny_model_dir))
    with pytest.raises(relora.ReloraError, match="embed_tokens"):
        relora.adapter_layers(model)


def test_8bit_optimizer_states_are_said_to_be_kept(tiny_model_dir: Path) -> None:
    restarts = relora.ReloraRestarts(replace(compiled_model(tiny_model_dir, adapter="lora"), relora=relora_plan()),
                                     seed=SEED)
    assert "relora_pruning" in restarts.decisions("adamw_8bit") and restarts.decisions("adamw_torch") == {}


# --- ReLoRA on a quantised base ------------------------------------------------------------------------------
# bitsandbytes needs CUDA, so these tests stand a coarse rounding in for the 4-bit quantisation: the decoder's
# linear layers count as quantised (as bitsandbytes leaves the head alone), and "requantising" rounds the master
# onto a grid. What they check is the part of the quantised path that is tunefile's: the full-precision master,
# its replay and the merged output; the bitsandbytes calls themselves (relora.requantize) are peft's merge code.

GRID = 2.0 ** -4


def grid(weight: torch.Tensor) -> torch.Tensor:
    return torch.round(weight.float() / GRID) * GRID


@pytest.fixture
def coarse_quantisation(monkeypatch: pytest.MonkeyPatch) -> None:
    def is_quantized_module(module: torch.nn.Module) -> bool:
        return getattr(module, "stands_for_4bit", False)

    def requantize(layer: Any, weight: torch.Tensor) -> None:
        layer.get_base_layer().weight.data.copy_(grid(weight))

    monkeypatch.setattr(relora, "is_quantized_module", is_quantized_module)
    monkeypatch.setattr(relora, "requantize", requantize)


def quantised_lora_model(model_dir: Path) -> tuple[ModelPlan, torch.nn.Module, dict[str, torch.Tensor]]:
    """LoRA on q_proj and v_proj of a base whose linear layers are "quantised"; also the base's own weights."""
    plan = replace(compiled_model(model_dir, adapter="lora", lora_target_linear=False,
                                  lora_target_modules=["q_proj", "v_proj"], lora_r=4, lora_alpha=8),
                   relora=relora_plan())
    torch.manual_seed(0)
    model = load_model(plan, attn_implementation="sdpa", vocab_size=tiny_vocabulary(model_dir)).eval()
    originals = {}
    with torch.no_grad():
        for name, module in model.get_base_model().named_modules():
            if type(module) is torch.nn.Linear and name.startswith("model.layers.") and "lora_" not in name:
                name = name.removesuffix(".base_layer")  # a LoRA target's own linear layer
                module.stands_for_4bit = True
                originals[name] = module.weight.detach().clone()
                module.weight.copy_(grid(module.weight))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return plan, model, originals


@pytest.mark.usefixtures("coarse_quantisation")
def test_a_quantised_base_merges_into_a_full_precision_master(tiny_model_dir: Path, tmp_path: Path,
                                                              tiny_tokenizer: Any) -> None:
    """Rounded into the 4-bit grid, an update smaller than the grid step would vanish; merged into the master
    (the base's own weights in the compute dtype) it is kept, and the layer is the master quantised again."""
    from transformers import AutoModelForCausalLM

    plan, model, originals = quantised_lora_model(tiny_model_dir)
    restarts = attached(plan, model)
    assert sorted(restarts.master) == sorted(name for name in originals if name.endswith(("q_proj", "v_proj")))
    name = "model.layers.0.self_attn.q_proj"
    layer = restarts.layers[name]
    master = originals[name].to(restarts.master[name].dtype)  # the unquantised base as it was read (bf16)
    for _ in range(2):
        update = relora.update_from(*relora.factors(layer), layer, torch.device("cpu"))
        restarts.restart()
        master = master.clone().add_(update)
        assert torch.equal(restarts.master[name], master)
        assert torch.equal(layer.get_base_layer().weight, grid(master))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(std=0.05)

    # Resumed: the replay rebuilds master and quantised layers from the checkpoint's factors.
    state = restarts.state_dict()
    fresh_plan, fresh, _ = quantised_lora_model(tiny_model_dir)
    resumed = attached(fresh_plan, fresh)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.master[n], restarts.master[n]) for n in restarts.master)
    assert torch.equal(resumed.layers[name].get_base_layer().weight, layer.get_base_layer().weight)

    # The output: targets = master + the last update; other quantised layers = the base's own weights; what
    # training kept unquantised (embeddings, norms, head) as trained.
    last = relora.update_from(*relora.factors(layer), layer, torch.device("cpu"))
    with torch.no_grad():
        model.get_base_model().model.norm.weight.add_(0.5)  # as if training had changed it
    restarts.save_merged_model(StandInAccelerator(), model, tiny_tokenizer, tmp_path)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(saved.get_submodule(name).weight, (master.clone().add_(last)).float())
    k_proj = "model.layers.0.self_attn.k_proj"
    assert torch.equal(saved.get_submodule(k_proj).weight, originals[k_proj].to(master.dtype).float())
    assert torch.equal(saved.model.norm.weight, model.get_base_model().model.norm.weight.to(master.dtype).float())

