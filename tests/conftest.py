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


def _tiny_compressed(arch: str, pruned: bool = False, seed: int = 0, *,
                    scale_bits: int | None = None, group_size: int = 16, mlp_group: int = 32,
                    **dims):
    """``tiny_model(arch, seed, **dims)`` compressed (RTN) with mixed bits: unit i at
    (2, 3, 4, 8)[i % 4] bits; ``pruned`` also prunes head group 1 of layer 0 and MLP block 0
    of layer 1. Returns the compressed model."""
    from bitsack.apply import ApplyConfig, compress
    from bitsack.models import model_units
    from bitsack.models.testing import tiny_model

    model = tiny_model(arch, seed=seed, **dims)
    units = model_units(model, mlp_group=mlp_group)
    plan = {u.id: (2, 3, 4, 8)[i % 4] for i, u in enumerate(units)}
    if pruned:
        plan["L0.attn.g1"] = 0
        plan["L1.mlp.c0"] = 0
    compress(model, plan, config=ApplyConfig(quantizer="rtn", group_size=group_size,
                                              mlp_group=mlp_group, scale_bits=scale_bits))
    return model


@pytest.fixture(scope="session")
def tiny_compressed():
    """``tiny_compressed(arch, pruned=False, seed=0, *, scale_bits=None, group_size=16,
    mlp_group=32, **dims)``: a tiny model compressed with mixed bits (2/3/4/8), optionally
    with one head group and one MLP block pruned."""
    return _tiny_compressed


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
