"""Runtime verification: packed outputs within their computed bound; a broken kernel is caught."""

import torch

from bitsack.apply import ApplyConfig, compress
from bitsack.models import model_units
from bitsack.models.testing import tiny_model
from bitsack.verify import Verifier


def _compressed():
    model = tiny_model("llama", seed=0)
    plan = {u.id: 3 for u in model_units(model, mlp_group=32, group_size=16)}
    compress(model, plan, config=ApplyConfig(quantizer="rtn", group_size=16, mlp_group=32))
    return model


def test_verifier_sees_outputs_within_bound():
    model = _compressed()
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with Verifier(model, sample=None, calls=1) as v, torch.no_grad():
        model(x)
    rep = v.report
    assert rep.checked_calls == len(v.modules) > 0
    assert rep.ok and 0 <= rep.max_ratio <= 1.0


def test_verifier_catches_a_wrong_kernel(monkeypatch):
    from bitsack.kernels.backends import TorchBackend

    original = TorchBackend.linear

    def sloppy(self, layer, x):  # a kernel that rounds its result to bf16
        return original(self, layer, x).to(torch.bfloat16).to(x.dtype)

    monkeypatch.setattr(TorchBackend, "linear", sloppy)
    model = _compressed()
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with Verifier(model, sample=4, calls=1) as v, torch.no_grad():
        model(x)
    assert not v.report.ok and v.report.max_ratio > 1.0
