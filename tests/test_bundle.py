"""Writing bundles: atomic, never over an existing one without --force, nothing half-written;
verifying them against their manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from plan_factory import make_plan
from tunefile.compiler.bundle import BundleExistsError, read_bundle, verify_bundle, write_bundle
from tunefile.compiler.render import render_bundle

FILES = {"launch.sh": "#!/usr/bin/env bash\n", "job.sbatch": "#!/usr/bin/env bash\n", "config.yaml": "a: 1\n",
         "manifest.json": "{}\n"}


def leftovers(parent: Path) -> list[str]:
    """Temporary siblings (.b.new-*, .b.old-*) that a write left behind."""
    return sorted(path.name for path in parent.iterdir() if path.name.startswith("."))


def test_write_and_read_back(tmp_path: Path) -> None:
    write_bundle(FILES, tmp_path / "b", force=False)
    assert read_bundle(tmp_path / "b") == dict(sorted(FILES.items()))
    assert list(read_bundle(tmp_path / "b")) == sorted(FILES)
    for name in ("launch.sh", "job.sbatch"):
        assert (tmp_path / "b" / name).stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "b" / "config.yaml").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o755
    assert leftovers(tmp_path) == []


def test_parents_are_created(tmp_path: Path) -> None:
    write_bundle(FILES, tmp_path / "x" / "y" / "b", force=False)
    assert read_bundle(tmp_path / "x" / "y" / "b") == dict(sorted(FILES.items()))


def test_existing_bundle_is_kept_without_force(tmp_path: Path) -> None:
    write_bundle(FILES, tmp_path / "b", force=False)
    before = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "b").iterdir()}
    with pytest.raises(BundleExistsError):
        write_bundle({"other": "x"}, tmp_path / "b", force=False)
    assert read_bundle(tmp_path / "b") == dict(sorted(FILES.items()))
    assert {path.name: path.stat().st_mtime_ns for path in (tmp_path / "b").iterdir()} == before
    assert leftovers(tmp_path) == []


def test_a_file_in_the_way_needs_force(tmp_path: Path) -> None:
    (tmp_path / "b").write_text("not a bundle")
    with pytest.raises(BundleExistsError):
        write_bundle(FILES, tmp_path / "b", force=False)
    write_bundle(FILES, tmp_path / "b", force=True)
    assert read_bundle(tmp_path / "b") == dict(sorted(FILES.items()))


def test_force_replaces_the_whole_bundle(tmp_path: Path) -> None:
    write_bundle(FILES, tmp_path / "b", force=False)
    write_bundle({"other": "x\n"}, tmp_path / "b", force=True)
    assert read_bundle(tmp_path / "b") == {"other": "x\n"}  # old files do not linger
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


def test_a_failed_rename_puts_the_old_bundle_back(tmp_path: Path, monkeypatch) -> None:
    write_bundle(FILES, tmp_path / "b", force=False)
    original = os.rename

    def fail_on_staging(source, destination):
        if ".new-" in str(source):
            raise OSError("rename failed")
        return original(source, destination)

    monkeypatch.setattr("tunefile.compiler.bundle._renameat2", lambda: None)  # the two-rename fallback, which can fail
    monkeypatch.setattr(os, "rename", fail_on_staging)
    with pytest.raises(OSError, match="rename failed"):
        write_bundle({"other": "x\n"}, tmp_path / "b", force=True)
    monkeypatch.undo()
    assert read_bundle(tmp_path / "b") == dict(sorted(FILES.items()))
    assert leftovers(tmp_path) == []


def test_a_failed_first_write_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(Path, "chmod", lambda self, mode: (_ for _ in ()).throw(OSError("no")))
    with pytest.raises(OSError):
        write_bundle(FILES, tmp_path / "b", force=False)
    monkeypatch.undo()
    assert sorted(path.name for path in tmp_path.iterdir()) == []


# --- verify ---------------------------------------------------------------------------------------

@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    write_bundle(render_bundle(make_plan("deepspeed")), tmp_path / "b", force=False)
    return tmp_path / "b"


def test_a_fresh_bundle_verifies(bundle: Path) -> None:
    assert verify_bundle(bundle) == []


def test_verify_finds_changed_missing_and_unexpected_files(bundle: Path) -> None:
    with (bundle / "launch.sh").open("a", encoding="utf-8") as file:
        file.write("echo sneaky\n")
    (bundle / "deepspeed.json").unlink()
    (bundle / "notes.txt").write_text("mine\n")
    (bundle / "sub").mkdir()
    (bundle / "sub" / "x").write_text("")
    # In file-name order, so the output reads like a directory listing.
    assert verify_bundle(bundle) == ["missing: deepspeed.json", "changed: launch.sh", "unexpected: notes.txt",
                                     "unexpected: sub/x"]


def test_verify_sees_a_change_of_encoding(bundle: Path) -> None:
    text = (bundle / "README.md").read_text(encoding="utf-8")
    (bundle / "README.md").write_bytes(text.encode("utf-8").replace("×".encode(), b"\xd7"))  # Latin-1 ×
    assert verify_bundle(bundle) == ["changed: README.md"]


def test_verify_without_a_readable_manifest(bundle: Path, tmp_path: Path) -> None:
    (bundle / "manifest.json").write_text("{not json")
    assert verify_bundle(bundle) == ["unreadable: manifest.json"]
    (bundle / "manifest.json").write_text(json.dumps({"files": ["a"]}))
    assert verify_bundle(bundle) == ["unreadable: manifest.json"]
    (bundle / "manifest.json").unlink()
    assert verify_bundle(bundle) == ["missing: manifest.json (not a tunefile bundle)"]
    assert verify_bundle(tmp_path / "nowhere") == ["missing: manifest.json (not a tunefile bundle)"]
