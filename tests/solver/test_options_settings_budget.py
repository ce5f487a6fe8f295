"""Option ids with group sizes, typed problem settings, and the one Budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitsack.cli import main
from bitsack.errors import ValidationError
from bitsack.solver import solve
from bitsack.solver.backends.base import SolveOptions
from bitsack.solver.budget import Budget
from bitsack.solver.problem import (
    GROUP_SIZES,
    OptionSpec,
    ProblemSettings,
    option_bits,
    option_id,
    parse_option,
)
from bitsack.solver.schema import (
    avg_bits_limit,
    dump_problem,
    load_problem,
    problem_from_dict,
    problem_to_dict,
    with_limits,
)

PROBLEMS = Path(__file__).resolve().parents[2] / "problems"
HAND = PROBLEMS / "knapsack-hand.yaml"
VALID_IDS = (["prune", "b16"] + [f"b{k}" for k in range(1, 9)]
             + [f"b{k}g{g}" for k in range(1, 9) for g in GROUP_SIZES])


# --- option ids ---------------------------------------------------------------------------

@pytest.mark.parametrize("oid", VALID_IDS)
def test_option_id_round_trip(oid):
    spec = parse_option(oid)
    assert option_id(spec.bits, spec.group_size) == oid == spec.id
    assert option_bits(oid) == spec.bits


def test_option_spec_fields():
    assert parse_option("prune") == OptionSpec(bits=0, group_size=None)
    assert parse_option("b16") == OptionSpec(bits=16, group_size=None)
    assert parse_option("b3") == OptionSpec(bits=3, group_size=None)
    assert parse_option("b3g128") == OptionSpec(bits=3, group_size=128)
    assert parse_option("b3g128").is_prune is False and parse_option("prune").is_prune


@pytest.mark.parametrize("bad", ["b16g64", "b9", "b17", "b0", "b3g48", "b3g4", "b3g2048",
                                 "b3g064", "B3", "b3g", "g64", "", "prune ", "int4"])
def test_invalid_option_ids_are_refused_with_the_grammar(bad):
    with pytest.raises(ValueError, match=r"is not an option id; valid: 'prune', 'b<k>'"):
        parse_option(bad)


@pytest.mark.parametrize("bits, group, fragment", [
    (16, 64, "16 bits, which has no groups"), (0, 32, "prune, which has no groups"),
    (3, 48, "a power of two in 8..1024"), (9, None, r"valid: 0 \(prune\), 1..8 or 16"),
])
def test_option_id_refuses_what_has_no_id(bits, group, fragment):
    with pytest.raises(ValidationError, match=fragment):
        option_id(bits, group)


def test_schema_names_the_option_field_and_lists_what_is_valid(tmp_path):
    doc = problem_to_dict(load_problem(HAND))
    doc["units"][1]["options"][2]["id"] = "b16g64"
    with pytest.raises(ValidationError) as info:
        problem_from_dict(doc)
    message = str(info.value)
    assert message.startswith("units[1].options[2].id: 'b16g64' is not an option id; valid:")
    assert "'b<k>g<G>' (k in 1..8, G a power of two in 8..1024)" in message


# --- settings -----------------------------------------------------------------------------

def test_settings_defaults_and_group_size_of():
    s = ProblemSettings()
    assert (s.group_size, s.mlp_group, s.quantizer) == (64, 128, None)
    assert s.group_size_of("b3") == 64 and s.group_size_of("b3g128") == 128
    assert s.group_size_of("prune") is None and s.group_size_of("b16") is None
    assert ProblemSettings(group_size=32).group_size_of(parse_option("b4")) == 32


@pytest.mark.parametrize("settings, field, fragment", [
    ({"group_size": 0}, "settings.group_size", "0 is not a positive integer"),
    ({"group_size": 64.0}, "settings.group_size", "64.0 is not a positive integer"),
    ({"mlp_group": -1}, "settings.mlp_group", "-1 is not a positive integer"),
    ({"quantizer": "awq"}, "settings.quantizer", "'awq'; valid: rtn, gptq or null"),
    ({"group": 64}, "settings.group", "unknown key 'group'"),
    ([64], "settings", "is not a mapping"),
])
def test_settings_are_schema_checked(settings, field, fragment):
    doc = problem_to_dict(load_problem(HAND))
    doc["settings"] = settings
    with pytest.raises(ValidationError) as info:
        problem_from_dict(doc)
    assert str(info.value).startswith(field + ":") and fragment in str(info.value)


def test_settings_round_trip_and_metadata_fallback(tmp_path):
    doc = problem_to_dict(load_problem(HAND))
    doc["settings"] = {"group_size": 128, "mlp_group": 256, "quantizer": "gptq"}
    p = problem_from_dict(doc)
    assert p.settings == ProblemSettings(128, 256, "gptq")
    for ext in ("yaml", "json"):
        dump_problem(p, tmp_path / f"p.{ext}")
        assert load_problem(tmp_path / f"p.{ext}").settings == p.settings
    assert "settings: {group_size: 128, mlp_group: 256, quantizer: gptq}" in \
        (tmp_path / "p.yaml").read_text()
    # an older file: no settings, the values in metadata
    del doc["settings"]
    doc["metadata"] = {"group_size": 32, "mlp_group": 64, "quantizer": "rtn", "model": "m"}
    old = problem_from_dict(doc)
    assert old.settings == ProblemSettings(32, 64, "rtn")
    doc["metadata"]["group_size"] = "wide"
    with pytest.raises(ValidationError, match=r"^metadata.group_size: 'wide'"):
        problem_from_dict(doc)
    # neither: the defaults
    doc.pop("metadata")
    assert problem_from_dict(doc).settings == ProblemSettings()


# --- several group sizes of one bit-width --------------------------------------------------

def _grouped_problem():
    """Three units offering 3 bits at three group sizes; same_bits over two of them."""
    units = []
    for k, (scale, cost_scale) in enumerate(((1.0, 1.0), (1.7, 1.2), (0.6, 0.9))):
        options = [{"id": "prune", "loss": 0.5 * scale, "cost": {"memory_bytes": 0}}]
        for oid, loss, cost in (("b2", 0.12, 300), ("b3g32", 0.035, 520), ("b3g64", 0.04, 470),
                                ("b3g128", 0.05, 440), ("b4", 0.01, 600)):
            options.append({"id": oid, "loss": loss * scale,
                            "cost": {"memory_bytes": round(cost * cost_scale)}})
        units.append({"id": f"u{k}", "params": 1000, "options": options})
    return {"schema": "bitsack.problem/v1", "name": "grouped",
            "settings": {"group_size": 128},
            "resources": {"memory_bytes": {"limit": 1450}}, "units": units,
            "constraints": [{"type": "same_bits", "units": ["u0", "u1"]}]}


@pytest.mark.parametrize("limit", [0, 700, 1000, 1360, 1450, 1500, 2200])
def test_same_bits_compares_bits_not_group_sizes_and_backends_agree(limit):
    from bitsack.solver import backend_names
    from bitsack.solver.solution import evaluate

    doc = _grouped_problem()
    doc["resources"]["memory_bytes"]["limit"] = limit
    p = problem_from_dict(doc)
    ref = solve(p, "brute")
    for name in backend_names():
        if name in ("auto", "brute"):
            continue
        sol = solve(p, name, SolveOptions(rel_gap=1e-9, abs_gap=1e-12))
        if name == "greedy":  # a heuristic: a feasible plan whenever one exists
            assert sol.has_solution == ref.has_solution
            continue
        assert sol.status == ref.status, name
        if ref.has_solution:
            assert sol.objective == pytest.approx(ref.objective, rel=1e-9, abs=1e-12), name
            assert evaluate(p, sol.assignment).feasible
    # at these budgets the optimum mixes group sizes inside the same_bits group
    if limit in (1360, 1500):
        a = ref.assignment
        assert option_bits(a["u0"]) == option_bits(a["u1"]) == 3 and a["u0"] != a["u1"]


# --- budget -------------------------------------------------------------------------------

def test_budget_parse_and_apply():
    p = load_problem(PROBLEMS / "tiny-two-budgets.yaml")
    b = Budget.parse("3.5", ["decode_latency_us=none"])
    assert b.avg_bits == 3.5 and b.limits == {"decode_latency_us": None}
    q = b.apply(p)
    assert q.limits == {"memory_bytes": avg_bits_limit(p, 3.5)}
    assert b.limits_of(p) == q.limits
    assert b.resolve(p) == {"decode_latency_us": None, "memory_bytes": avg_bits_limit(p, 3.5)}
    assert Budget.parse(None, ["memory_bytes=1e4"]).apply(p) == with_limits(
        p, {"memory_bytes": 1e4})
    assert Budget().empty and Budget().apply(p) is p


@pytest.mark.parametrize("avg_bits, items, fragment", [
    ("3", ["memory_bytes=6e7"], "--avg-bits: and --budget memory_bytes both set the memory"),
    ("3", ["memory_bytes=none"], "--avg-bits: and --budget memory_bytes both set"),
    ("0", [], "--avg-bits: 0.0 is out of range; valid: bits per weight in (0, 16]"),
    ("1e308", [], "--avg-bits: 1e+308 is out of range"),
    ("nan", [], "--avg-bits: nan is out of range"),
    ("x", [], "--avg-bits: 'x' is not a number"),
    (None, ["memory_bytes=1e308"], "--budget memory_bytes: 1e+308 is above 1e+150"),
    (None, ["memory_bytes=inf"], "--budget memory_bytes: inf is not finite"),
    (None, ["memory_bytes=-1"], "--budget memory_bytes: -1.0 is negative"),
    (None, ["memory_bytes=lots"], "--budget 'memory_bytes': 'lots' is not a number"),
    (None, ["memory_bytes"], "--budget: 'memory_bytes' is not RESOURCE=VALUE"),
    (None, ["a=1", "a=2"], "--budget: 'a' is set twice"),
])
def test_budget_refuses_with_the_flag_named(avg_bits, items, fragment):
    with pytest.raises(ValidationError) as info:
        Budget.parse(avg_bits, items)
    assert fragment in str(info.value)


def test_budget_is_the_same_in_every_command(capsys, tmp_path):
    """solve, check, pareto and generate read --avg-bits / --budget through one Budget."""
    path = str(PROBLEMS / "tiny-two-budgets.yaml")
    both = ["--avg-bits", "3", "--budget", "memory_bytes=5e4"]
    for argv in (["solve", path], ["check", path, path], ["pareto", path, "--resource",
                                                           "decode_latency_us"],
                 ["generate", "--out", str(tmp_path / "g.yaml")]):
        assert main(argv + both) == 1
        err = capsys.readouterr().err
        assert "--avg-bits: and --budget memory_bytes both set the memory budget" in err, argv
    # generate: --avg-bits sets memory_bytes and keeps the other budgets; none removes one
    out = tmp_path / "g.yaml"
    assert main(["generate", "--out", str(out), "--avg-bits", "3"]) == 0
    g = load_problem(out)
    assert set(g.limits) == {"memory_bytes", "decode_latency_us"}
    assert g.limits["memory_bytes"] == pytest.approx(3 * g.total_params / 8)
    assert main(["generate", "--out", str(out), "--avg-bits", "3", "--budget",
                 "decode_latency_us=none"]) == 0
    assert set(load_problem(out).limits) == {"memory_bytes"}
    # solve applies it the same way
    capsys.readouterr()
    assert main(["solve", str(out), "--solver", "dp", "--json"]) == 0
    cert = json.loads(capsys.readouterr().out)["certificate"]
    assert cert["limits"] == {"memory_bytes": pytest.approx(3 * g.total_params / 8)}


def test_parse_budgets_kept_for_run():
    from bitsack.commands.solve import parse_budgets

    assert parse_budgets(["memory_bytes=6e7", "decode_latency_us=none"]) == {
        "memory_bytes": 6e7, "decode_latency_us": None}
    with pytest.raises(ValidationError, match="--budget memory_bytes: -1.0 is negative"):
        parse_budgets(["memory_bytes=-1"])


def test_generate_with_explicit_group_sizes_prices_each(capsys, tmp_path):
    out = tmp_path / "g.json"
    assert main(["generate", "--preset", "smollm2-135m", "--layers", "1", "--options",
                 "prune,b3g32,b3g64,b3g128,b4,b16", "--out", str(out)]) == 0
    p = load_problem(out)
    assert p.settings.group_size == 64 and p.settings.mlp_group == 128
    attn = p.units[0]
    mem = {o.id: o.cost["memory_bytes"] for o in attn.options}
    loss = {o.id: o.loss for o in attn.options}
    assert mem["b3g32"] > mem["b3g64"] > mem["b3g128"]  # finer groups: more scale/zero bytes
    assert loss["b3g32"] <= loss["b3g64"] <= loss["b3g128"]  # ... and less error
    capsys.readouterr()
    assert main(["solve", str(out), "--solver", "dp", "--json",
                 "--budget", "decode_latency_us=none"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "optimal"
