"""Bundles on disk: written atomically, read back, verified against their manifest."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .render.manifest import MANIFEST, file_hashes

_EXECUTABLE_SUFFIXES = (".sh", ".sbatch")


class BundleExistsError(Exception):
    """The output directory exists, is not empty, and --force was not given."""


def write_bundle(files: dict[str, str], out_dir: Path, *, force: bool) -> None:
    """Write every file into a temporary sibling directory, then rename it into place.

    A reader never sees half a bundle, and a failure leaves the old one (or nothing) behind.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise BundleExistsError(str(out_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.new-", dir=out_dir.parent))
    old: Path | None = None
    try:
        for name, text in files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            path.chmod(0o755 if name.endswith(_EXECUTABLE_SUFFIXES) else 0o644)
        staging.chmod(0o755)  # mkdtemp makes it private; a bundle is shared with the cluster's users
        if out_dir.exists() or out_dir.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rmdir(old)
            os.rename(out_dir, old)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not out_dir.exists():
            os.rename(old, out_dir)  # put the previous bundle back
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def read_bundle(directory: Path) -> dict[str, str]:
    """Every regular file of a bundle directory, by relative name."""
    directory = Path(directory)
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            files[path.relative_to(directory).as_posix()] = path.read_text(encoding="utf-8", errors="replace")
    return files


def verify_bundle(directory: Path) -> list[str]:
    """What differs from the manifest: changed, missing and unexpected files."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return [f"no {MANIFEST}: not a tunefile bundle"]
    try:
        recorded = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return [f"{MANIFEST} is unreadable"]
    actual = file_hashes(read_bundle(directory))
    problems = []
    for name in sorted(set(recorded) | set(actual)):
        if name not in actual:
            problems.append(f"missing: {name}")
        elif name not in recorded:
            problems.append(f"unexpected: {name}")
        elif actual[name] != recorded[name]:
            problems.append(f"changed: {name}")
    return problems
