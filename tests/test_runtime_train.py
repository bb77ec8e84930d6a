"""The training loop, end to end through compiled bundles on CPU, plus the pure pieces it is built
from (schedules, cadences, data position, optimizer groups)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from runtime_bundles import (
    build_tiny_model,
    compile_bundle,
    launch,
    metrics,
    summary,
    train_losses,
    workspace,
    write_config,
)
from tunefile.runtime import optim
from tunefile.runtime.schedule import Cadence, optimizer_steps, steps_in
from tunefile.schemas.run_plan import CheckpointPlan, OptimizerPlan, SchedulePlan

# --- pure pieces ---------------------------------------------------------------------------------


def test_schedules_warm_up_then_follow_their_shape() -> None:
    cosine = optim.lr_multiplier("cosine", total_steps=110, warmup=10)
    assert cosine(0) == pytest.approx(1 / 11) and cosine(9) == pytest.approx(10 / 11)
    assert cosine(10) == pytest.approx(1.0) and cosine(60) == pytest.approx(0.5) and cosine(110) == pytest.approx(0)
    linear = optim.lr_multiplier("linear", total_steps=110, warmup=10)
    assert linear(60) == pytest.approx(0.5)
    assert optim.lr_multiplier("constant", total_steps=10, warmup=5)(0) == 1.0  # constant ignores warmup
    assert optim.lr_multiplier("constant_with_warmup", total_steps=10, warmup=4)(1) == pytest.approx(0.4)
    assert optim.warmup_steps_for(200, warmup_steps=None, warmup_ratio=0.05, warmup_max_steps=None) == 10
    assert optim.warmup_steps_for(200, warmup_steps=3, warmup_ratio=0.05, warmup_max_steps=None) == 3
    # Axolotl's rounding (down), its default cap, and one warmup step made two.
    assert optim.warmup_steps_for(210, warmup_steps=None, warmup_ratio=0.05, warmup_max_steps=None) == 10
    assert optim.warmup_steps_for(10_000, warmup_steps=None, warmup_ratio=0.03, warmup_max_steps=100) == 100
    assert optim.warmup_steps_for(50, warmup_steps=None, warmup_ratio=0.03, warmup_max_steps=100) == 2
    # cosine to a floor, reached at a fraction of the steps
    floor = optim.lr_multiplier("cosine", total_steps=100, warmup=0, min_ratio=0.1, min_from=0.5)
    assert floor(0) == pytest.approx(1.0) and floor(50) == pytest.approx(0.1) and floor(99) == pytest.approx(0.1)
    assert optim.lr_multiplier("cosine", total_steps=100, warmup=0, min_ratio=1.0)(60) == pytest.approx(1.0)
    with pytest.raises(optim.OptimizerError, match="lr_scheduler"):
        optim.lr_multiplier("polynomial", total_steps=1, warmup=0)


def test_quadratic_warmup_squares_the_linear_fraction() -> None:
    quadratic = optim.lr_multiplier("cosine", total_steps=110, warmup=10, warmup_shape="quadratic")
    assert quadratic(0) == pytest.approx((1 / 11) ** 2) and quadratic(4) == pytest.approx((5 / 11) ** 2)
    # After the warm-up it is the cosine itself.
    assert quadratic(10) == pytest.approx(1.0) and quadratic(60) == pytest.approx(0.5)
    schedule = optim.build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                                     schedule_plan(warmup_steps=4, warmup_shape="quadratic"), total_steps=40)
    assert schedule.get_last_lr()[0] == pytest.approx((1 / 5) ** 2)


def test_total_steps_from_max_steps_or_epochs() -> None:
    assert optim.total_optimizer_steps(schedule_plan(max_steps=7), steps_per_epoch=10) == 7
    assert optim.total_optimizer_steps(schedule_plan(max_steps=None, num_epochs=1.5), steps_per_epoch=10) == 15


def test_no_weight_decay_on_biases_and_norms() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = optim.param_groups(model.named_parameters(), 0.1)
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    fused = optim.build_optimizer(model, OptimizerPlan("adamw_torch_fused", 1e-3, 0.1, 1.0, 0.9, 0.999, 1e-8, False),
                                  device_type="cpu")
    assert not fused.defaults.get("fused")  # the fused kernel is CUDA-only; CPU gets the same maths unfused


def test_bitsandbytes_optimizers_fail_clearly_without_it() -> None:
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with pytest.raises(optim.OptimizerError, match="bitsandbytes"):
        optim.build_optimizer(torch.nn.Linear(2, 2),
                              OptimizerPlan("paged_adamw_8bit", 1e-3, 0.0, 1.0, 0.9, 0.999, 1e-8, False),
                              device_type="cpu")


def test_optimizer_steps_group_micro_batches_and_resume_mid_epoch() -> None:
    plans = {0: [[[i]] for i in range(5)], 1: [[[10 + i]] for i in range(5)]}
    steps = optimizer_steps(plans.__getitem__, epoch=0, micro_batch=0, accumulation=2)
    first = [next(steps) for _ in range(4)]
    assert [(e, i, len(g)) for e, i, g in first] == [(0, 0, 2), (0, 2, 2), (0, 4, 1), (1, 0, 2)]
    resumed = optimizer_steps(plans.__getitem__, epoch=0, micro_batch=2, accumulation=2)
    assert [next(resumed)[:2] for _ in range(3)] == [(0, 2), (0, 4), (1, 0)]
    assert steps_in(plans[0], 2) == 3


def schedule_plan(**changes: object) -> SchedulePlan:
    values = {"gradient_accumulation_steps": 1, "max_steps": 40, "num_epochs": None, "lr_scheduler": "cosine",
              "warmup_steps": None, "warmup_ratio": None, "warmup_max_steps": None, "warmup_shape": "linear",
              "min_lr_ratio": 0.0,
              "min_lr_from": None, "logging_steps": 1, "eval_steps": None, "evals_per_epoch": None,
              "early_stopping_patience": None}
    return SchedulePlan(**(values | changes))


def checkpoint_plan(**changes: object) -> CheckpointPlan:
    values = {"output_dir": "out", "save_steps": None, "saves_per_epoch": None, "save_total_limit": None,
              "resume_from_checkpoint": None, "auto_resume": True}
    return CheckpointPlan(**(values | changes))


def test_cadences() -> None:
    cadence = Cadence.from_plan(schedule_plan(logging_steps=5, evals_per_epoch=2), checkpoint_plan(save_steps=20),
                                steps_per_epoch=10, total_steps=40, has_eval=True)
    assert (cadence.logging_steps, cadence.eval_steps, cadence.save_steps) == (5, 5, 20)
    assert cadence.save_now(40, 40) and not cadence.save_now(30, 40)
    no_eval = Cadence.from_plan(schedule_plan(eval_steps=3), checkpoint_plan(saves_per_epoch=2), steps_per_epoch=10,
                                total_steps=40, has_eval=False)
    assert no_eval.eval_steps is None and not no_eval.eval_now(3, 40) and no_eval.save_steps == 5


# --- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-model")


# A random tiny model's output head has weights near 0, so its logits stay near uniform whatever the
# adapters do: the LoRA runs also train lm_head (lora_modules_to_save), as one would for new tokens.
LORA = {"adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True,
        "lora_modules_to_save": ["lm_head"], "learning_rate": 1e-2}
FORMATS = {
    # LoRA on the arithmetic set, with packing through the block-diagonal mask.
    "alpaca": {"fmt": "alpaca", "sample_packing": True, **LORA},
    # Full fine-tuning on the colour chat set, with gradient accumulation and an eval split.
    "chat_template": {"fmt": "chat_template", "learning_rate": 3e-3, "gradient_accumulation_steps": 2,
                      "micro_batch_size": 2, "val_set_size": 0.1, "evals_per_epoch": 1},
    # LoRA on a repetitive corpus, split into sequence_len chunks.
    "completion": {"fmt": "completion", "sequence_len": 64, **LORA},
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_learns_through_a_compiled_bundle(tmp_path: Path, tiny_model: Path, name: str) -> None:
    root = workspace(tmp_path, tiny_model)
    launch(compile_bundle(write_config(root, use_tensorboard=True, **FORMATS[name])))
    out = root / "out"
    losses = train_losses(out)
    assert len(losses) >= 30
    start, end = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert end <= start / 2, f"{name}: loss {start:.3f} → {end:.3f} did not halve"
    record = next(r for r in metrics(out) if "loss" in r)
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "epoch"} <= record.keys()
    assert record["tokens_per_s"] > 0
    saved = "adapter_model.safetensors" if FORMATS[name].get("adapter") else "model.safetensors"
    assert (out / saved).exists() and (out / "tokenizer_config.json").exists()
    assert any((out / "runs").iterdir())  # TensorBoard event files
    if FORMATS[name].get("val_set_size"):
        assert any("eval_loss" in r for r in metrics(out))


def test_finished_run_relaunched_trains_nothing_more(tmp_path: Path, tiny_model: Path) -> None:
    root = workspace(tmp_path, tiny_model)
    bundle = compile_bundle(write_config(root, adapter="lora", lora_target_linear=True, max_steps=3))
    launch(bundle)
    before = (root / "out" / "metrics.jsonl").read_text()
    again = launch(bundle)
    assert "resumed from" in again.stdout + again.stderr
    assert (root / "out" / "metrics.jsonl").read_text() == before
    assert json.loads((root / "out" / "train_summary.json").read_text())["step"] == 3


def test_lora_model_dir_continues_an_adapter_and_special_tokens_grow_the_vocabulary(
        tmp_path: Path, tiny_model: Path) -> None:
    """Two runs: the first adds special tokens (embeddings resized, trained through modules_to_save) and
    saves an adapter; the second starts from that adapter (lora_model_dir) in a new output_dir, so its
    first loss is the first run's learnt loss, not a fresh adapter's."""
    from safetensors import safe_open

    root = workspace(tmp_path, tiny_model)
    lora = LORA | {"special_tokens": {"pad_token": "<|pad|>", "additional_special_tokens": ["<tool>"]},
                   "lora_modules_to_save": ["lm_head", "embed_tokens"]}
    launch(compile_bundle(write_config(root, "first.yml", **lora, max_steps=30, output_dir="first")))
    first = train_losses(root / "first")
    with safe_open(str(root / "first" / "adapter_model.safetensors"), "pt") as adapter:
        rows = {name: adapter.get_slice(name).get_shape()[0] for name in adapter.keys() if "embed_tokens" in name}
    from transformers import AutoTokenizer

    grown = len(AutoTokenizer.from_pretrained(root / "first"))
    assert grown > 1024  # the tiny vocabulary plus <tool> (the tiny tokenizer has a pad token already)
    assert rows and set(rows.values()) == {grown}, rows

    launch(compile_bundle(write_config(root, "second.yml", **lora, max_steps=3, output_dir="second",
                                       lora_model_dir="first")))
    second = train_losses(root / "second")
    assert second[0] < (first[0] + first[-1]) / 2, (first, second)


def test_parameter_counts_see_zero3_partitioned_weights() -> None:
    # Seen on the GPU machine: under ZeRO-3 a loaded parameter is an empty partition (numel 0) carrying its
    # full size as ds_numel, and counting by numel() divided by zero in the startup log line.
    from tunefile.runtime.model import parameter_counts

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    assert parameter_counts(model) == (3 * 2 + 2, 4 * 3 + 3 + 3 * 2 + 2)
    for param in model.parameters():
        param.ds_numel = param.numel()
        param.data = torch.empty(0)
    assert parameter_counts(model) == (3 * 2 + 2, 4 * 3 + 3 + 3 * 2 + 2)


def test_seed_zero_is_a_seed_of_its_own(tmp_path: Path, tiny_model: Path) -> None:
    """`seed: 0` used to become 42 (`int(cfg.get("seed") or 42)` in three places): 0, 1 and 42 must give three
    different adapters (LoRA's random initialisation and the data order both follow the seed)."""
    digests = {}
    for seed in (0, 1, 42):
        root = workspace(tmp_path / f"seed{seed}", tiny_model)
        launch(compile_bundle(write_config(root, adapter="lora", lora_target_linear=True, max_steps=2, seed=seed)))
        result = summary(root / "out")
        digests[seed] = result["rank_weight_digests"][0]
    assert len(set(digests.values())) == 3, digests
    # What this machine decided, recorded beside the plan's choices.
    assert result["runtime_decisions"] == {"device": "cpu", "distributed_type": "NO", "packing_attention": None,
                                           "attn_implementation": "sdpa", "attention_fallback": None}
    assert metrics(root / "out")[0]["runtime_decisions"]["device"] == "cpu"
