"""Checkpoints that resume exactly, and the final model in Hugging Face format.

`<output_dir>/checkpoint-<step>/` holds what `accelerator.save_state` writes (weights, optimizer,
scheduler, GradScaler, the python/numpy/torch/cuda RNG states of every rank; sharded the FSDP or
DeepSpeed way where those run) plus `trainer_state.json` (step, epoch, position in the epoch's
micro-batch plan) and, when a rank has state of its own (a streaming rank's place in its share of the
data), `rank-<r>.json` per rank. Everything is written into a hidden temp directory that is renamed into place;
the `COMPLETE` marker is written last, so a run killed mid-save leaves nothing that looks resumable.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import RuntimeUserError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
# Written into a complete checkpoint by a run that a signal stopped (runtime/preemption.py): the next launch
# resumes from it even without auto-resume, because exit status 75 promised "run again to continue".
STOPPED_EARLY = "STOPPED_EARLY"
STATE_FILE = "trainer_state.json"
RANK_STATE_FILE = "rank-{rank}.json"  # what one rank alone knows, with the world size that wrote it
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainState:
    """Where the run is: `micro_batch` indexes the next micro-batch of `epoch`'s plan."""

    step: int = 0
    epoch: int = 0
    micro_batch: int = 0


class CheckpointError(RuntimeUserError):
    """A checkpoint asked for cannot be used."""


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


def find_resume_checkpoint(output_dir: Path, *, resume_from: str | None, auto_resume: bool) -> Path | None:
    """The explicit `resume_from_checkpoint` if given (it must be complete), else the newest
    complete checkpoint when auto-resume is on, or when a run stopped by a signal saved it (STOPPED_EARLY)."""
    if resume_from:
        path = Path(resume_from)
        if not (path / COMPLETE).exists():
            raise CheckpointError(f"resume_from_checkpoint {path}: not a complete checkpoint (no {COMPLETE} marker)")
        return path
    found = complete_checkpoints(output_dir)
    if auto_resume:
        return found[-1][1] if found else None
    if found and (found[-1][1] / STOPPED_EARLY).exists():
        log.info("resuming from %s, which a run stopped by a signal saved (auto_resume_from_checkpoints is off; "
                    "delete that checkpoint to start over)", found[-1][1])
        return found[-1][1]
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


def save_checkpoint(accelerator: Any, output_dir: Path, state: TrainState, *, save_total_limit: int | None,
                    adapter_only: bool = False, rank_state: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory. `adapter_only`: an adapter run,
    whose frozen base need not be saved. `rank_state`: this rank's own state (read back by `load_rank_state`)."""
    final = output_dir / f"checkpoint-{state.step}"
    temp = output_dir / f".tmp-checkpoint-{state.step}"
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)  # left by a run killed while saving
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp), **_engine_options(accelerator, adapter_only, DEEPSPEED_ADAPTER_SAVE))
    if rank_state is not None:
        (temp / RANK_STATE_FILE.format(rank=accelerator.process_index)).write_text(
            json.dumps({"world_size": accelerator.num_processes, **rank_state}, sort_keys=True) + "\n",
            encoding="utf-8")
    accelerator.wait_for_everyone()  # every rank's shards and RNG state are on disk
    if accelerator.is_main_process:
        (temp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)  # a stale, incomplete copy of the same step
        os.replace(temp, final)
        with (final / COMPLETE).open("w", encoding="utf-8") as marker:
            marker.write(f"{state.step}\n")
            marker.flush()
            os.fsync(marker.fileno())
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


def load_checkpoint(accelerator: Any, path: Path, *, adapter_only: bool = False) -> TrainState:
    """Weights, optimizer, schedule and RNG from a complete checkpoint; CheckpointError (one line) when it
    cannot be read: a truncated file, or one written by a different model or adapter shape."""
    try:
        accelerator.load_state(str(path), **_engine_options(accelerator, adapter_only, DEEPSPEED_ADAPTER_LOAD))
        return TrainState(**json.loads((path / STATE_FILE).read_text(encoding="utf-8")))
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot resume from this checkpoint ({first_line}); delete it to start "
                              "from the previous one, or set auto_resume_from_checkpoints: false") from exc


def load_rank_state(path: Path, rank: int) -> dict[str, Any] | None:
    """What rank ``rank`` saved in checkpoint ``path`` (with ``world_size``: how many ranks there were); None
    when it saved nothing."""
    file = path / RANK_STATE_FILE.format(rank=rank)
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None


def save_final_model(accelerator: Any, model: torch.nn.Module, tokenizer: Any, output_dir: Path) -> None:
    """The adapter (or the whole model) in Hugging Face format, loadable with from_pretrained.
    Collective: `get_state_dict` gathers FSDP shards / ZeRO-3 partitions onto the main process."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(str(output_dir), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(output_dir))
    accelerator.wait_for_everyone()


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
