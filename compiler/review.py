"""Review tools over bundles held as {relative name: text}: diff two of them, check golden copies."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from .bundle import BundleLocationError, read_bundle, write_bundle
from .cli_common import output_problem
from .errors import ConfigError
from .pipeline import Sources, TargetOptions, compile_config

CONFIG_SUFFIXES = (".yml", ".yaml")


def unified_bundle_diff(old: dict[str, str], new: dict[str, str], old_label: str, new_label: str) -> str:
    """A unified diff of every file in either bundle; empty when they are identical."""
    chunks = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        chunks.extend(difflib.unified_diff(
            (before or "").splitlines(keepends=True),
            (after or "").splitlines(keepends=True),
            fromfile=f"{old_label}/{name}" if before is not None else "/dev/null",
            tofile=f"{new_label}/{name}" if after is not None else "/dev/null",
        ))
    return "".join(chunk if chunk.endswith("\n") else chunk + "\n" for chunk in chunks)


def load_side(argument: Path, options: TargetOptions, sources: Sources) -> dict[str, str]:
    """A bundle directory is read as it is; a config file is compiled in memory."""
    if argument.is_dir():
        return read_bundle(argument)
    return compile_config(argument, options, sources).files


@dataclass(frozen=True)
class GoldenResult:
    case: str
    status: str  # "same", "different", "missing", "updated", "invalid"
    diff: str = ""


def find_configs(configs_dir: Path) -> list[Path]:
    return sorted(path for path in configs_dir.iterdir() if path.is_file() and path.suffix in CONFIG_SUFFIXES)


def check_golden(configs_dir: Path, golden_dir: Path, options: TargetOptions, *, update: bool) -> list[GoldenResult]:
    """Compile each config in configs_dir and compare it with golden_dir/<config stem>/.

    A config that does not compile is reported as "invalid" with its located errors.
    """
    results = []
    for config in find_configs(configs_dir):
        case = config.stem
        sources = Sources()
        try:
            files = compile_config(config, options, sources).files
        except ConfigError as exc:
            errors = "\n".join(sources.format(problem) for problem in exc.problems)
            results.append(GoldenResult(case, "invalid", errors + "\n"))
            continue
        expected_dir = golden_dir / case
        expected = read_bundle(expected_dir) if expected_dir.is_dir() else None
        if expected == files:
            results.append(GoldenResult(case, "same"))
        elif update:
            try:
                write_bundle(files, expected_dir, force=True)
            except (BundleLocationError, OSError) as exc:  # a golden folder that cannot hold it, a full disk
                raise ConfigError([output_problem(exc, flag=f"check --update ({expected_dir})")]) from None
            results.append(GoldenResult(case, "updated"))
        elif expected is None:
            results.append(GoldenResult(case, "missing"))
        else:
            diff = unified_bundle_diff(expected, files, f"golden/{case}", f"compiled/{case}")
            results.append(GoldenResult(case, "different", diff))
    return results
