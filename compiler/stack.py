"""The software stack a bundle is resolved for: the versions of torch, transformers, peft, accelerate and the
extras the plan uses, recorded in manifest.json and checked by launch.sh before training.

Where the versions come from is always explicit, so the same input compiles to the same bytes:
- by default, tunefile's own declared minimums (pyproject.toml's extras): no host state is read;
- ``--stack FILE``: a ``pip freeze`` of the environment the job will run in (NAME==VERSION lines);
- ``--stack detect``: the compiling environment's installed distributions (importlib.metadata; the
  compiler never imports torch). The pipeline reads them; this module only turns versions into requirements.

What "compatible" means (runtime/stack_check.py applies it):
- torch and transformers (and tunefile itself with --no-vendor): the same major.minor as resolved for
  (``==2.13.*``): their minor releases change distributed training, model code and defaults;
- every other package: at least the version resolved for (``>=0.21.2``);
- with no --stack: at least tunefile's declared minimum (``>=2.4``), or only installed (``any``) where
  tunefile declares none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# tunefile's declared minimum versions, as in pyproject.toml's optional dependencies (a test checks they agree).
MINIMUM_VERSIONS = {
    "torch": "2.4", "transformers": "4.45", "peft": "0.12", "accelerate": "1.0", "datasets": "2.19",
    "bitsandbytes": "0.43", "deepspeed": "0.15", "flash-attn": "2.6", "liger-kernel": "0.5",
    "cut-cross-entropy": "25.1", "torchao": "0.18", "mistral-common": "1.11.5", "wandb": "0.17",
    "mlflow-skinny": "2.10", "swanlab": "0.10",
}
SAME_MINOR = ("torch", "transformers", "tunefile")
ANY_VERSION = "any"
RELEASE = re.compile(r"\d+(?:\.\d+)*")
FREEZE_LINE = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*===?\s*(?P<version>\S+)")


@dataclass(frozen=True)
class PackagePin:
    """One package: the requirement launch.sh checks, and the version it was resolved for (None: a minimum)."""

    name: str
    requires: str
    resolved_for: str | None = None


@dataclass(frozen=True)
class Stack:
    source: str  # where the versions came from, in words
    packages: tuple[PackagePin, ...]

    def as_manifest(self) -> dict:
        return {"resolved_for": self.source,
                "packages": {pin.name: {"requires": pin.requires, "resolved_for": pin.resolved_for}
                             for pin in self.packages}}


def normalize_name(name: str) -> str:
    """PEP 503: ``Flash_Attn`` and ``flash-attn`` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> str | None:
    """The numeric release of a version (``2.13.0+cpu`` → ``2.13.0``); None when it starts with no number."""
    match = RELEASE.match(version.strip().lstrip("vV"))
    return match.group(0) if match else None


def requirement(name: str, version: str) -> str:
    numbers = release(version) or "0"
    if name in SAME_MINOR:
        major_minor = (numbers.split(".") + ["0"])[:2]
        return "==" + ".".join(major_minor) + ".*"
    return ">=" + numbers


def stack_packages(required_packages: Iterable[str], *, vendored: bool) -> list[str]:
    """The packages the stack records: what the plan needs, less tunefile when the bundle carries its runtime."""
    return sorted({normalize_name(name) for name in required_packages} - ({"tunefile"} if vendored else set()))


def minimum_stack(required_packages: Iterable[str], *, vendored: bool, tunefile_version: str) -> Stack:
    pins = []
    for name in stack_packages(required_packages, vendored=vendored):
        if name == "tunefile":
            pins.append(PackagePin(name, requirement(name, tunefile_version), tunefile_version))
        else:
            minimum = MINIMUM_VERSIONS.get(name)
            pins.append(PackagePin(name, ">=" + minimum if minimum else ANY_VERSION))
    return Stack(f"tunefile {tunefile_version}'s minimum versions (compile --stack FILE|detect records exact ones)",
                 tuple(pins))


def pinned_stack(required_packages: Iterable[str], versions: Mapping[str, str], *, source: str, vendored: bool,
                 tunefile_version: str) -> tuple[Stack, list[str]]:
    """The stack for known VERSIONS (normalised name → version), and the needed packages VERSIONS lacks."""
    versions = {normalize_name(name): version for name, version in versions.items()}
    if not vendored:
        versions.setdefault("tunefile", tunefile_version)
    pins, missing = [], []
    for name in stack_packages(required_packages, vendored=vendored):
        if name in versions:
            pins.append(PackagePin(name, requirement(name, versions[name]), versions[name]))
        else:
            missing.append(name)
    return Stack(source, tuple(pins)), missing


def parse_freeze(text: str) -> tuple[dict[str, str], list[tuple[int, str]]]:
    """NAME==VERSION per line, as ``pip freeze`` prints them; comments, options (``-e …``) and direct references
    (``name @ url``: no version to record) are skipped. Returns (versions, [(line number, problem)])."""
    versions: dict[str, str] = {}
    problems = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-") or " @ " in line:
            continue
        match = FREEZE_LINE.fullmatch(line)
        if match is None or release(match["version"]) is None:
            problems.append((number, f"expected NAME==VERSION (as `pip freeze` prints it), not {line!r}"))
            continue
        versions[normalize_name(match["name"])] = match["version"]
    return versions, problems
