"""Checkpoints that resume exactly, and the final model in Hugging Face format.

`<output_dir>/checkpoint-<step>/` holds what `accelerator.save_state` writes (weights, optimizer,
scheduler, GradScaler, the python/numpy/torch/cuda RNG states of every rank; sharded the FSDP or
DeepSpeed way where those run) plus `trainer_state.json` (step, epoch, position in the epoch's
micro-batch plan) and, when a rank has state of its own (a streaming rank's place in its share of the
data), `rank-<r>.json` per rank. Everything is written into a hidden temp directory that is renamed into place
once its `COMPLETE` marker (every file's size and sha256, checkpoint_integrity.py) is in it, so a run killed
mid-save leaves nothing that looks resumable. A save that fails (a full disk) removes its temp directory and
stops the run with one line; the complete checkpoints are untouched.

Resuming takes the newest checkpoint that passes: its files match the marker, its trainer state and every RNG
state file load, and accelerate loads the rest. One that fails is reported in one line and the one before it is
tried; an explicit `resume_from_checkpoint` that fails is an error, not a fallback.

Adapter runs keep only the trainable tensors where the strategy lets us choose: the frozen base is
re-read from `base_model` on resume, and an 8B base would otherwise be copied into every checkpoint.
Under DDP or a single process save-state hooks drop it; under DeepSpeed the engine's own
`exclude_frozen_parameters` does (without it, the two ZeRO-2 checkpoints of an 8B LoRA run on the GPU
machine took 62 GB). FSDP's sharded state always holds the whole model: accelerate saves it before any hook runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .checkpoint_integrity import (
    COMPLETE,
    directory_bytes,
    disk_full_message,
    final_model_disk_full_message,
    fsync_directory,
    is_disk_full,
    mismatched_file,
    read_marker,
    torn_file,
    write_marker,
)
from .errors import RuntimeUserError

log = logging.getLogger(__name__)

# Written into a complete checkpoint by a run that a signal stopped (runtime/preemption.py): the next launch
# resumes from it even without auto-resume, because exit status 75 promised "run again to continue".
STOPPED_EARLY = "STOPPED_EARLY"
STATE_FILE = "trainer_state.json"
RANK_STATE_FILE = "rank-{rank}.json"  # what one rank alone knows, with the world size that wrote it
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
RNG_STATE_FILES = "random_states_*.pkl"  # accelerate's RNG_STATE_NAME, one file per rank
RNG_STATE_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")  # what accelerate restores from each


@dataclass
class TrainState:
    """Where the run is: `micro_batch` indexes the next micro-batch of `epoch`'s plan."""

    step: int = 0
    epoch: int = 0
    micro_batch: int = 0


class CheckpointError(RuntimeUserError):
    """A checkpoint asked for cannot be used, or one cannot be written."""


class CheckpointRejected(CheckpointError):
    """No checkpoint to resume from passed (or the one asked for failed): a verdict every rank shares."""

    same_on_every_rank = True


class CheckpointWriteError(CheckpointError):
    """A save failed (a full disk): every rank raises it together, so rank 0 alone prints it."""

    same_on_every_rank = True


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first; incomplete ones are ignored."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT.match(path.name)
        if match and path.is_dir() and (path / COMPLETE).exists():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resume_candidates(output_dir: Path, *, resume_from: str | None, auto_resume: bool) -> list[Path]:
    """The checkpoints a run may resume from, the preferred first: the explicit `resume_from_checkpoint` alone (it
    must be complete), else the complete checkpoints newest first when auto-resume is on, or when a run stopped
    by a signal saved the newest (STOPPED_EARLY); none otherwise. Unverified: `resume` checks each in turn."""
    if resume_from:
        path = Path(resume_from).expanduser()
        if not (path / COMPLETE).exists():
            raise CheckpointError(f"resume_from_checkpoint {path}: not a complete checkpoint (no {COMPLETE} marker)")
        return [path]
    newest_first = [path for _, path in reversed(complete_checkpoints(output_dir))]
    if auto_resume:
        return newest_first
    if newest_first and (newest_first[0] / STOPPED_EARLY).exists():
        log.info("resuming from %s, which a run stopped by a signal saved (auto_resume_from_checkpoints is off; "
                 "delete that checkpoint to start over)", newest_first[0])
        return newest_first
    return []


def find_resume_checkpoint(output_dir: Path, *, resume_from: str | None, auto_resume: bool) -> Path | None:
    """The first of `resume_candidates`, unverified (None when there is none)."""
    candidates = resume_candidates(output_dir, resume_from=resume_from, auto_resume=auto_resume)
    return candidates[0] if candidates else None


REASON_CHARS = 200  # torch's zip reader explains itself over several sentences; the first ones say it


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
    return line if len(line) <= REASON_CHARS else line[:REASON_CHARS - 1] + "…"


def _read_train_state(path: Path) -> TrainState:
    """The checkpoint's trainer state; ValueError naming the file when it is torn or edited."""
    try:
        data = json.loads((path / STATE_FILE).read_bytes().decode("utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
        raise ValueError(f"{STATE_FILE} does not load ({_first_line(exc)})") from None
    # A field the state gained later is missing from an older checkpoint and keeps its default, as it always did.
    if not isinstance(data, dict) or not set(data) <= {field.name for field in fields(TrainState)} \
            or not all(type(value) is int for value in data.values()):
        raise ValueError(f"{STATE_FILE} is not a trainer state: {str(data)[:80]}")
    return TrainState(**data)


def _check_rng_states(path: Path) -> None:
    """Every rank's RNG file loads and holds what accelerate restores. accelerate's own load_state catches any
    error here and resumes with fresh RNG ("Could not load random states", at INFO): an inexact resume."""
    from accelerate.utils import load

    files = sorted(path.glob(RNG_STATE_FILES))
    if not files:
        raise ValueError("it holds no random_states_<rank>.pkl (the RNG state)")
    for file in files:
        try:
            states = load(file)
        except Exception as exc:  # noqa: BLE001 - a torn pickle raises anything: EOFError, UnpicklingError, …
            raise ValueError(f"{file.name} does not load ({_first_line(exc)})") from None
        if not isinstance(states, dict) or any(key not in states for key in RNG_STATE_KEYS):
            raise ValueError(f"{file.name} holds no RNG state")


def verify_checkpoint(path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be resumed from, as a phrase; None when it passes: every file the marker
    records matches, the trainer state is the checkpoint's step, and every RNG state file loads."""
    try:
        marker = read_marker(path)
        # Hashes when the marker has them; an older marker leaves the files' own structure to tell.
        mismatch = torn_file(path) if marker.files is None else mismatched_file(path, marker.files)
        if mismatch is not None:
            return mismatch
        state = _read_train_state(path)
        if state.step != marker.step:
            return f"{STATE_FILE} says step {state.step}, its {COMPLETE} marker step {marker.step}"
        _check_rng_states(path)
    except ValueError as exc:  # the readers above phrase theirs
        return str(exc)
    except OSError as exc:  # a file that vanished or cannot be read
        return _first_line(exc)
    return None


def mark_stopped_early(path: Path, reason: str) -> None:
    """Main process only: mark complete checkpoint PATH as the one a stopped run continues from."""
    (path / STOPPED_EARLY).write_text(reason + "\n", encoding="utf-8")


def clear_stopped_early(output_dir: Path) -> None:
    """Main process only, once the run has finished: nothing is left to continue, so a later launch follows
    auto_resume_from_checkpoints again."""
    for _, path in complete_checkpoints(output_dir):
        (path / STOPPED_EARLY).unlink(missing_ok=True)


def _trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def _keep_trainable_only(models: list[torch.nn.Module], weights: list[dict[str, Any]], _output_dir: str) -> None:
    # `weights` is filled for plain/DDP models only (FSDP and DeepSpeed save their own way).
    for model, state in zip(models, weights, strict=True):
        trainable = _trainable_names(model)
        for key in [k for k in state if k not in trainable]:
            del state[key]


def _load_trainable_only(models: list[torch.nn.Module], input_dir: str) -> None:
    from safetensors.torch import load_file

    for i, model in enumerate(models):
        path = Path(input_dir) / (f"model_{i}.safetensors" if i else "model.safetensors")
        state = load_file(str(path))
        expected = _trainable_names(model)
        if set(state) != expected:
            raise CheckpointError(f"{path}: holds {len(state)} tensors, the model trains {len(expected)}; "
                                  "was the checkpoint written with another adapter config?")
        model.load_state_dict(state, strict=False)
    models.clear()  # loaded here; accelerate must not load them again (strictly, and fail)


# Handed to DeepSpeed's engine.save_checkpoint / load_checkpoint through accelerate's save_state / load_state.
DEEPSPEED_ADAPTER_SAVE = {"exclude_frozen_parameters": True}
DEEPSPEED_ADAPTER_LOAD = {"load_module_strict": False}  # the frozen weights are not in it, by design


def _engine_options(accelerator: Any, adapter_only: bool, options: dict[str, bool]) -> dict[str, bool]:
    return options if adapter_only and accelerator.distributed_type.value == "DEEPSPEED" else {}


# Strategies where the model is a plain module or a DDP replica, whose state accelerate hands to save-state
# hooks (FSDP and DeepSpeed save through their own sharded formats).
REPLICATED = ("NO", "MULTI_CPU", "MULTI_GPU")


def keep_only_the_adapter(accelerator: Any) -> None:
    """For an adapter run, before `prepare`: the hooks that keep plain and DDP checkpoints to the trainable
    tensors. DeepSpeed gets its engine options from save_checkpoint / load_checkpoint(adapter_only=True)."""
    if accelerator.distributed_type.value in REPLICATED:
        accelerator.register_save_state_pre_hook(_keep_trainable_only)
        accelerator.register_load_state_pre_hook(_load_trainable_only)


def _attempt(action: Callable[[], None]) -> BaseException | None:
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - judged by _raise_if_any_failed, after every rank has reported
        return exc
    return None


def _raise_if_any_failed(accelerator: Any, failure: BaseException | None, output_dir: Path, temp: Path,
                         step: int | None) -> None:
    """Collective (it is also the barrier): when a rank's part of a save failed, the main process removes the temp
    directory and every rank raises, so none waits for the others forever. A full disk or another write error is
    one line (CheckpointWriteError); anything else is a bug and keeps its traceback on the rank it happened on.
    ``step``: the checkpoint's step, or None for the final model."""
    from accelerate.utils import gather_object

    mine = None
    if failure is not None:  # (rank, a full disk?, a failed write at all?, why, bytes in the temp directory)
        mine = (accelerator.process_index, is_disk_full(failure, output_dir),
                isinstance(failure, OSError) or "I/O error" in str(failure), _first_line(failure),
                directory_bytes(temp) if temp.is_dir() else 0)
    failed = [report for report in gather_object([mine]) if report is not None]
    if not failed:
        return
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
    if mine is not None and not (mine[1] or mine[2]):
        raise failure
    found = complete_checkpoints(output_dir)
    newest = found[-1][1] if found else None
    if any(full for _, full, _, _, _ in failed):
        written = max(report[4] for report in failed)
        raise CheckpointWriteError(disk_full_message(output_dir, step, written=written, newest=newest)
                                   if step is not None else final_model_disk_full_message(output_dir, written=written,
                                                                                          newest=newest))
    rank, _, _, reason, _ = failed[0]
    if step is None:
        raise CheckpointWriteError(f"the final model could not be written in {output_dir} (rank {rank}: {reason}); "
                                   "its partial files were removed, the checkpoints are untouched")
    raise CheckpointWriteError(f"checkpoint-{step} could not be written in {output_dir} (rank {rank}: {reason}); "
                               "the partial checkpoint was removed, the complete ones are untouched")


def save_checkpoint(accelerator: Any, output_dir: Path, state: TrainState, *, save_total_limit: int | None,
                    adapter_only: bool = False, rank_state: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory. `adapter_only`: an adapter run,
    whose frozen base need not be saved. `rank_state`: this rank's own state (read back by `load_rank_state`).
    A failed write (a full disk) raises CheckpointWriteError on every rank, with the partial checkpoint removed."""
    final = output_dir / f"checkpoint-{state.step}"
    temp = output_dir / f".tmp-checkpoint-{state.step}"

    def make_temp() -> None:
        shutil.rmtree(temp, ignore_errors=True)  # left by a run killed while saving
        temp.mkdir(parents=True)

    def write_this_rank() -> None:
        accelerator.save_state(str(temp), **_engine_options(accelerator, adapter_only, DEEPSPEED_ADAPTER_SAVE))
        if rank_state is not None:
            (temp / RANK_STATE_FILE.format(rank=accelerator.process_index)).write_text(
                json.dumps({"world_size": accelerator.num_processes, **rank_state}, sort_keys=True) + "\n",
                encoding="utf-8")

    def publish() -> None:  # every rank's shards and RNG state are on disk
        (temp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        write_marker(temp, state.step)  # last into the temp directory: the rename publishes a whole checkpoint
        if final.exists():
            shutil.rmtree(final)  # a stale or corrupt copy of the same step
        os.replace(temp, final)
        fsync_directory(output_dir)

    main = accelerator.is_main_process
    _raise_if_any_failed(accelerator, _attempt(make_temp) if main else None, output_dir, temp, state.step)
    _raise_if_any_failed(accelerator, _attempt(write_this_rank), output_dir, temp, state.step)
    _raise_if_any_failed(accelerator, _attempt(publish) if main else None, output_dir, temp, state.step)
    if main:
        prune_checkpoints(output_dir, save_total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: Path, save_total_limit: int | None) -> None:
    if save_total_limit is None:
        return
    found = complete_checkpoints(output_dir)
    for _, path in found[:-save_total_limit]:
        log.info("removing %s (save_total_limit %d)", path, save_total_limit)
        shutil.rmtree(path, ignore_errors=True)


def _load_failure(accelerator: Any, path: Path, *, adapter_only: bool) -> str | None:
    """Load ``path`` into the prepared objects: None when every file loaded, else why not (one phrase). Any
    error counts: a torn file raises whatever its reader raises (SafetensorError, UnpicklingError, EOFError,
    RuntimeError from torch's zip reader)."""
    try:
        _check_rng_states(path)  # accelerate itself would skip an unreadable one, silently
        accelerator.load_state(str(path), **_engine_options(accelerator, adapter_only, DEEPSPEED_ADAPTER_LOAD))
        _read_train_state(path)
    except CheckpointError as exc:  # the adapter hook's shape check, already a sentence
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - see the docstring; --debug shows the traceback
        log.debug("loading %s failed", path, exc_info=True)
        return _first_line(exc)
    return None


def resume(accelerator: Any, output_dir: Path, *, resume_from: str | None, auto_resume: bool,
           adapter_only: bool = False) -> tuple[TrainState, Path] | None:
    """Collective: load the newest checkpoint that passes verification and loads on every rank; (its state, its
    path), or None when there is nothing to resume. Each one that fails is one warning line, and the one before it
    is tried; CheckpointError when the explicit resume_from_checkpoint fails, or every candidate does."""
    from accelerate.utils import broadcast_object_list, gather_object

    candidates = resume_candidates(output_dir, resume_from=resume_from, auto_resume=auto_resume)
    rejected: list[str] = []
    for path in candidates:
        # The main process hashes the files once; every rank follows its verdict.
        reason = broadcast_object_list([verify_checkpoint(path) if accelerator.is_main_process else None])[0]
        if reason is None:
            reasons = gather_object([_load_failure(accelerator, path, adapter_only=adapter_only)])
            reason = next((f"rank {rank}: {text}" if len(reasons) > 1 else text
                           for rank, text in enumerate(reasons) if text is not None), None)
        if reason is None:
            return _read_train_state(path), path
        if resume_from:
            raise CheckpointRejected(f"resume_from_checkpoint {path}: cannot resume from it: {reason}")
        rejected.append(f"{path.name}: {reason}")
        if accelerator.is_main_process:
            log.warning("checkpoint %s fails verification, not resuming from it: %s", path, reason)
    if rejected:
        raise CheckpointRejected(f"no checkpoint in {output_dir} can be resumed from ({'; '.join(rejected)}); move "
                              "them away to start over, or restore them")
    return None


def load_rank_state(path: Path, rank: int) -> dict[str, Any] | None:
    """What rank ``rank`` saved in checkpoint ``path`` (with ``world_size``: how many ranks there were); None
    when it saved nothing."""
    file = path / RANK_STATE_FILE.format(rank=rank)
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError alike
        raise CheckpointError(f"{file}: unreadable ({_first_line(exc)}); delete {path} to resume from the "
                              "checkpoint before it") from None


def save_final_model(accelerator: Any, model: torch.nn.Module, tokenizer: Any, output_dir: Path) -> None:
    """The adapter (or the whole model) in Hugging Face format, loadable with from_pretrained.
    Collective: `get_state_dict` gathers FSDP shards / ZeRO-3 partitions onto the main process.

    Written into a temporary folder first and then moved beside the checkpoints file by file (renames on one
    disk, which need no space), so a full disk leaves no truncated weights that look like a finished run: it is
    one line (CheckpointWriteError) on every rank, the partial files removed."""
    state_dict = accelerator.get_state_dict(model)
    temp = output_dir / ".tmp-final-model"

    def write() -> None:
        shutil.rmtree(temp, ignore_errors=True)  # left by a run killed while saving
        temp.mkdir(parents=True)
        accelerator.unwrap_model(model).save_pretrained(str(temp), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(temp))
        for path in sorted(temp.iterdir()):
            target = output_dir / path.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(path, target)
        temp.rmdir()

    _raise_if_any_failed(accelerator, _attempt(write) if accelerator.is_main_process else None, output_dir, temp,
                         None)


def weights_digest(model: torch.nn.Module) -> torch.Tensor:
    """An int64 digest of this rank's trainable tensors (sha256 of their bytes, first 8 bytes): equal
    on every rank under DDP, where the replicas must not drift apart."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            local = param.detach()
            local = local.to_local() if hasattr(local, "to_local") else local  # FSDP2 DTensor: this rank's shard
            digest.update(name.encode())
            digest.update(local.float().cpu().contiguous().numpy().tobytes())
    return torch.tensor([int.from_bytes(digest.digest()[:8], "big", signed=True)], dtype=torch.int64)
