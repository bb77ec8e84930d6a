"""manifest.json: a hash of every other file, and what the bundle was made from."""

from __future__ import annotations

import hashlib
import json

MANIFEST = "manifest.json"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_hashes(files: dict[str, str]) -> dict[str, str]:
    """sha256 of the UTF-8 bytes of every file except the manifest itself (``verify`` reuses this)."""
    return {name: sha256_hex(text.encode("utf-8")) for name, text in sorted(files.items()) if name != MANIFEST}


def render_manifest(*, version: str, config_name: str, config_sha256: str, target_name: str, target_sha256: str,
                    files: dict[str, str], required_packages: tuple[str, ...] | list[str]) -> str:
    manifest = {
        "tunefile_version": version,
        "config": config_name,
        "config_sha256": config_sha256,
        "target": target_name,
        "target_sha256": target_sha256,
        "files": file_hashes(files),
        "required_packages": sorted(required_packages),
    }
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"
