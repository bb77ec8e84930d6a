"""Compile a config text and read what came out: the bundle's files, its run plan, or the located lines of a
config that does not validate. Shared by the tests of the Axolotl dialect and its features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import write
from tunefile.compiler.errors import ConfigError
from tunefile.compiler.loader import load_document
from tunefile.compiler.pipeline import Sources, TargetOptions, compile_config
from tunefile.compiler.validate import validate_document

H100 = TargetOptions(gpu="h100-80gb")


def compiled(tmp_path: Path, text: str, options: TargetOptions = H100, name: str = "cfg.yml") -> dict[str, str]:
    return compile_config(write(tmp_path / name, text), options).files


def plan_of(tmp_path: Path, text: str, options: TargetOptions = H100) -> dict[str, Any]:
    return yaml.safe_load(compiled(tmp_path, text, options)["config.yaml"])


def problems_of(text: str) -> list[str]:
    """The lines `tunefile validate` prints for TEXT (as file c.yml); the text must not validate."""
    document = load_document(text, "c.yml")
    with pytest.raises(ConfigError) as caught:
        validate_document(document)
    sources = Sources(documents={"c.yml": document}, main="c.yml")
    return [sources.format(problem) for problem in caught.value.problems]
