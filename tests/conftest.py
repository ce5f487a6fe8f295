"""Shared fixtures."""

from __future__ import annotations

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (CI included): a failure reproduces, and
# a green run is not luck of the draw. BITSACK_HYPOTHESIS_EXAMPLES deepens a run by hand.
settings.register_profile("bitsack", derandomize=True, database=None)
settings.load_profile("bitsack")


@pytest.fixture
def one_thread():
    """Run torch on one thread: on a shared 2-core machine, multi-threaded BLAS on the tiny
    test models spends its time waiting for cores (50x slower here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fake_load_model(monkeypatch):
    """``use(model)``: ``bitsack.models.loading.load_model`` returns ``model`` (a tiny model with
    the byte tokenizer) for any spec; ``use(make)`` with a function: a fresh ``make()`` on
    every call (a pipeline loads, and compresses in place, more than once)."""
    from torch import nn

    from bitsack.models import loading
    from bitsack.models.testing import ByteTokenizer

    def use(model):
        make = (lambda: model) if isinstance(model, nn.Module) else model

        def fake(*args, **kwargs):
            return loading.LoadedModel(model=make(), tokenizer=ByteTokenizer(),
                                       source={"kind": "test", "spec": "tiny"})

        monkeypatch.setattr(loading, "load_model", fake)
        return fake()

    return use
