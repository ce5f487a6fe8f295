"""Fixtures of the export tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from export_helpers import write_tokenizer_gguf


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread on a shared machine."""


@pytest.fixture(scope="session")
def tokenizer_gguf(tmp_path_factory) -> Path:
    """A 128-token vocabulary (the tiny models' size) in a GGUF."""
    return write_tokenizer_gguf(tmp_path_factory.mktemp("tok") / "tok.gguf", 128)
