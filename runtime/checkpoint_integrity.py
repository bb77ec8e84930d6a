"""What makes a checkpoint trustworthy: the `COMPLETE` marker lists every file with its size and sha256, and a
checkpoint is used only when its files still match (and its resume state loads, checkpoint.py).

The marker is JSON, ``{"step": N, "files": {"relative/path": {"bytes": n, "sha256": "..."}}}``, written inside the
temp directory before the rename that publishes the checkpoint, so a `checkpoint-<step>` folder with a marker
always had every file on disk (each fsynced) first. Markers written before hashes existed hold only the step
("N\\n"): such a checkpoint is complete but unverified; it is still used, and a file of it that fails to load
rejects it then (checkpoint.py).

Also here: telling a full disk from other write failures (torch.save reports one as a RuntimeError and safetensors
as a SafetensorError, neither an OSError) and saying sizes in words.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

COMPLETE = "COMPLETE"
MARKER_VERSION = 2  # 1: the step alone, no file list
# Files written into a complete checkpoint after its marker (preemption's STOPPED_EARLY): not part of the record.
NOT_RECORDED = frozenset({COMPLETE, "STOPPED_EARLY"})
HASH_BLOCK = 8 << 20
# hashlib releases the GIL while it hashes a block, so a few threads read and hash several shards at once.
HASH_THREADS = 8
# A write that failed with less than this left free failed because the disk filled: torch.save's error only says
# "unexpected pos" or "file write failed". A full disk stays within a few blocks of empty after the failed write.
NEARLY_FULL_BYTES = 16 << 20
DISK_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


@dataclass(frozen=True)
class Marker:
    """What a `COMPLETE` marker says: the step, and each file's (bytes, sha256) or None for an old marker."""

    step: int
    files: dict[str, tuple[int, str]] | None


def _file_record(path: Path, *, sync: bool = True) -> tuple[int, str]:
    """(size, sha256) of ``path``; ``sync``: fsynced on the way, as the marker must not reach the disk first."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK), b""):
            digest.update(block)
        if sync:
            os.fsync(handle.fileno())
    return path.stat().st_size, digest.hexdigest()


def _recorded_paths(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*")
                  if path.is_file() and path.relative_to(directory).as_posix() not in NOT_RECORDED)


def record_files(directory: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``directory`` (sub-folders too: FSDP and DeepSpeed shard into them) → (bytes, sha256)."""
    paths = _recorded_paths(directory)
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        records = list(pool.map(_file_record, paths))
    return {path.relative_to(directory).as_posix(): record for path, record in zip(paths, records, strict=True)}


def write_marker(directory: Path, step: int) -> None:
    """Record every file of ``directory`` in its `COMPLETE` marker, durably."""
    files = record_files(directory)
    text = json.dumps({"version": MARKER_VERSION, "step": step,
                       "files": {name: {"bytes": size, "sha256": sha} for name, (size, sha) in files.items()}},
                      indent=1, sort_keys=True) + "\n"
    with (directory / COMPLETE).open("w", encoding="utf-8") as marker:
        marker.write(text)
        marker.flush()
        os.fsync(marker.fileno())


def read_marker(directory: Path) -> Marker:
    """The marker of ``directory``; ValueError (one line) when it is neither form."""
    try:
        text = (directory / COMPLETE).read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"its {COMPLETE} marker is not text") from None
    if text.isdigit():
        return Marker(int(text), None)
    try:
        data = json.loads(text)
        files = {str(name): (int(entry["bytes"]), str(entry["sha256"])) for name, entry in data["files"].items()}
        return Marker(int(data["step"]), files)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"its {COMPLETE} marker is unreadable (torn or edited)") from None


def mismatched_file(directory: Path, files: dict[str, tuple[int, str]]) -> str | None:
    """The first recorded file that is missing or changed, as a phrase; None when every one matches. Sizes are
    checked for all before any is hashed: a truncated file is found without reading the others."""
    for name, (size, _) in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size:,} bytes, {size:,} were saved (truncated or overwritten)"
    names = sorted(files)
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        actual = list(pool.map(lambda name: _file_record(directory / name, sync=False)[1], names))
    for name, sha in zip(names, actual, strict=True):
        if sha != files[name][1]:
            return f"{name} does not match its recorded sha256 (corrupted)"
    return None


def torn_file(directory: Path) -> str | None:
    """For a checkpoint whose marker records no hashes: the first file whose own structure says it is cut short,
    as a phrase; None when none does. Cheap (headers and zip directories only): a safetensors header names where
    its data ends, and torch.save writes a zip whose directory sits at the end of the file."""
    for path in _recorded_paths(directory):
        name = path.relative_to(directory).as_posix()
        if path.suffix == ".safetensors":
            problem = safetensors_problem(path)
        elif path.suffix in (".bin", ".pt", ".pth", ".pkl"):
            problem = None if zipfile.is_zipfile(path) else "is not a whole torch.save file"
        else:
            continue
        if problem is not None:
            return f"{name} {problem} (truncated or corrupted)"
    return None


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a .safetensors file's header or size (a truncated or garbled copy); None if whole."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8 or int.from_bytes(head, "little") > size - 8:
            return "has no whole safetensors header"
        header_len = int.from_bytes(head, "little")
        try:
            header = json.loads(handle.read(header_len))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
                      default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return "has an unreadable safetensors header"
    if 8 + header_len + end != size:
        return f"has {size:,} bytes, its header describes {8 + header_len + end:,}"
    return None


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``directory`` (or its parent)."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return shutil.disk_usage(directory).free


def is_disk_full(exc: BaseException, directory: Path) -> bool:
    """Did this write fail because the disk (or the user's quota) is full?"""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(seen) for words in DISK_FULL_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(exc, (OSError, RuntimeError)) and type(exc).__name__ != "SafetensorError":
        return False  # not a failed write: a bug, whatever the disk holds
    try:
        return free_bytes(directory) < NEARLY_FULL_BYTES
    except OSError:
        return False


def in_words(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def disk_full_message(output_dir: Path, step: int, *, written: int, newest: Path | None) -> str:
    """The one line for a save that filled the disk: what a checkpoint needs (the size of ``newest``, the newest
    complete one, or more than the ``written`` bytes when there is none yet) and what is free."""
    if newest is not None:
        needed = f"needs about {in_words(directory_bytes(newest))} (the size of {newest.name})"
        then = f"run again to resume from {newest.name}"
    else:
        needed = f"needs more than the {in_words(written)} written before the disk filled"
        then = "run again"
    return (f"no space left on the disk of {output_dir} while saving checkpoint-{step}: a checkpoint {needed}, "
            f"{in_words(free_bytes(output_dir))} free; the partial checkpoint was removed and the complete ones "
            f"are untouched; free space (or lower save_total_limit) and {then}")


def final_model_disk_full_message(output_dir: Path, *, written: int, newest: Path | None) -> str:
    """The one line for a final model that filled the disk: training is done, but only the checkpoints hold it."""
    then = f"run again: it resumes from {newest.name} and saves the model" if newest is not None else \
        "run again (no checkpoint holds this run's training)"
    return (f"no space left on the disk of {output_dir} while saving the final model: it needs more than the "
            f"{in_words(written)} written before the disk filled, {in_words(free_bytes(output_dir))} free; its "
            f"partial files were removed and the checkpoints are untouched; free space and {then}")


def fsync_directory(directory: Path) -> None:
    """A rename in ``directory`` made durable (POSIX: entries are on disk once the directory is fsynced)."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
