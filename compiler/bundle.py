"""Bundles on disk: written atomically, read back, verified against their manifest.

The only module of the compiler besides the CLI that touches the file system.

Replacing a bundle never leaves its path empty: the new bundle is written into a hidden sibling
(``.NAME.new-XXXXXXXX``), which is then exchanged with the old one in a single rename (Linux renameat2
with RENAME_EXCHANGE), and only then is the old one, now under the hidden name, removed. A process killed
at any instant leaves the old or the new bundle at the path, and at most one hidden sibling that the next
write removes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Collection, Mapping
from functools import cache
from pathlib import Path

from .render.manifest import MANIFEST, sha256_hex
from .vendor import describe_archive

# Files held as bytes (the vendored runtime archive): written as they are, shown to diffs as a member listing.
BINARY_SUFFIXES = (".pyz",)

_EXECUTABLE_SUFFIXES = (".sh", ".sbatch")

# Kernel file systems: writable-looking to root, but no place for files (mkdir fails there, or worse, succeeds).
_KERNEL_FILE_SYSTEMS = (Path("/proc"), Path("/sys"), Path("/dev"))
NAME_MAX = 255  # when the file system does not say (pathconf); Linux's and macOS's usual limit
PATH_MAX = 4096
# The hidden siblings are named ".STEM.new-" + 8 characters of tempfile's alphabet: STEM is the bundle's name
# cut to this many bytes, so the sibling's name stays under the file-name limit whatever the bundle's is.
_STEM_BYTES = 200
_TEMP_SUFFIX = r"(?:new|old)-[a-z0-9_]{8}"  # `old-`: the name earlier versions moved the old bundle to


class BundleExistsError(Exception):
    """The output directory exists, is not empty, and --force was not given."""


class BundleLocationError(Exception):
    """The output path cannot hold a bundle (it is `.`, lies under a file or under /proc, is too long...).
    Raised before anything is written; the message is a sentence that starts with the path."""


def is_occupied(path: Path) -> bool:
    """Something is at PATH: a file, a symlink, or a directory that is not empty."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        return True
    return path.is_dir() and any(path.iterdir())


def is_tunefile_bundle(path: Path) -> bool:
    """PATH is a directory whose manifest.json is a tunefile manifest (a JSON object with a ``files`` mapping)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)


def check_location(out_dir: Path, file_names: Collection[str] = ()) -> None:
    """Raise BundleLocationError when OUT_DIR cannot hold a bundle of FILE_NAMES; reads, never writes."""
    out_dir = Path(out_dir)
    shown = _shorten(str(out_dir))
    if out_dir.name in ("", ".", ".."):
        raise BundleLocationError(f"{shown} is a directory named by '.', '..' or '/'; give the bundle a "
                                  f"directory of its own, such as {os.path.join(out_dir, 'bundle')}")
    real = out_dir.parent.resolve() / out_dir.name  # a symlink at OUT_DIR itself is replaced, not followed
    cwd = Path.cwd()
    if real == cwd or real in cwd.parents:
        raise BundleLocationError(f"{shown} is the current directory or contains it; give the bundle a "
                                  f"directory of its own, such as {os.path.join(out_dir, 'bundle')}")
    for kernel in _KERNEL_FILE_SYSTEMS:
        if real == kernel or kernel in real.parents:
            raise BundleLocationError(f"{shown} is under {kernel}, a kernel file system, not a place for files")
    existing = real.parent
    # The nearest ancestor that exists must be a directory; walked as the user wrote the path, to name it so.
    for ancestor in (out_dir.parent, *out_dir.parent.parents):
        try:
            mode = os.stat(ancestor).st_mode
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):  # missing, or said further up
                continue
            raise BundleLocationError(f"{shown}: cannot reach {_shorten(str(ancestor))}: {exc.strerror}") from None
        if not stat.S_ISDIR(mode):
            raise BundleLocationError(f"{shown}: {_shorten(str(ancestor))} is a file, not a directory")
        existing = ancestor
        break
    name_max = _limit(existing, "PC_NAME_MAX", NAME_MAX)
    for part in real.parts[1:]:
        if len(os.fsencode(part)) > name_max:
            raise BundleLocationError(f"{shown}: the name {_shorten(part)} is {len(os.fsencode(part))} bytes long; "
                                      f"file names here are at most {name_max} bytes")
    longest = max((len(os.fsencode(name)) for name in file_names), default=0)
    path_bytes = len(os.fsencode(str(real))) + 1 + longest + len(".new-XXXXXXXX")
    path_max = _limit(existing, "PC_PATH_MAX", PATH_MAX)
    if path_bytes >= path_max:
        raise BundleLocationError(f"{shown}: the bundle's file paths would be {path_bytes} bytes long; "
                                  f"paths here are shorter than {path_max} bytes")


def _shorten(text: str, width: int = 60) -> str:
    """TEXT, its middle elided when it is longer than WIDTH: a 4,000-byte path stays a one-line message (and
    one with a newline or another control character is shown escaped)."""
    text = text if text.isprintable() else ascii(text)
    return text if len(text) <= width else f"{text[:width // 2]}...{text[-(width // 2 - 3):]}"


def _limit(directory: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(directory, name)
    except (OSError, ValueError):
        return default


def write_bundle(files: Mapping[str, str | bytes], out_dir: Path, *, force: bool) -> None:
    """Write every file into a hidden sibling directory, then exchange it with OUT_DIR in one rename.

    At every instant OUT_DIR holds the old bundle or the new one; a failure leaves the old bundle (or nothing)
    and no hidden sibling; a kill leaves at most one hidden sibling, which the next write to OUT_DIR removes.
    Raises BundleLocationError (before writing anything) when OUT_DIR cannot hold a bundle, BundleExistsError
    when it holds something and FORCE is not set, OSError when a write fails (a full disk)."""
    out_dir = Path(out_dir)
    check_location(out_dir, files)
    if is_occupied(out_dir) and not force:
        raise BundleExistsError(f"{out_dir} exists and is not empty; use --force to replace it")
    remove_leftovers(out_dir)
    created = _make_parents(out_dir)
    try:
        staging = Path(tempfile.mkdtemp(prefix=_temp_prefix(out_dir) + "new-", dir=out_dir.parent))
    except OSError as exc:
        _remove_created(created)
        raise BundleLocationError(f"{_shorten(str(out_dir))}: cannot create a directory in its parent: "
                                  f"{exc.strerror}") from None
    lock = _lock(staging)  # tells a concurrent write's remove_leftovers that this sibling is in use
    holds_old = False
    try:
        _write_files(files, staging)
        staging.chmod(0o755)  # mkdtemp makes it private; a bundle is shared with the cluster's users
        if out_dir.exists() or out_dir.is_symlink():
            staging = _exchange(staging, out_dir)
            holds_old = True
        else:
            os.rename(staging, out_dir)
    except BaseException:
        _remove_tree(staging)
        _remove_created(created)
        raise
    finally:
        if lock is not None:
            os.close(lock)
    if holds_old:
        _remove_tree(staging)


def _write_files(files: Mapping[str, str | bytes], directory: Path) -> None:
    # The manifest first: a hidden sibling that a kill left behind is then empty or holds a manifest, which is
    # what remove_leftovers asks before it deletes a directory (nothing of the user's looks like that).
    for name, text in sorted(files.items(), key=lambda item: (item[0] != MANIFEST, item[0])):
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8", newline="")  # the bytes the manifest hashed
        path.chmod(0o755 if name.endswith(_EXECUTABLE_SUFFIXES) else 0o644)


def _temp_prefix(out_dir: Path) -> str:
    return f".{os.fsdecode(os.fsencode(out_dir.name)[:_STEM_BYTES])}."


def _make_parents(out_dir: Path) -> list[Path]:
    """Create OUT_DIR's missing parents; the ones created, outermost first, so a failure can take them back."""
    missing = [parent for parent in (out_dir.parent, *out_dir.parent.parents) if not parent.exists()][::-1]
    created: list[Path] = []
    for parent in missing:
        try:
            parent.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            _remove_created(created)
            raise BundleLocationError(f"{_shorten(str(out_dir))}: cannot create {_shorten(str(parent))}: "
                                      f"{exc.strerror}") from None
        created.append(parent)
    return created


def _remove_created(created: list[Path]) -> None:
    for parent in reversed(created):
        with contextlib.suppress(OSError):
            parent.rmdir()


def _lock(directory: Path) -> int | None:
    """An exclusive flock on DIRECTORY, held until the descriptor is closed (or the process dies)."""
    import fcntl

    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise
    except OSError:  # a file system without locks (some NFS mounts): go on unlocked
        pass
    return descriptor


def remove_leftovers(out_dir: Path) -> list[str]:
    """Remove the hidden siblings that an interrupted write to OUT_DIR left: only directories named exactly as
    write_bundle names them, that are empty or hold a manifest.json, and that no live write has locked.
    Returns their names."""
    out_dir = Path(out_dir)
    pattern = re.compile(re.escape(_temp_prefix(out_dir)) + _TEMP_SUFFIX)
    try:
        entries = [entry for entry in os.scandir(out_dir.parent) if pattern.fullmatch(entry.name)]
    except OSError:
        return []
    removed = []
    for entry in entries:
        path = Path(entry.path)
        if not entry.is_dir(follow_symlinks=False) or not _is_own_leftover(path):
            continue
        try:
            lock = _lock(path)
        except BlockingIOError:
            continue  # a write in progress
        try:
            _remove_tree(path)
        finally:
            if lock is not None:
                os.close(lock)
        removed.append(entry.name)
    return removed


def _is_own_leftover(path: Path) -> bool:
    """PATH holds a manifest.json (a regular file) or nothing at all."""
    try:
        return not any(path.iterdir()) or stat.S_ISREG(os.lstat(path / MANIFEST).st_mode)
    except OSError:
        return False


def _remove_tree(path: Path) -> None:
    """Remove a bundle directory, its manifest last: a removal cut short leaves a directory that holds its
    manifest, or an empty one, which remove_leftovers recognises."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
        return
    try:
        children = [child for child in path.iterdir() if child.name != MANIFEST]
    except FileNotFoundError:
        return
    for child in children:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                child.unlink()
    with contextlib.suppress(OSError):
        if not any(child.name != MANIFEST for child in path.iterdir()):
            (path / MANIFEST).unlink(missing_ok=True)
            path.rmdir()


# --- exchanging two paths in one rename --------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
# Errors that mean "this kernel or file system cannot exchange", not "this exchange failed".
_NO_EXCHANGE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


@cache
def _renameat2() -> Callable[..., int] | None:
    """libc's renameat2, looked up on the first exchange (only a write over an existing bundle needs it, so a
    compile into a new folder does not pay for importing ctypes)."""
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+, musl 1.2.5+
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _last_errno() -> int:
    """The errno of the last libc call made through ctypes (ctypes is loaded by then: _renameat2 loaded it)."""
    import ctypes

    return ctypes.get_errno()


def _exchange(new: Path, current: Path) -> Path:
    """Put NEW at CURRENT's path; returns the path that now holds what CURRENT held (to be removed).

    renameat2(RENAME_EXCHANGE) swaps the two names in one step, so CURRENT's path is never empty. Where the
    kernel or file system cannot (not Linux, an old kernel, some network file systems), two renames: the old
    bundle moves aside, the new one moves in, and for the microseconds between them the path is empty; a kill
    there leaves the old bundle under a hidden name, which the next write removes."""
    renameat2 = _renameat2()
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(current), _RENAME_EXCHANGE) == 0:
            return new
        code = _last_errno()
        if code not in _NO_EXCHANGE:
            raise OSError(code, os.strerror(code), str(current))
    return _swap_by_two_renames(new, current)


def _swap_by_two_renames(new: Path, current: Path) -> Path:
    aside = Path(tempfile.mkdtemp(prefix=_temp_prefix(current) + "old-", dir=current.parent))
    os.rmdir(aside)
    os.rename(current, aside)
    try:
        os.rename(new, current)
    except BaseException:
        os.rename(aside, current)  # put the previous bundle back
        raise
    return aside


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
