"""Shared pytest options."""

from __future__ import annotations

import tempfile

import pytest

try:  # the property tests' own files (constants it read, Unicode tables) go to a temporary folder, not the repo
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(tempfile.mkdtemp(prefix="tunefile-hypothesis-"))
except ImportError:  # hypothesis comes with the dev extra; the tests that need it say so when they import it
    pass


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="Rewrite golden/ from the current compiler.")


# The tiny model (runtime/tiny_model.py), built once per test session for the data and tiny-model tests.
import pathlib  # noqa: E402 - appended below the options above, which stay untouched


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from tunefile.runtime.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-llama", arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: pathlib.Path):
    """The tiny model's tokenizer; tests that add tokens load their own copy."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
