"""The runtime a bundle carries: ``tunefile.runtime`` and ``tunefile.schemas`` in one deterministic zip archive.

``launch.sh`` puts the archive first on PYTHONPATH, so Python's zipimport loads the bundle's own runtime:
it wins over an installed tunefile, and the bundle runs where tunefile is not installed at all. Nothing of
the compiler goes in (the runtime never imports it; tests/test_vendored_bundle.py imports the archive where
tunefile is absent).

Same sources, same bytes: members in sorted order, a fixed timestamp and fixed permissions, no compression
(deflate's output depends on the zlib build, which differs between machines) and no bytecode (it depends on
the Python version). The archive holds the package directories as entries of their own: zipimport needs
them to see ``tunefile`` as a namespace package, so an installed ``tunefile.compiler`` can sit beside it.

Reading the sources is reading the compiler's own installed package, as the templates are: it is no host
state, and identical tunefile sources give identical archives on every machine. The files are found through
the import system's spec of each package, which runs none of the package's code: the compiler never imports
the runtime.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# The packages the runtime needs, and the data files of each that an installed wheel holds (pyproject.toml's
# package-data): the runtime reads no data files today; schemas/ ships its JSON Schema.
VENDORED_PACKAGES = {"tunefile.runtime": ("*.py",), "tunefile.schemas": ("*.py", "*.json")}
# 1980-01-01, the earliest time a zip entry can hold: a constant, not the files' mtimes.
FIXED_DATE_TIME = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o100644  # a regular file, rw-r--r--
DIRECTORY_MODE = 0o040755  # a directory, rwxr-xr-x
UNIX = 3  # the zip "made by" system, so unzip reads the modes above

# `python tunefile-runtime-<version>.pyz COMMAND …` runs the runtime too (a zipapp), as
# `python -m tunefile.runtime COMMAND …` does with the archive on PYTHONPATH.
ZIPAPP_MAIN = '''\
"""`python tunefile-runtime-<version>.pyz COMMAND ...` = `python -m tunefile.runtime COMMAND ...`."""
import runpy

runpy.run_module("tunefile.runtime", run_name="__main__", alter_sys=True)
'''


@dataclass(frozen=True)
class RuntimeArchive:
    """The archive's file name in the bundle, its bytes and what the README and manifest say of it."""

    name: str
    data: bytes
    version: str
    members: tuple[str, ...]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def archive_name(version: str) -> str:
    return f"tunefile-runtime-{version}.pyz"


def _walk(root: Path, patterns: tuple[str, ...], prefix: str) -> dict[str, bytes]:
    """Every file under ROOT matching one of PATTERNS (recursively, caches skipped), by its name in the zip."""
    found: dict[str, bytes] = {}
    for entry in root.iterdir():
        name = f"{prefix}/{entry.name}"
        if entry.is_dir():
            if entry.name != "__pycache__" and not entry.name.startswith("."):
                found.update(_walk(entry, patterns, name))
        elif any(_matches(entry.name, pattern) for pattern in patterns):
            found[name] = entry.read_bytes()
    return found


def _matches(name: str, pattern: str) -> bool:
    return name.endswith(pattern.removeprefix("*")) and not name.startswith(".")


def package_folder(package: str) -> Path:
    """Where an installed package's files are, found without running its ``__init__``.

    ``importlib.resources.files`` would import the package, and ``tunefile/runtime/__init__.py`` is runtime
    code (it sets up logging for the trainer). The spec names the folder for an installed wheel and for an
    editable install's package-dir mapping alike."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{package} is not an installed package; reinstall tunefile", name=package)
    return Path(next(iter(spec.submodule_search_locations)))


def runtime_sources() -> dict[str, bytes]:
    """The vendored packages' files by their path inside the archive (``tunefile/runtime/train.py``)."""
    sources: dict[str, bytes] = {}
    for package, patterns in VENDORED_PACKAGES.items():
        sources.update(_walk(package_folder(package), patterns, package.replace(".", "/")))
    return sources


def _directories(names: list[str]) -> list[str]:
    """``tunefile/``, ``tunefile/runtime/``, …: every folder that holds a member, each once."""
    folders = set()
    for name in names:
        parts = name.split("/")[:-1]
        folders.update("/".join(parts[:depth]) + "/" for depth in range(1, len(parts) + 1))
    return sorted(folders)


def build_archive(sources: dict[str, bytes]) -> bytes:
    """A zip of SOURCES (name → bytes) and their folders, byte-identical for identical input."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        files = {**sources, "__main__.py": ZIPAPP_MAIN.encode()}
        for name in sorted([*_directories(list(files)), *files]):
            info = zipfile.ZipInfo(name, date_time=FIXED_DATE_TIME)
            info.create_system = UNIX
            info.external_attr = (DIRECTORY_MODE if name.endswith("/") else FILE_MODE) << 16
            info.compress_type = zipfile.ZIP_STORED
            archive.writestr(info, b"" if name.endswith("/") else files[name])
    return buffer.getvalue()


@lru_cache(maxsize=4)
def runtime_archive(version: str) -> RuntimeArchive:
    """The archive of the installed tunefile's runtime (built once per process: every compile carries it)."""
    sources = runtime_sources()
    return RuntimeArchive(name=archive_name(version), data=build_archive(sources), version=version,
                          members=tuple(sorted(sources)))


def describe_archive(data: bytes) -> str:
    """A text stand-in for the binary archive, for diffs and golden comparisons: each member's sha256 and name,
    so a diff names the runtime modules that changed."""
    lines = [f"zip archive, {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}"]
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            lines += [f"{hashlib.sha256(archive.read(info)).hexdigest()}  {info.filename}"
                      for info in archive.infolist() if not info.is_dir()]
    except zipfile.BadZipFile:
        lines.append("(not a readable zip archive)")
    return "\n".join(lines) + "\n"
