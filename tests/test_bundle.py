"""Writing bundles: atomic, never over an existing one without --force, nothing half-written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunefile.compiler.bundle import BundleExistsError, read_bundle, write_bundle

FILES = {"launch.sh": "#!/usr/bin/env bash\n", "config.yaml": "a: 1\n", "manifest.json": "{}\n"}


def leftovers(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.iterdir() if path.name.startswith("."))


def test_write_and_read_back(tmp_path: Path) -> None:
    write_bundle(FILES, tmp_path / "b", force=False)
    assert read_bundle(tmp_path / "b") == dict(sorted(FILES.items()))
    assert (tmp_path / "b" / "launch.sh").stat().st_mode & 0o111
    assert not (tmp_path / "b" / "config.yaml").stat().st_mode & 0o111
    assert leftovers(tmp_path) == []


def test_existing_bundle_needs_force(tmp_path: Path) -> None:
    write_bundle(FILES, tmp_path / "b", force=False)
    with pytest.raises(BundleExistsError):
        write_bundle({"other": "x"}, tmp_path / "b", force=False)
    assert read_bundle(tmp_path / "b") == dict(sorted(FILES.items()))
    write_bundle({"other": "x\n"}, tmp_path / "b", force=True)
    assert read_bundle(tmp_path / "b") == {"other": "x\n"}
    assert leftovers(tmp_path) == []


def test_an_empty_directory_is_used_without_force(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    write_bundle(FILES, tmp_path / "b", force=False)
    assert (tmp_path / "b" / "launch.sh").is_file()


def test_a_failure_leaves_the_old_bundle_and_no_temporary_files(tmp_path: Path, monkeypatch) -> None:
    write_bundle(FILES, tmp_path / "b", force=False)
    original = Path.write_text

    def fail_on_config(self: Path, *args, **kwargs):
        if self.name == "config.yaml":
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", fail_on_config)
    with pytest.raises(OSError, match="disk full"):
        write_bundle({"launch.sh": "new\n", "config.yaml": "new\n"}, tmp_path / "b", force=True)
    monkeypatch.undo()
    assert read_bundle(tmp_path / "b") == dict(sorted(FILES.items()))
    assert leftovers(tmp_path) == []


def test_a_failed_first_write_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(Path, "chmod", lambda self, mode: (_ for _ in ()).throw(OSError("no")))
    with pytest.raises(OSError):
        write_bundle(FILES, tmp_path / "b", force=False)
    monkeypatch.undo()
    assert sorted(path.name for path in tmp_path.iterdir()) == []
