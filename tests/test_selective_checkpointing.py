"""gradient_checkpointing_every_n_layers: checkpoint decoder layers 0, n, 2n, … and let the others keep their
activations (issue 13: memory bought back for speed where full checkpointing frees more than the run needs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from compile_helpers import plan_of

from helpers import write
from tunefile.compiler.pipeline import TargetOptions, compile_config

CONFIG = """\
base_model: meta-llama/Llama-3.1-8B
datasets: [{path: data.jsonl, type: alpaca}]
adapter: lora
lora_target_linear: true
sequence_len: 4096
micro_batch_size: 1
"""
H200 = TargetOptions(gpu="h200")


def memory(tmp_path: Path, extra: str) -> float:
    compilation = compile_config(write(tmp_path / "cfg.yml", CONFIG + extra), H200)
    return compilation.plan.memory.activations


def test_the_run_plan_carries_the_choice(tmp_path: Path) -> None:
    model = plan_of(tmp_path, CONFIG + "gradient_checkpointing: true\ngradient_checkpointing_every_n_layers: 2\n")
    assert model["model"]["gradient_checkpointing"] is True
    assert model["model"]["gradient_checkpointing_every_n_layers"] == 2
    assert plan_of(tmp_path, CONFIG)["model"]["gradient_checkpointing_every_n_layers"] == 1


def test_the_memory_estimate_lies_between_none_and_every_layer(tmp_path: Path) -> None:
    none = memory(tmp_path, "")
    every = memory(tmp_path, "gradient_checkpointing: true\n")
    half = memory(tmp_path, "gradient_checkpointing: true\ngradient_checkpointing_every_n_layers: 2\n")
    assert every < half < none
    # In units of a = h·tokens bytes, 32 layers: none = 32·34a, every layer = 32·2a + 34a (one layer recomputed),
    # every 2nd = 16·2a + 16·34a + 34a; the logits are the same in all three. Rounding: 0.01 GiB.
    a = (none - every) / (32 * 34 - 32 * 2 - 34)
    assert half - every == pytest.approx(16 * (34 - 2) * a, abs=0.03)


def test_without_gradient_checkpointing_it_is_named_as_no_effect(tmp_path: Path) -> None:
    compilation = compile_config(write(tmp_path / "cfg.yml", CONFIG + "gradient_checkpointing_every_n_layers: 2\n"),
                                 H200)
    messages = [w.message for w in compilation.plan.warnings]
    assert any("no effect without gradient_checkpointing" in m for m in messages), messages


@pytest.mark.parametrize("value", [0, 1025, "2"])
def test_out_of_range_values_are_refused(tmp_path: Path, value: object) -> None:
    from compile_helpers import problems_of

    lines = problems_of(CONFIG + f"gradient_checkpointing: true\ngradient_checkpointing_every_n_layers: {value!r}\n"
                        .replace("'", '"'))
    assert any("gradient_checkpointing_every_n_layers" in line for line in lines), lines


# --- the runtime: which layers recompute, and the gradients are those of plain training ----------------------


def tiny_llama(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).train()


def gradients(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("every_n, expected", [(1, [True] * 5), (2, [True, False, True, False, True]),
                                               (3, [True, False, False, True, False]), (8, [True] + [False] * 4)])
def test_layers_0_n_2n_recompute_and_the_gradients_equal_plain_training(every_n: int, expected: list[bool]) -> None:
    from tunefile.runtime.model import enable_gradient_checkpointing

    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    plain = gradients(tiny_llama(5), ids)
    model = tiny_llama(5)
    recomputed: list[int] = []
    for index, layer in enumerate(model.model.layers):  # count forwards: a checkpointed layer's MLP runs twice
        layer.mlp.register_forward_pre_hook(lambda *_args, index=index: recomputed.append(index))
    enable_gradient_checkpointing(model, {"use_reentrant": False}, frozen_inputs=False, every_n_layers=every_n)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == expected
    selective = gradients(model, ids)
    twice = sorted({index for index in recomputed if recomputed.count(index) == 2})
    assert twice == [index for index, on in enumerate(expected) if on]
    assert selective.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(selective[name], grad, rtol=1e-5, atol=1e-6, msg=name)


# --- gradient_checkpointing: auto ---------------------------------------------------------------------------


def auto(tmp_path: Path, gpu: str | None) -> tuple[dict, list[str]]:
    compilation = compile_config(write(tmp_path / "cfg.yml", CONFIG + "gradient_checkpointing: auto\n"),
                                 TargetOptions(gpu=gpu))
    plan = compilation.plan
    chosen = [f"{d.value} because {d.reason}" for d in plan.decisions if d.topic == "gradient checkpointing"]
    model = yaml.safe_load(compilation.files["config.yaml"])["model"]
    return model, chosen


@pytest.mark.parametrize("gpu, on, every_n, words, fits", [
    ("h200", False, 1, "off (auto) because the run fits without it", True),
    ("a100-40gb", True, 2, "every 2nd layer (auto) because without it ~", True),
    ("l4", True, 1, "every layer (auto) because even with every layer recomputed ~", False),
])
def test_auto_takes_the_least_checkpointing_that_fits(tmp_path: Path, gpu: str, on: bool, every_n: int,
                                                      words: str, fits: bool) -> None:
    model, chosen = auto(tmp_path, gpu)
    assert model["gradient_checkpointing"] is on and model["gradient_checkpointing_every_n_layers"] == every_n
    assert len(chosen) == 1 and chosen[0].startswith(words), chosen
    compilation = compile_config(write(tmp_path / "cfg.yml", CONFIG + "gradient_checkpointing: auto\n"),
                                 TargetOptions(gpu=gpu))
    assert compilation.plan.memory.fits is fits  # within 90 % of the GPU, or the closest it gets
    if on and every_n > 1:  # the next denser candidate would also fit, but recompute more: not chosen
        assert model["gradient_checkpointing_every_n_layers"] == max(
            n for n in (16, 8, 4, 3, 2, 1) if memory_with(tmp_path, gpu, n).fits)


def memory_with(tmp_path: Path, gpu: str, every_n: int) -> object:
    text = CONFIG + f"gradient_checkpointing: true\ngradient_checkpointing_every_n_layers: {every_n}\n"
    return compile_config(write(tmp_path / "n.yml", text), TargetOptions(gpu=gpu)).plan.memory


def test_auto_needs_an_estimate_to_fit(tmp_path: Path) -> None:
    model, chosen = auto(tmp_path, None)
    assert model["gradient_checkpointing"] is False
    assert chosen == ["off (auto) because no memory estimate (GPU memory or model size unknown): none, as without "
                      "auto"]
