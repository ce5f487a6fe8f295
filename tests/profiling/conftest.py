"""Profiling tests run tiny models on one thread: on a shared 2-core machine, multi-threaded
BLAS on 64-wide matrices spends its time waiting for cores (50x slower here)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
