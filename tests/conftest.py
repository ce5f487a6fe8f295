"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_thread():
    """Run torch on one thread: on a shared 2-core machine, multi-threaded BLAS on the tiny
    test models spends its time waiting for cores (50x slower here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
