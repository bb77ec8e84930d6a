"""Axolotl's early_stopping_patience: the run stops when the evaluation loss stops improving."""

from __future__ import annotations

from pathlib import Path

from runtime_bundles import compile_bundle, launch, metrics, summary, workspace, write_config
from tunefile.runtime.early_stopping import EarlyStopping


def test_patience_counts_evaluations_without_improvement_in_a_row() -> None:
    stopping = EarlyStopping(patience=2)
    verdicts = [stopping.should_stop(loss) for loss in (3.0, 2.0, 2.5, 1.5, 1.6, 1.5)]
    assert verdicts == [False, False, False, False, False, True]  # 1.5 equalled is not an improvement
    assert not any(EarlyStopping(patience=None).should_stop(loss) for loss in (1.0, 2.0, 3.0, 4.0))


def test_a_run_whose_evaluation_loss_stalls_stops_early(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A learning rate far below float32's resolution of the weights leaves them unchanged: the evaluation
    loss is the same at every evaluation, so with patience 2 the run stops at the third one."""
    root = workspace(tmp_path, tiny_model_dir)
    config = write_config(root, max_steps=20, val_set_size=0.2, eval_steps=1, early_stopping_patience=2,
                          learning_rate=1e-30, lr_scheduler="constant", warmup_steps=0)
    launch(compile_bundle(config))
    records = metrics(root / "out")
    evaluations = [record["eval_loss"] for record in records if "eval_loss" in record]
    assert len(evaluations) == 3 and len(set(evaluations)) == 1
    assert max(record["step"] for record in records) == 3
    assert summary(root / "out")["stopped_early_at_step"] == 3
