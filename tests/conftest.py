"""Shared fixtures: the default model's GGUF (pulled by `make test` before pytest runs)."""

import os
from pathlib import Path

import pytest

from sputnik.checkpoint.registry import sputnik_home

DEFAULT_GGUF = Path("models") / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_default_gguf() -> Path | None:
    if os.environ.get("SPUTNIK_TEST_GGUF"):
        return Path(os.environ["SPUTNIK_TEST_GGUF"])
    path = sputnik_home() / DEFAULT_GGUF
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The real default model. `make test` sets SPUTNIK_REQUIRE_MODEL=1, so there its absence fails, never skips."""
    path = find_default_gguf()
    if path is None:
        if os.environ.get("SPUTNIK_REQUIRE_MODEL") == "1":
            pytest.fail("the default model is not installed: run `sputnik pull smollm2-135m-instruct`")
        pytest.skip("default model not installed (run `make model`)")
    return path


@pytest.fixture(scope="session")
def default_tokenizer(default_gguf):
    from sputnik.tokenizer import Tokenizer

    return Tokenizer.load(default_gguf)
