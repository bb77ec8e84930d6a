"""The optimizer options of an Axolotl config in the runtime (tunefile.runtime.optim): adam_beta1/adam_beta2/
adam_epsilon reach every AdamW, torchao's low-bit AdamW (adamw_torch_8bit / adamw_torch_4bit) trains, and a machine
without torchao falls back to AdamW and says so. The plans come from the real compiler (plan_factory)."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch

from helpers import require_module
from plan_factory import make_plan
from tunefile.compiler.render.config_yaml import build_run_plan
from tunefile.runtime import optim
from tunefile.schemas.run_plan import OptimizerPlan, RunPlan

ADAM = {"adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6}  # none of them AdamW's own defaults


def run_plan(**spec: object) -> RunPlan:
    return build_run_plan(make_plan("single", spec=spec))


def optimizer_plan(name: str, **spec: object) -> OptimizerPlan:
    return run_plan(optimizer=name, **ADAM, **spec).optimizer


def two_layer_net(seed: int = 0) -> torch.nn.Module:
    """Weights of 64 × 64 = 4096 values, the smallest torchao quantises (block-wise) instead of keeping in fp32;
    one shape, so torchao's torch.compile'd step compiles once."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), torch.nn.Tanh(),
                               torch.nn.Linear(64, 64, bias=False))


def regression_losses(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, steps: int = 5,
                      device: str = "cpu") -> list[float]:
    generator = torch.Generator().manual_seed(1)
    inputs, targets = (torch.randn(32, 64, generator=generator).to(device) for _ in range(2))
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def assert_adam_constants(optimizer: torch.optim.Optimizer, plan: OptimizerPlan) -> None:
    for group in optimizer.param_groups:
        assert tuple(group["betas"]) == (plan.adam_beta1, plan.adam_beta2)
        assert group["eps"] == plan.adam_epsilon


# --- betas and epsilon ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["adamw_torch", "adamw_torch_fused"])
def test_the_configs_betas_and_epsilon_reach_torch_adamw(name: str) -> None:
    plan = optimizer_plan(name)
    assert (plan.adam_beta1, plan.adam_beta2, plan.adam_epsilon) == (0.8, 0.95, 1e-6)  # the compiler kept them
    optimizer = optim.build_optimizer(two_layer_net(), plan, device_type="cpu")
    assert isinstance(optimizer, torch.optim.AdamW)
    assert_adam_constants(optimizer, plan)


def test_without_adam_keys_the_plan_carries_adamws_defaults() -> None:
    plan = run_plan(optimizer="adamw_torch").optimizer
    optimizer = optim.build_optimizer(two_layer_net(), plan, device_type="cpu")
    reference = torch.optim.AdamW(two_layer_net().parameters())
    assert optimizer.param_groups[0]["betas"] == reference.defaults["betas"]
    assert optimizer.param_groups[0]["eps"] == reference.defaults["eps"]


# --- torchao's low-bit AdamW ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "state_class"), [("adamw_torch_8bit", "OptimState8bit"),
                                                   ("adamw_torch_4bit", "OptimState4bit")])
def test_torchao_low_bit_adamw_trains_with_quantised_state(name: str, state_class: str) -> None:
    require_module("torchao", "pip install 'tunefile[torchao]'")
    plan = replace(optimizer_plan(name), learning_rate=1e-2, weight_decay=0.0)
    decision = optim.decide_optimizer(name)
    assert decision == optim.OptimizerDecision(name, name, None)
    assert decision.record() == {"optimizer": name, "optimizer_fallback": None}
    model = two_layer_net()
    optimizer = optim.build_optimizer(model, plan, device_type="cpu")
    assert type(optimizer).__module__.startswith("torchao.")
    assert_adam_constants(optimizer, plan)
    losses = regression_losses(model, optimizer)
    assert losses[-1] < 0.8 * losses[0]
    state = optimizer.state[model[0].weight]
    assert type(state["exp_avg"]).__name__ == state_class  # the moments really are stored in low bits


def test_a_torchao_optimizer_follows_our_schedule() -> None:
    """torchao keeps the LR as a tensor in its param groups; the LambdaLR schedule must still drive it."""
    require_module("torchao", "pip install 'tunefile[torchao]'")
    plan = run_plan(optimizer="adamw_torch_8bit", lr_scheduler="linear", warmup_steps=0, max_steps=4)
    optimizer = optim.build_optimizer(two_layer_net(), plan.optimizer, device_type="cpu")
    scheduler = optim.build_scheduler(optimizer, plan.schedule, total_steps=4)
    for _ in range(2):
        optimizer.step()  # no gradients yet: changes nothing, but keeps the optimizer-then-schedule order
        scheduler.step()
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(plan.optimizer.learning_rate * 0.5)
    assert float(scheduler.get_last_lr()[0]) == pytest.approx(plan.optimizer.learning_rate * 0.5)


@pytest.mark.parametrize("name", ["adamw_torch_8bit", "adamw_torch_4bit"])
def test_without_torchao_the_low_bit_optimizers_fall_back_to_adamw_and_say_so(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import torchao` raise ImportError, as on a machine without it.
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.optim", None)
    decision = optim.decide_optimizer(name)
    assert decision.name == "adamw_torch_fused"
    assert decision.fallback is not None and "tunefile[torchao]" in decision.fallback and name in decision.fallback
    assert decision.record() == {"optimizer": "adamw_torch_fused", "optimizer_fallback": decision.fallback}
    plan = optimizer_plan(name)
    optimizer = optim.build_optimizer(two_layer_net(), plan, device_type="cpu")
    assert type(optimizer) is torch.optim.AdamW
    assert_adam_constants(optimizer, plan)


def test_other_optimizers_are_built_as_planned_and_need_no_record() -> None:
    for name in ("adamw_torch", "adamw_torch_fused", "paged_adamw_8bit"):
        decision = optim.decide_optimizer(name)
        assert decision == optim.OptimizerDecision(name, name, None) and decision.record() == {}


# --- on a GPU ---------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_fused_adamw_and_torchao_8bit_on_cuda() -> None:
    require_module("torchao", "pip install 'tunefile[torchao]'")
    for name in ("adamw_torch_fused", "adamw_torch_8bit"):
        plan = replace(optimizer_plan(name), learning_rate=1e-2, weight_decay=0.0)
        model = two_layer_net().cuda()
        optimizer = optim.build_optimizer(model, plan, device_type="cuda")
        assert_adam_constants(optimizer, plan)
        if name == "adamw_torch_fused":
            assert optimizer.defaults["fused"]
        losses = regression_losses(model, optimizer, device="cuda")
        assert losses[-1] < 0.8 * losses[0], name


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_adamw_gets_the_configs_betas_and_epsilon(name: str) -> None:
    require_module("bitsandbytes", "pip install 'tunefile[qlora]'")
    plan = optimizer_plan(name)
    optimizer = optim.build_optimizer(two_layer_net().cuda(), plan, device_type="cuda")
    assert type(optimizer).__module__.startswith("bitsandbytes.")
    assert_adam_constants(optimizer, plan)



@pytest.mark.parametrize("optim_args", [{"bf16_stochastic_round": True}, "bf16_stochastic_round=true"])
def test_optim_args_bf16_stochastic_round_reaches_torchao(optim_args: object) -> None:
    """Axolotl's optim_args, as a mapping or its `key=value` string, reaches torchao's low-bit AdamW."""
    require_module("torchao", "pip install 'tunefile[torchao]'")
    plan = optimizer_plan("adamw_torch_8bit", optim_args=optim_args)
    assert plan.bf16_stochastic_round is True
    built = optim.build_optimizer(two_layer_net(), plan, device_type="cpu")
    assert built.bf16_stochastic_round is True
    assert optimizer_plan("adamw_torch_8bit").bf16_stochastic_round is False
