"""manifest.json: a hash of every other file, and what the bundle was made from."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

MANIFEST = "manifest.json"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_hashes(files: dict[str, str]) -> dict[str, str]:
    """sha256 of the UTF-8 bytes of every file except the manifest itself (``verify`` reuses this)."""
    return {name: sha256_hex(text.encode("utf-8")) for name, text in sorted(files.items()) if name != MANIFEST}


def render_manifest(*, version: str, config_name: str, config_sha256: str, target_name: str, target_sha256: str,
                    files: dict[str, str], required_packages: tuple[str, ...] | list[str],
                    binary_hashes: Mapping[str, str] | None = None, runtime: Mapping[str, Any] | None = None,
                    stack: Mapping[str, Any] | None = None) -> str:
    """BINARY_HASHES: sha256 of the files that are bytes, not text (the vendored runtime archive), listed under
    ``files`` with the rest so ``tunefile verify`` checks them too. RUNTIME: where the runtime comes from (the
    archive, its sha256 and tunefile version; or the installed tunefile). STACK: the package versions the bundle
    was resolved for, which launch.sh checks (compiler/stack.py)."""
    manifest: dict[str, Any] = {
        "tunefile_version": version,
        "config": config_name,
        "config_sha256": config_sha256,
        "target": target_name,
        "target_sha256": target_sha256,
        "files": dict(sorted({**file_hashes(files), **(binary_hashes or {})}.items())),
        "required_packages": sorted(required_packages),
    }
    if runtime is not None:
        manifest["runtime"] = dict(runtime)
    if stack is not None:
        manifest["stack"] = dict(stack)
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"
