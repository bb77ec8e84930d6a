"""Checkpoints: complete ones are found, incomplete ones ignored, old ones pruned, and a run killed
mid-way resumes from the newest complete checkpoint to the same weights as an uninterrupted run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from runtime_bundles import build_tiny_model, compile_bundle, launch, metrics, safetensors, workspace, write_config
from tunefile.runtime import checkpoint


def _fake_checkpoint(output_dir: Path, step: int, *, complete: bool = True) -> Path:
    path = output_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / checkpoint.COMPLETE).write_text(f"{step}\n")
    return path


def test_newest_complete_checkpoint_wins_and_incomplete_ones_are_ignored(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, 5)
    newest = _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 15, complete=False)  # killed while saving
    (tmp_path / ".tmp-checkpoint-20").mkdir()
    assert [step for step, _ in checkpoint.complete_checkpoints(tmp_path)] == [5, 10]
    assert checkpoint.find_resume_checkpoint(tmp_path, resume_from=None, auto_resume=True) == newest
    assert checkpoint.find_resume_checkpoint(tmp_path, resume_from=None, auto_resume=False) is None
    assert checkpoint.find_resume_checkpoint(tmp_path / "missing", resume_from=None, auto_resume=True) is None


def test_explicit_resume_must_be_complete(tmp_path: Path) -> None:
    chosen = _fake_checkpoint(tmp_path, 5)
    assert checkpoint.find_resume_checkpoint(tmp_path, resume_from=str(chosen), auto_resume=True) == chosen
    partial = _fake_checkpoint(tmp_path, 7, complete=False)
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.find_resume_checkpoint(tmp_path, resume_from=str(partial), auto_resume=True)


def test_save_total_limit_prunes_the_oldest(tmp_path: Path) -> None:
    for step in (5, 10, 15):
        _fake_checkpoint(tmp_path, step)
    checkpoint.prune_checkpoints(tmp_path, 2)
    assert [step for step, _ in checkpoint.complete_checkpoints(tmp_path)] == [10, 15]
    checkpoint.prune_checkpoints(tmp_path, None)
    assert len(checkpoint.complete_checkpoints(tmp_path)) == 2


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-model")


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path: Path, tiny_model: Path) -> None:
    """Run A trains 16 steps straight. Run B dies right after step 11 (os._exit, like SIGKILL: no final
    save), with checkpoints at 4 and 8 and a half-written one at 12 planted; relaunched, it resumes at
    step 8 and ends with exactly A's weights. Cosine schedule and dropout make the RNG and scheduler
    state matter. (Full fine-tuning checkpoints go through accelerate unfiltered; the LoRA path adds the
    trainable-only filter, so it is the one pinned here.)"""
    common = {"max_steps": 16, "save_steps": 4, "save_total_limit": 2, "lr_scheduler": "cosine",
              "val_set_size": 0.1, "eval_steps": 8, "adapter": "lora", "lora_target_linear": True,
              "lora_dropout": 0.1}
    uninterrupted = workspace(tmp_path / "a", tiny_model)
    launch(compile_bundle(write_config(uninterrupted, **common)))

    interrupted = workspace(tmp_path / "b", tiny_model)
    bundle = compile_bundle(write_config(interrupted, **common))
    crashed = launch(bundle, env={"TUNEFILE_FAULT_AFTER_STEP": "11"}, check=False)
    assert crashed.returncode != 0
    out = interrupted / "out"
    assert [s for s, _ in checkpoint.complete_checkpoints(out)] == [4, 8]  # save_total_limit kept two
    (out / "checkpoint-12").mkdir()  # a save that never finished: no COMPLETE marker
    resumed = launch(bundle)
    assert re.search(r"resumed from \S*checkpoint-8 at step 8", resumed.stdout + resumed.stderr)

    weights = "adapter_model.safetensors"
    a, b = safetensors(uninterrupted / "out" / weights), safetensors(out / weights)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The metrics file reads as one run: each step once, the same losses as the uninterrupted run.
    steps_a = {r["step"]: r["loss"] for r in metrics(uninterrupted / "out") if "loss" in r}
    records_b = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in records_b] == list(range(1, 17))
    assert {r["step"]: r["loss"] for r in records_b} == pytest.approx(steps_a, abs=1e-6)
    assert [s for s, _ in checkpoint.complete_checkpoints(out)] == [12, 16]
