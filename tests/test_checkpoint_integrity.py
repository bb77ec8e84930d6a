"""Checkpoints are verified before use: a corrupted newest checkpoint is reported in one line and the run resumes
from the newest one that passes; every file of the resume state (RNG included) loads or the checkpoint is
rejected; a torn last line of metrics.jsonl does not stop a resume; a full disk during a save is one line naming
the space needed, with the partial checkpoint removed.

The unit tests save real checkpoints with accelerate in this process (a two-layer model, AdamW, a schedule) and
corrupt them. The full disk is simulated by monkeypatching accelerate's file writer: it writes part of the file,
then fails the way a full disk fails (OSError ENOSPC from Python's writes; torch.save's RuntimeError, whose text
says nothing about space, with the disk reported nearly full). The end-to-end test runs a bundle's launch.sh."""

from __future__ import annotations

import errno
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from runtime_bundles import build_tiny_model, compile_bundle, launch, metrics, workspace, write_config
from tunefile.runtime import checkpoint, checkpoint_integrity
from tunefile.runtime.metrics import MetricsSink
from tunefile.runtime.trackers import TrackerSet


class Run:
    """A prepared model, optimizer and schedule on the CPU, trained a step at a time and checkpointed."""

    def __init__(self, output_dir: Path) -> None:
        from accelerate import Accelerator

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        self.accelerator = Accelerator(cpu=True)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.output_dir = output_dir
        self.step = 0

    def train(self, steps: int) -> None:
        for _ in range(steps):
            loss = self.model(torch.randn(4, 8)).pow(2).mean()
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
            self.step += 1

    def save(self) -> Path:
        return checkpoint.save_checkpoint(self.accelerator, self.output_dir, checkpoint.TrainState(step=self.step),
                                          save_total_limit=None)

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: value.clone() for name, value in self.model.state_dict().items()}

    def resume(self, resume_from: str | None = None) -> tuple[checkpoint.TrainState, Path] | None:
        return checkpoint.resume(self.accelerator, self.output_dir, resume_from=resume_from, auto_resume=True)


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    try:
        yield Run(tmp_path / "out")
    finally:
        AcceleratorState._reset_state(True)


def two_checkpoints(run: Run) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """checkpoint-2 and checkpoint-4, and the weights at step 2."""
    run.train(2)
    older, at_two = run.save(), run.weights()
    run.train(2)
    return older, run.save(), at_two


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def write_old_marker(path: Path) -> None:
    """The marker tunefile wrote before it recorded files: the step alone."""
    (path / checkpoint.COMPLETE).write_text(f"{int(path.name.split('-')[1])}\n", encoding="utf-8")


def test_the_marker_records_every_file_with_its_size_and_sha256(run: Run) -> None:
    run.train(1)
    saved = run.save()
    marker = json.loads((saved / checkpoint.COMPLETE).read_text(encoding="utf-8"))
    assert marker["step"] == 1
    on_disk = sorted(p.name for p in saved.iterdir() if p.name != checkpoint.COMPLETE)
    assert sorted(marker["files"]) == on_disk
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
            checkpoint.STATE_FILE} <= set(on_disk)
    for name, entry in marker["files"].items():
        assert entry["bytes"] == (saved / name).stat().st_size
        assert entry["sha256"] == checkpoint_integrity.record_files(saved)[name][1]
    assert not list(run.output_dir.glob(".tmp-checkpoint-*"))


CORRUPTIONS = {
    "truncated model.safetensors": lambda path: truncate(path / "model.safetensors"),
    "truncated optimizer.bin": lambda path: truncate(path / "optimizer.bin"),
    "truncated scheduler.bin": lambda path: truncate(path / "scheduler.bin"),
    "truncated trainer_state.json": lambda path: truncate(path / checkpoint.STATE_FILE),
    "deleted optimizer.bin": lambda path: (path / "optimizer.bin").unlink(),
    "truncated random_states_0.pkl": lambda path: truncate(path / "random_states_0.pkl"),
    "flipped byte in optimizer.bin": lambda path: _flip_last_byte(path / "optimizer.bin"),
}


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# A flipped byte inside a tensor loads fine: only a recorded sha256 finds it, so old markers are not tried with it.
CASES = [(name, False) for name in sorted(CORRUPTIONS)] + \
        [(name, True) for name in sorted(CORRUPTIONS) if not name.startswith("flipped")]


@pytest.mark.parametrize(("corruption", "old_marker"), CASES,
                         ids=[f"{name}, {'old step-only' if old else 'hashed'} marker" for name, old in CASES])
def test_a_corrupted_newest_checkpoint_is_reported_in_one_line_and_the_previous_one_is_used(
        run: Run, corruption: str, old_marker: bool, caplog: pytest.LogCaptureFixture) -> None:
    older, newest, at_two = two_checkpoints(run)
    CORRUPTIONS[corruption](newest)
    if old_marker:  # no hashes to compare: the files' own structure, or their loading, must reject it
        write_old_marker(older)
        write_old_marker(newest)
    run.train(3)  # the live state moves on: the resume must bring back step 2's
    with caplog.at_level(logging.WARNING, logger="tunefile.runtime.checkpoint"):
        resumed = run.resume()
    assert resumed is not None
    state, path = resumed
    assert (state.step, path) == (2, older)
    for name, value in run.weights().items():
        assert torch.equal(value, at_two[name]), name
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert str(newest) in warnings[0] and "fails verification" in warnings[0]
    assert corruption.split()[-1] in warnings[0]  # the file at fault is named


def test_the_rng_state_is_restored_exactly_from_the_checkpoint_that_passes(run: Run) -> None:
    older, newest, _ = two_checkpoints(run)
    truncate(newest / "random_states_0.pkl")
    torch.manual_seed(1234)
    run.resume()
    draw = torch.rand(4)
    from accelerate.utils import load

    torch.set_rng_state(load(older / "random_states_0.pkl")["torch_manual_seed"])
    assert torch.equal(draw, torch.rand(4))


def test_an_explicit_resume_from_a_corrupted_checkpoint_is_one_line_and_no_fallback(run: Run) -> None:
    _, newest, _ = two_checkpoints(run)
    truncate(newest / "optimizer.bin")
    with pytest.raises(checkpoint.CheckpointError) as raised:
        run.resume(resume_from=str(newest))
    message = str(raised.value)
    assert "\n" not in message and "optimizer.bin" in message and str(newest) in message
    assert raised.value.exit_code == 2


def test_when_no_checkpoint_passes_the_run_stops_with_one_line_naming_each(run: Run) -> None:
    older, newest, _ = two_checkpoints(run)
    truncate(older / "model.safetensors")
    (newest / "optimizer.bin").unlink()
    with pytest.raises(checkpoint.CheckpointError) as raised:
        run.resume()
    message = str(raised.value)
    assert "\n" not in message
    assert "checkpoint-2: model.safetensors" in message and "checkpoint-4: optimizer.bin is missing" in message


def test_a_torn_marker_or_state_file_that_is_not_utf8_rejects_the_checkpoint(run: Run) -> None:
    older, newest, _ = two_checkpoints(run)
    marker = newest / checkpoint.COMPLETE
    marker.write_bytes(marker.read_bytes()[:40])
    assert "marker is unreadable" in checkpoint.verify_checkpoint(newest)
    write_old_marker(newest)
    (newest / checkpoint.STATE_FILE).write_bytes(b'{"step": \xff\xfe}')
    assert "trainer_state.json does not load (UnicodeDecodeError" in checkpoint.verify_checkpoint(newest)
    assert checkpoint.verify_checkpoint(older) is None
    assert run.resume()[1] == older


def test_a_torn_last_line_of_metrics_jsonl_is_dropped_on_resume(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "metrics.jsonl"
    whole = [json.dumps({"step": step, "loss": 1.0 / step}) for step in (1, 2, 3)]
    path.write_bytes(("\n".join(whole) + "\n").encode() + b'{"step": 4, "lo\x00\x00')  # killed mid-write
    with caplog.at_level(logging.WARNING):
        sink = MetricsSink(tmp_path, total_steps=10, start_step=2, trackers=TrackerSet([], {}))
    sink.log_train({"step": 3, "epoch": 0.3, "loss": 0.5, "lr": 1e-3, "tokens_per_s": 1.0, "grad_norm": 1.0})
    sink.close()
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] == 0.5
    assert any("not whole records" in r.getMessage() for r in caplog.records)


# --- a full disk during a save ----------------------------------------------------------------------------------

def _fail_writing(monkeypatch: pytest.MonkeyPatch, failure: BaseException, *, on: str = "optimizer.bin") -> None:
    """accelerate's writer writes part of ``on``, then raises ``failure``, as a write hitting a full disk does."""
    import accelerate.checkpointing

    real_save = accelerate.checkpointing.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if Path(f).name == on:
            Path(f).write_bytes(b"\0" * 4096)
            raise failure
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 "
                                                  "vs 534")], ids=["ENOSPC", "torch.save RuntimeError"])
def test_a_full_disk_during_a_save_is_one_line_naming_the_space_and_leaves_no_partial_checkpoint(
        run: Run, monkeypatch: pytest.MonkeyPatch, failure: BaseException) -> None:
    older, newest, _ = two_checkpoints(run)
    before = {path.name: checkpoint_integrity.directory_bytes(path) for path in (older, newest)}
    _fail_writing(monkeypatch, failure)
    # torch.save's error says nothing of space: the disk itself says it is full (as it is after such a failure).
    monkeypatch.setattr(checkpoint_integrity, "free_bytes", lambda directory: 1024)
    run.train(1)
    with pytest.raises(checkpoint.CheckpointWriteError) as raised:
        run.save()
    message = str(raised.value)
    assert "\n" not in message and raised.value.exit_code == 2
    needed = checkpoint_integrity.in_words(before["checkpoint-4"])
    assert re.search(rf"no space left .* checkpoint-5: a checkpoint needs about {re.escape(needed)} "
                     r"\(the size of checkpoint-4\), 1\.0 KiB free", message), message
    assert "resume from checkpoint-4" in message
    assert not list(run.output_dir.glob(".tmp-checkpoint-*")) and not (run.output_dir / "checkpoint-5").exists()
    assert {path.name: checkpoint_integrity.directory_bytes(path) for path in (older, newest)} == before
    assert checkpoint.verify_checkpoint(newest) is None


def test_a_full_disk_on_the_first_save_names_what_was_written(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_writing(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    run.train(1)
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"needs more than the \d.* written before the disk "
                                                              r"filled"):
        run.save()
    assert not any(run.output_dir.iterdir())


def test_a_bug_during_a_save_keeps_its_traceback_and_removes_the_partial_checkpoint(
        run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_writing(monkeypatch, TypeError("a bug, not the disk"))
    run.train(1)
    with pytest.raises(TypeError, match="a bug"):
        run.save()
    assert not any(run.output_dir.iterdir())


class FillsTheDisk(torch.nn.Sequential):
    """A model whose save_pretrained writes part of its weights, then fails as a write hitting a full disk does."""

    def save_pretrained(self, directory: str, **_: Any) -> None:
        Path(directory, "adapter_model.safetensors").write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")


class SavesATokenizer:
    def save_pretrained(self, directory: str) -> None:
        Path(directory, "tokenizer.json").write_text("{}", encoding="utf-8")


def test_a_full_disk_while_saving_the_final_model_is_one_line_and_leaves_no_truncated_weights(run: Run) -> None:
    run.train(2)
    run.save()
    model = run.accelerator.prepare(FillsTheDisk(torch.nn.Linear(2, 2)))
    with pytest.raises(checkpoint.CheckpointWriteError) as raised:
        checkpoint.save_final_model(run.accelerator, model, SavesATokenizer(), run.output_dir)
    message = str(raised.value)
    assert "\n" not in message and raised.value.exit_code == 2
    assert re.search(r"no space left on the disk of .* while saving the final model: it needs more than the "
                     r"4\.0 KiB written before the disk filled, .* free; .* it resumes from checkpoint-2 and saves "
                     r"the model$", message), message
    assert sorted(path.name for path in run.output_dir.iterdir()) == ["checkpoint-2"]  # no weights that look done


def test_the_final_model_lands_beside_the_checkpoints_and_replaces_an_older_one(run: Run) -> None:
    class Saves(torch.nn.Sequential):
        def save_pretrained(self, directory: str, **_: Any) -> None:
            Path(directory, "adapter_model.safetensors").write_bytes(b"new")

    run.output_dir.mkdir(parents=True)
    (run.output_dir / "adapter_model.safetensors").write_bytes(b"old")
    model = run.accelerator.prepare(Saves(torch.nn.Linear(2, 2)))
    checkpoint.save_final_model(run.accelerator, model, SavesATokenizer(), run.output_dir)
    assert (run.output_dir / "adapter_model.safetensors").read_bytes() == b"new"
    assert sorted(path.name for path in run.output_dir.iterdir()) == ["adapter_model.safetensors", "tokenizer.json"]


def test_a_full_disk_while_writing_metrics_is_one_line(tmp_path: Path) -> None:
    from tunefile.runtime.metrics import MetricsWriteError

    sink = MetricsSink(tmp_path, total_steps=10, start_step=0, trackers=TrackerSet([], {}))
    sink.file.close()
    sink.file = open("/dev/full", "a", encoding="utf-8")  # noqa: SIM115 - every write to it fails with ENOSPC
    with pytest.raises(MetricsWriteError) as raised:
        sink.log_train({"step": 3, "epoch": 0.3, "loss": 0.5, "lr": 1e-3, "tokens_per_s": 1.0, "grad_norm": 1.0})
    assert str(raised.value).startswith(f"no space left on the disk of {tmp_path} while writing metrics.jsonl at "
                                        "step 3: ")
    assert raised.value.exit_code == 2 and "\n" not in str(raised.value)
    sink.close(failed=True)  # the failed write's buffered rest is not a second error


def test_a_checkpoint_error_is_one_line_and_exit_2_from_the_runtime_entry_point(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from tunefile.runtime.__main__ import report_user_error

    monkeypatch.setenv("TUNEFILE_EXIT_STATUS_FILE", str(tmp_path / "status"))
    code = report_user_error(checkpoint.CheckpointWriteError("no space left on the disk of out"), debug=False)
    assert code == 2 and (tmp_path / "status").read_text() == "2\n"
    assert capsys.readouterr().err == "tunefile runtime: no space left on the disk of out\n"


# --- end to end: a bundle relaunched after its newest checkpoint was corrupted -----------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-model")


def test_a_relaunch_skips_a_truncated_newest_checkpoint_and_a_torn_metrics_line(tmp_path: Path,
                                                                                 tiny_model: Path) -> None:
    root = workspace(tmp_path, tiny_model)
    bundle = compile_bundle(write_config(root, max_steps=8, save_steps=2, adapter="lora", lora_target_linear=True))
    crashed = launch(bundle, env={"TUNEFILE_FAULT_AFTER_STEP": "5"}, check=False)
    assert crashed.returncode != 0
    out = root / "out"
    assert [step for step, _ in checkpoint.complete_checkpoints(out)] == [2, 4]
    truncate(out / "checkpoint-4" / "optimizer.bin")
    with (out / "metrics.jsonl").open("ab") as handle:
        handle.write(b'{"step": 6, "loss"')  # the kill tore the last record

    resumed = launch(bundle)
    output = resumed.stdout + resumed.stderr
    assert "Traceback" not in output
    assert re.search(r"checkpoint \S*checkpoint-4 fails verification, not resuming from it: optimizer\.bin has "
                     r"[\d,]+ bytes", output), output[-3000:]
    assert re.search(r"resumed from \S*checkpoint-2 at step 2", output)
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, 9))
    assert [step for step, _ in checkpoint.complete_checkpoints(out)] == [2, 4, 6, 8]
    assert checkpoint.verify_checkpoint(out / "checkpoint-4") is None  # saved again, whole
