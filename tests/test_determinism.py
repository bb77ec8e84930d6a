"""Same input, same bytes: every golden case compiled twice, from different working
directories and hash seeds, in separate processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import GOLDEN_CONFIGS, REPO
from tunefile.compiler.bundle import read_bundle
from tunefile.compiler.review import find_configs

TUNEFILE = [sys.executable, "-m", "tunefile.compiler.cli"]


def compile_all(out: Path, cwd: Path, hash_seed: str) -> dict[str, dict[str, str]]:
    bundles = {}
    for config in find_configs(GOLDEN_CONFIGS):
        target = out / config.stem
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([*TUNEFILE, "compile", str(config), "--output", str(target)], cwd=cwd, env=env,
                       check=True, capture_output=True, text=True)
        bundles[config.stem] = read_bundle(target)
    return bundles


def test_bundles_are_byte_identical_across_cwd_and_hash_seed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    first = compile_all(tmp_path / "a", REPO, "1")
    second = compile_all(tmp_path / "b", elsewhere, "4242")
    assert first.keys() == second.keys() and len(first) >= 12
    for case in first:
        assert first[case] == second[case], f"{case} differs between runs"


def test_no_absolute_paths_or_timestamps_leak(tmp_path: Path) -> None:
    bundles = compile_all(tmp_path / "c", tmp_path, "7")
    for case, files in bundles.items():
        for name, text in files.items():
            assert str(tmp_path) not in text and str(REPO) not in text, f"{case}/{name} holds an absolute path"
            assert os.environ.get("HOME", "/nonexistent-home") not in text or os.environ.get("HOME") == "/", name
