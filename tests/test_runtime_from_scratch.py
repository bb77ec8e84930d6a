"""Axolotl's reinit_weights: the base model's architecture trained from fresh, seeded random weights."""

from __future__ import annotations

from pathlib import Path

import torch

from plan_factory import make_plan
from tunefile.compiler.render.config_yaml import build_run_plan
from tunefile.runtime.model import load_base_model


def model_plan(model_dir: Path, **spec: object):  # noqa: ANN201 - a ModelPlan
    plan = make_plan("cpu", spec={"base_model": str(model_dir), "adapter": None, **spec})
    return build_run_plan(plan).model


def test_reinit_weights_builds_the_architecture_with_fresh_weights(tiny_model_dir: Path) -> None:
    loaded = load_base_model(model_plan(tiny_model_dir), attn_implementation="sdpa")
    torch.manual_seed(1)  # the tiny model was itself built from seed 0
    fresh = load_base_model(model_plan(tiny_model_dir, reinit_weights=True), attn_implementation="sdpa")
    torch.manual_seed(1)
    again = load_base_model(model_plan(tiny_model_dir, reinit_weights=True), attn_implementation="sdpa")
    assert type(fresh) is type(loaded) and fresh.config.num_hidden_layers == loaded.config.num_hidden_layers
    names = [name for name, _ in loaded.named_parameters()]
    assert names == [name for name, _ in fresh.named_parameters()]
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(loaded.named_parameters())[weight], dict(fresh.named_parameters())[weight])
    assert torch.equal(dict(fresh.named_parameters())[weight], dict(again.named_parameters())[weight])  # seeded
