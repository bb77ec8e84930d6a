"""Tensors out of the checkpoints FSDP and DeepSpeed write, read by name in one CPU process with no process group.

`accelerator.save_state` (accelerate 1.15) writes the model into `checkpoint-<step>/` in one of three layouts:
- FSDP with SHARDED_STATE_DICT: `pytorch_model_fsdp_0/`, a torch.distributed.checkpoint (DCP) folder holding
  ``{"model": state_dict}`` (accelerate.utils.fsdp_utils.save_fsdp_model, use_dcp=True, the default);
- FSDP with FULL_STATE_DICT: `pytorch_model_fsdp.bin`, rank 0's ``torch.save`` of the gathered state dict;
- DeepSpeed: ``engine.save_checkpoint(dir, tag="pytorch_model")``: `latest` names the tag folder, which holds
  `*_model_states.pt` and each rank's `*_optim_states.pt` with its partition of the fp32 master weights.

Each holds the whole model (the frozen base too) under the wrapped peft model's parameter names. Merging needs
a few megabytes of it (the adapter, sometimes the embedding matrices), so readers list names and shapes from
the metadata and read only the tensors asked for:
- DCP: ``FileSystemReader.read_metadata`` lists them; public ``dcp.load(..., no_dist=True)`` fills tensors we
  allocate for the requested names only, reading just their byte ranges of the ``.distcp`` files;
- the full file: ``torch.load(mmap=True)`` maps it, and only the tensors used are ever paged in;
- DeepSpeed: its own ``get_fp32_state_dict_from_zero_checkpoint`` (lazy_mode: the fp32 optimizer files are
  memory-mapped and ZeRO-3 partitions gathered only for the names read). It loads every `*_model_states.pt`
  whole, and those hold the frozen base (whole for ZeRO-2, in partitions for ZeRO-3): host memory must take
  the base model once, in the dtype it trained in. Nothing public reads less.
"""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
from collections.abc import Collection
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .model import ModelLoadError

# accelerate.utils.constants: FSDP_MODEL_NAME, and MODEL_NAME (the DeepSpeed tag). Copied, not imported: importing
# accelerate costs seconds; tests/test_merge_sharded_checkpoints.py checks that they still match.
FSDP_MODEL_NAME = "pytorch_model_fsdp"
DEEPSPEED_TAG = "pytorch_model"
DCP_TOP_KEY = "model"  # save_fsdp_model wraps the state dict: dist_cp.save(state_dict={"model": state_dict})
DEEPSPEED_LATEST = "latest"

# Wrappers that prefix or splice parameter names: DDP/DeepSpeed's `module.`, torch.compile's `_orig_mod.`,
# FSDP1's `_fsdp_wrapped_module.`, activation checkpointing's `_checkpoint_wrapped_module.`.
WRAPPER_PARTS = re.compile(r"(^|\.)(_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)(?=\.)")


def training_name(key: str) -> str:
    """``key`` as the unwrapped peft model names the parameter (what ``named_parameters()`` says)."""
    return WRAPPER_PARTS.sub("", key.removeprefix("module.")).lstrip(".")


def _last_line(exc: BaseException) -> str:
    """The line of a (often multi-line, nested) reader error that says what went wrong."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


class CheckpointTensors:
    """Names and shapes of the tensors a checkpoint holds; ``read`` loads the ones asked for."""

    kind = ""  # what wrote it, for messages

    def __init__(self, path: Path) -> None:
        self.path = path  # the file or folder messages name

    def shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def read(self, names: Collection[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class DcpTensors(CheckpointTensors):
    kind = "FSDP, SHARDED_STATE_DICT"

    @cached_property
    def _entries(self) -> dict[str, tuple[str, Any]]:
        """training name → (the name inside {"model": …}, its TensorStorageMetadata)."""
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        try:
            metadata = FileSystemReader(str(self.path)).read_metadata()
        except Exception as exc:  # a truncated or foreign .metadata: pickle, OS or format errors alike
            raise ModelLoadError(f"{self.path}: cannot read the checkpoint's metadata: {exc}") from None
        prefix = DCP_TOP_KEY + "."
        return {training_name(key.removeprefix(prefix)): (key.removeprefix(prefix), entry)
                for key, entry in metadata.state_dict_metadata.items()
                if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(entry.size) for name, (_, entry) in self._entries.items()}

    def read(self, names: Collection[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        # Allocated here, filled by DCP: it reads every shard's piece of these tensors and nothing else.
        wanted = {name: self._entries[name] for name in names}
        inner = {key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype) for key, entry in wanted.values()}
        with warnings.catch_warnings():  # no_dist=True is the point; DCP warns about it anyway
            warnings.simplefilter("ignore", UserWarning)
            try:
                dcp.load({DCP_TOP_KEY: inner}, storage_reader=dcp.FileSystemReader(str(self.path)),
                         planner=dcp.DefaultLoadPlanner(), no_dist=True)
            except Exception as exc:  # a truncated or missing .distcp shard: DCP wraps each rank's error its way
                raise ModelLoadError(f"{self.path}: cannot read the checkpoint's tensors: {_last_line(exc)}") from None
        return {name: inner[key] for name, (key, _) in wanted.items()}


class TorchSaveTensors(CheckpointTensors):
    kind = "FSDP, FULL_STATE_DICT"

    @cached_property
    def _state(self) -> dict[str, torch.Tensor]:
        try:
            state = torch.load(str(self.path), map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # not a torch.save zip, truncated, or pickled objects weights_only refuses
            raise ModelLoadError(f"{self.path}: cannot read it as a saved state dict: {exc}") from None
        return {training_name(key): value for key, value in state.items() if isinstance(value, torch.Tensor)}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(value.shape) for name, value in self._state.items()}

    def read(self, names: Collection[str]) -> dict[str, torch.Tensor]:
        return {name: self._state[name] for name in names}


class ZeroTensors(CheckpointTensors):
    kind = "DeepSpeed ZeRO"

    def __init__(self, checkpoint_dir: Path, tag: str) -> None:
        super().__init__(checkpoint_dir / tag)
        self.checkpoint_dir, self.tag = checkpoint_dir, tag

    @property
    def stage3(self) -> bool:
        return any(self.path.glob("zero_pp_rank_*_model_states.pt"))  # ZeRO-1/2 write mp_rank_00_model_states.pt

    @cached_property
    def _state(self) -> dict[str, Any]:
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError:
            raise ModelLoadError(f"{self.checkpoint_dir}: a DeepSpeed checkpoint; reading it needs deepspeed: "
                                 "pip install 'tunefile[deepspeed]'") from None
        try:
            # The reader prints its progress; stdout is for the command's result (and inference's replies).
            with contextlib.redirect_stdout(sys.stderr):
                # ZeRO-2 keeps frozen weights whole, so including them costs nothing; ZeRO-3 would concatenate
                # every frozen partition into a second copy of the base, so they are left out there.
                state = get_fp32_state_dict_from_zero_checkpoint(str(self.checkpoint_dir), tag=self.tag,
                                                                 exclude_frozen_parameters=self.stage3,
                                                                 lazy_mode=True)
        except Exception as exc:  # a truncated or foreign file: pickle, zip, OS and DeepSpeed's own errors alike
            raise ModelLoadError(f"{self.path}: cannot read the DeepSpeed checkpoint: {_last_line(exc)}") from None
        return {training_name(key): value for key, value in state.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(value.shape) for name, value in self._state.items()}

    def read(self, names: Collection[str]) -> dict[str, torch.Tensor]:
        # Lazy entries are DeepSpeed's GatheredTensor (ZeRO-3) or views of the fp32 flat groups: .contiguous()
        # gathers or copies just this tensor.
        return {name: self._state[name].contiguous() for name in names}


def find_sharded_checkpoint(directory: Path) -> CheckpointTensors | None:
    """The FSDP or DeepSpeed model state in ``directory`` (a checkpoint-<step> folder), None when there is none."""
    sharded = directory / f"{FSDP_MODEL_NAME}_0"
    if (sharded / ".metadata").is_file():
        return DcpTensors(sharded)
    full = directory / f"{FSDP_MODEL_NAME}.bin"
    if full.is_file():
        return TorchSaveTensors(full)
    latest = directory / DEEPSPEED_LATEST
    tag = latest.read_text(encoding="utf-8").strip() if latest.is_file() else DEEPSPEED_TAG
    if tag and any((directory / tag).glob("*_model_states.pt")):
        return ZeroTensors(directory, tag)
    return None


LAYOUTS_READ = (f"model.safetensors (single GPU or DDP), {FSDP_MODEL_NAME}_0/ or {FSDP_MODEL_NAME}.bin (FSDP), "
                f"{DEEPSPEED_LATEST} and {DEEPSPEED_TAG}/*_model_states.pt (DeepSpeed)")
