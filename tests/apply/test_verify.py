"""Runtime verification: packed outputs within their computed bound; a broken kernel is caught."""

import torch

from bitsack.apply import ApplyConfig, compress
from bitsack.models import model_units
from bitsack.models.testing import tiny_model
from bitsack.verify import Verifier


def _compressed():
    model = tiny_model("llama", seed=0)
    plan = {u.id: 3 for u in model_units(model, mlp_group=32)}
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


def _break_the_kernel(monkeypatch, model):
    """Make the packed layers' own backend round its results to bf16 (a broken kernel)."""
    from bitsack.kernels.packed import PackedLinear
    from bitsack.kernels.registry import get_backend

    layer = next(m for m in model.modules() if isinstance(m, PackedLinear))
    cls = type(get_backend(layer.backend))
    original = cls.linear
    monkeypatch.setattr(cls, "linear", lambda self, layer, x: original(
        self, layer, x).to(torch.bfloat16).to(x.dtype))


def test_verifier_catches_a_wrong_kernel(monkeypatch):
    model = _compressed()
    _break_the_kernel(monkeypatch, model)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with Verifier(model, sample=4, calls=1) as v, torch.no_grad():
        model(x)
    assert not v.report.ok and v.report.max_ratio > 1.0


def _eval_cli(fake_load_model, tmp_path, model, *extra):
    import argparse

    from bitsack.commands import eval as eval_cmd

    fake_load_model(model)
    text = tmp_path / "eval.txt"
    text.write_text("hello world, " * 20)
    parser = argparse.ArgumentParser()
    eval_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--model", "tiny", "--data", str(text), "--seqlen", "32",
                              "--windows", "2", "--verify", *extra])
    return args.func(args)


def test_eval_verify_reports_the_largest_ratio(fake_load_model, tmp_path, capsys):
    import json

    from bitsack.kernels.packed import PackedLinear

    model = _compressed()
    packed = {n for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert _eval_cli(fake_load_model, tmp_path, model, "--verify-sample", "0", "--json") == 0
    got = json.loads(capsys.readouterr().out)["verify"]
    assert got["ok"] and got["checked_outputs"] > 0
    assert 0 <= got["max_observed_over_bound"] <= 1.0
    assert set(got["per_module"]) == packed  # --verify-sample 0: every packed layer


def test_eval_verify_exits_4_on_a_broken_bound(monkeypatch, fake_load_model, tmp_path, capsys):
    model = _compressed()
    _break_the_kernel(monkeypatch, model)
    assert _eval_cli(fake_load_model, tmp_path, model) == 4  # ExitCode.VERIFY_FAILED
    assert "exceeded its computed error bound" in capsys.readouterr().err


def test_eval_verify_refuses_a_dense_model(fake_load_model, tmp_path):
    import pytest

    from bitsack.errors import ValidationError

    with pytest.raises(ValidationError, match="no packed layers"):
        _eval_cli(fake_load_model, tmp_path, tiny_model("llama", seed=0))
