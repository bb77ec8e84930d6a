"""Bundles on disk: written atomically, read back, verified against their manifest.

The only module of the compiler besides the CLI that touches the file system.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .render.manifest import MANIFEST, sha256_hex
from .vendor import describe_archive

# Files held as bytes (the vendored runtime archive): written as they are, shown to diffs as a member listing.
BINARY_SUFFIXES = (".pyz",)

_EXECUTABLE_SUFFIXES = (".sh", ".sbatch")


class BundleExistsError(Exception):
    """The output directory exists, is not empty, and --force was not given."""


def _is_occupied(path: Path) -> bool:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        return True
    return path.is_dir() and any(path.iterdir())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_bundle(files: Mapping[str, str | bytes], out_dir: Path, *, force: bool) -> None:
    """Write every file into a temporary sibling directory, then rename it into place.

    The sibling lives in the same parent, so the rename is atomic: a reader never sees half a
    bundle, and a failure leaves the old bundle (or nothing) behind, with no temporary directory.
    """
    out_dir = Path(out_dir)
    if _is_occupied(out_dir) and not force:
        raise BundleExistsError(f"{out_dir} exists and is not empty; use --force to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.new-", dir=out_dir.parent))
    old: Path | None = None
    try:
        for name, text in sorted(files.items()):
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(text, bytes):
                path.write_bytes(text)
            else:
                path.write_text(text, encoding="utf-8", newline="")  # the bytes the manifest hashed
            path.chmod(0o755 if name.endswith(_EXECUTABLE_SUFFIXES) else 0o644)
        staging.chmod(0o755)  # mkdtemp makes it private; a bundle is shared with the cluster's users
        if out_dir.exists() or out_dir.is_symlink():
            # Move the old bundle aside under a fresh name rather than deleting it first, so that a
            # failed rename below can put it back.
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rmdir(old)
            os.rename(out_dir, old)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not (out_dir.exists() or out_dir.is_symlink()):
            os.rename(old, out_dir)  # put the previous bundle back
        raise
    if old is not None:
        _remove(old)


def read_bundle(directory: Path) -> dict[str, str]:
    """Every regular file of a bundle directory, by relative POSIX name, sorted; the runtime archive as a listing
    of its members and their hashes (so a diff of two bundles names the runtime modules that changed)."""
    directory = Path(directory)
    return {name: describe_archive((directory / name).read_bytes()) if name.endswith(BINARY_SUFFIXES)
            else (directory / name).read_text(encoding="utf-8", errors="replace")
            for name in bundle_file_names(directory)}


def verify_bundle(directory: Path) -> list[str]:
    """What differs from the manifest: ``changed: x``, ``missing: x``, ``unexpected: x``; [] when intact."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return [f"missing: {MANIFEST} (not a tunefile bundle)"]
    try:
        recorded = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
        if not isinstance(recorded, dict):
            raise TypeError("files is not a mapping")
    except (OSError, ValueError, KeyError, TypeError):
        return [f"unreadable: {MANIFEST}"]
    names = [name for name in bundle_file_names(directory) if name != MANIFEST]
    problems = []
    for name in sorted(set(recorded) | set(names)):
        if name not in names:
            problems.append(f"missing: {name}")
        elif name not in recorded:
            problems.append(f"unexpected: {name}")
        else:
            try:
                # The raw bytes, hashed as render.manifest.file_hashes hashed the text's UTF-8 bytes:
                # exact even when someone saved the file in another encoding.
                actual = sha256_hex((directory / name).read_bytes())
            except OSError:
                problems.append(f"unreadable: {name}")
                continue
            if actual != recorded[name]:
                problems.append(f"changed: {name}")
    return problems


def bundle_file_names(directory: Path) -> list[str]:
    """Relative names of every regular file in a directory, sorted."""
    directory = Path(directory)
    return sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.is_file())
