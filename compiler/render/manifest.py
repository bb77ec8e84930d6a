"""manifest.json: a hash of every other file, and what the bundle was made from."""

from __future__ import annotations

import hashlib
import json

from ..plan import Plan

MANIFEST = "manifest.json"


def file_hashes(files: dict[str, str]) -> dict[str, str]:
    return {name: hashlib.sha256(text.encode("utf-8")).hexdigest() for name, text in sorted(files.items())
            if name != MANIFEST}


def render_manifest(plan: Plan, files: dict[str, str]) -> str:
    manifest = {
        "tunefile_version": plan.tunefile_version,
        "config": plan.config_name,
        "config_sha256": plan.config_sha256,
        "target": plan.target.name,
        "target_sha256": plan.target_sha256,
        "files": file_hashes(files),
        "required_packages": list(plan.required_packages),
    }
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"
