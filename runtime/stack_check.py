"""Is this machine's software what the bundle was resolved for? (manifest.json's "stack")

`train` checks it first, in every rank's own Python (the one accelerate runs, which a `python3` in launch.sh
might not be), before it reads data or loads a model; `python -m tunefile.runtime check-stack manifest.json`
checks it alone. It reads installed package metadata (importlib.metadata) and imports none of the packages,
so it takes a fraction of a second. The rules are the compiler's
(compiler/stack.py writes them into manifest.json's "stack"): ``==2.13.*`` same major.minor, ``>=0.21.2``
at least, ``any`` installed. Every mismatch is reported in one line; TUNEFILE_SKIP_STACK_CHECK=1 skips the check
(for a site that knows better, e.g. a patched build).
"""

from __future__ import annotations

import json
import os
import re
import sys
from importlib import metadata
from pathlib import Path

from .errors import RuntimeUserError

SKIP_VARIABLE = "TUNEFILE_SKIP_STACK_CHECK"
RELEASE = re.compile(r"\d+(?:\.\d+)*")


class StackMismatch(RuntimeUserError):
    """An installed package misses the version the bundle was resolved for (or is not installed). Every rank of a
    node finds the same; the node's first rank prints it (another node may differ, so each node speaks)."""

    once_per_node = True


def release(version: str) -> tuple[int, ...] | None:
    """``2.13.0+cpu`` → (2, 13, 0); pre-releases count as their release (``2.13.0rc1`` → (2, 13, 0))."""
    match = RELEASE.match(version.strip().lstrip("vV"))
    return tuple(int(part) for part in match.group(0).split(".")) if match else None


def satisfies(installed: str, requires: str) -> bool:
    """Whether INSTALLED meets REQUIRES: ``any``, ``>=X[.Y…]`` or ``==X.Y.*``."""
    if requires == "any":
        return True
    have = release(installed)
    if have is None:
        return False
    if requires.startswith(">="):
        wanted = release(requires[2:])
        if wanted is None:
            raise ValueError(f"unreadable requirement {requires!r}")
        width = max(len(have), len(wanted))
        return have + (0,) * (width - len(have)) >= wanted + (0,) * (width - len(wanted))
    if requires.startswith("==") and requires.endswith(".*"):
        wanted = release(requires[2:-2])
        if wanted is None:
            raise ValueError(f"unreadable requirement {requires!r}")
        return (have + (0,) * len(wanted))[: len(wanted)] == wanted
    raise ValueError(f"unreadable requirement {requires!r}")


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def mismatches(stack: dict) -> list[str]:
    """One phrase per package of STACK (manifest.json's "stack") that this environment does not satisfy."""
    found = []
    for name, pin in sorted(stack.get("packages", {}).items()):
        requires, resolved_for = pin.get("requires", "any"), pin.get("resolved_for")
        wanted = f"{name} {requires}" + (f" (resolved for {resolved_for})" if resolved_for else "")
        installed = installed_version(name)
        if installed is None:
            found.append(f"{name} is not installed; the bundle needs {wanted}")
        elif not satisfies(installed, requires):
            found.append(f"{name} {installed} is installed; the bundle needs {wanted}")
    return found


def check_stack(manifest_path: str) -> int:
    if os.environ.get(SKIP_VARIABLE, "") not in ("", "0"):
        print(f"tunefile: {SKIP_VARIABLE} is set: not checking package versions against {manifest_path}",
              file=sys.stderr)
        return 0
    try:
        manifest = json.loads(Path(manifest_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StackMismatch(f"cannot read {manifest_path}: {exc}") from None
    try:
        problems = mismatches(manifest.get("stack") or {})
    except (ValueError, AttributeError, TypeError) as exc:
        raise StackMismatch(f"{manifest_path}: unreadable \"stack\": {exc}") from None
    if problems:
        raise StackMismatch("; ".join(problems) + f" (install those versions, recompile with --stack, or set "
                            f"{SKIP_VARIABLE}=1 to run anyway)")
    return 0


def check_bundle_stack(config_path: str) -> None:
    """`train`'s check, before anything trains: the manifest.json beside the bundle's config.yaml, if any (a run
    plan outside a bundle has none)."""
    manifest = Path(config_path).parent / "manifest.json"
    if manifest.is_file():
        check_stack(str(manifest))
