"""The measured search on tiny models: store, meter, loop (acceptance, planted sensitivity,
resumption), and the packed model it produces."""

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from bitsack.apply import ApplyConfig, assemble, compress
from bitsack.models import model_units
from bitsack.models.testing import tiny_model
from bitsack.plan import parse_choice
from bitsack.profiling.build import make_cost_models, unit_shapes
from bitsack.search import RELINEARISE
from bitsack.search.loop import Search, groups_of, unit_costs
from bitsack.search.menu import DEFAULT_MENU, Menu, nominal_bits
from bitsack.search.meter import KLMeter, Paired
from bitsack.search.store import StoreConfig, VariantStore
from bitsack.search.types import SearchConfig

MLP = 32
MENU = ("b2g32", "b2g16", "b3g32", "b3g16", "b4g32", "b4g16", "b8g16", "b16")


def _tokens(n, seed, seqlen=32):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def setup(one_thread):
    # grid: min-max by default here — these tests pin search trajectories (which unit moves,
    # which Δ stands on half a split), and the grid changes every variant's numbers
    def make(arch="llama", incumbent="b2g32", seed=0, quantizer="gptq", scale_bits=None,
             grid="minmax"):
        model = tiny_model(arch, seed=seed)
        base = copy.deepcopy(model)
        units = model_units(model, mlp_group=MLP)
        meter = KLMeter(model, {"screen": _tokens(8, 1), "select": _tokens(8, 2),
                                "holdout": _tokens(8, 3)}, batch_size=4)
        menu = Menu.parse(MENU, scale_bits=scale_bits)
        store = VariantStore.build(model, units, menu, parse_choice(incumbent, 16), _tokens(8, 4),
                                   StoreConfig(quantizer=quantizer, batch_size=4,
                                               scale_bits=scale_bits, grid=grid))
        costs = unit_costs(unit_shapes(model, units), menu,
                           make_cost_models(["memory"], {"memory": {"scale_bits": scale_bits}}))
        return base, model, units, meter, store, costs

    return make


def _limit(units, bits):
    return {"memory_bytes": bits * sum(u.params for u in units) / 8}


def test_menu_order_and_steps():
    menu = Menu.parse(DEFAULT_MENU)
    assert [c.option_id for c in menu.steps][:6] == ["b2g128", "b2g64", "b2g32", "b3g128",
                                                      "b3g64", "b3g32"]
    # bits + (16 + bits)/G: an fp16 scale and a bits-bit zero point per group
    assert [nominal_bits(c) for c in menu.steps][:4] == [2.140625, 2.28125, 2.5625, 3.1484375]
    b3g64 = parse_choice("b3g64", 64)
    assert menu.step(b3g64, +1).option_id == "b3g32"
    assert menu.step(b3g64, -1).option_id == "b3g128"
    assert menu.step(menu.steps[-1], +1) is None
    assert Menu.parse(["b3g64", "prune"]).prune


def test_menu_order_follows_the_scale_storage():
    menu = Menu.parse(["b4g128", "b3g16", "b3g32"])
    assert [c.option_id for c in menu.steps] == ["b3g32", "b4g128", "b3g16"]  # 4.16 < 4.19
    dq = Menu.parse(["b4g128", "b3g16", "b3g32"], scale_bits=6)
    # 3 + 9/16 + 16/256 = 3.625 < 4 + 10/128 + 16/256 = 4.14
    assert [c.option_id for c in dq.steps] == ["b3g32", "b3g16", "b4g128"]
    assert dq.nominal_bits(dq.steps[1]) == 3.625
    assert dq.window(dq.steps[1], 1).scale_bits == 6


def test_paired_standard_error():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    p = Paired.of(a + 0.5, a)
    assert p.mean == pytest.approx(0.5) and p.se == pytest.approx(0.0)
    p = Paired.of(np.array([1.0, 3.0]), np.array([0.0, 0.0]))
    assert p.mean == 2.0 and p.se == pytest.approx(1.0)


@pytest.mark.parametrize("arch, scale_bits, grid", [
    ("llama", None, "minmax"), ("gpt2", None, "minmax"), ("llama", 6, "minmax"),
    ("gpt2", 4, "minmax"), ("llama", None, "mse"), ("gpt2", 6, "mse"), ("llama", 6, "hmse"),
    ("gpt2", None, "hmse")])
def test_stitched_uniform_is_compress_and_assemble_packs_any_plan(setup, arch, scale_bits,
                                                                   grid):
    base, model, units, _, store, _ = setup(arch, incumbent="b3g16", scale_bits=scale_bits,
                                            grid=grid)
    x = _tokens(2, 9, 20)
    real = copy.deepcopy(base)
    plan = {u.id: store.incumbent for u in units}
    # the "torch" backend computes with the dequantized weight as the dense model does
    compress(real, plan, _tokens(8, 4), ApplyConfig(group_size=16, mlp_group=MLP, batch_size=4,
                                                    backend="torch", scale_bits=scale_bits,
                                                    grid=grid))
    with torch.no_grad():
        assert torch.equal(model(x).logits, real(x).logits)
    # a mixed plan with pruning: stitched dense zeros == packed surgery, to rounding
    rng = np.random.default_rng(0)
    mixed = {u.id: ("prune" if u.prunable and rng.random() < 0.2 else
                    str(rng.choice(MENU))) for u in units}
    mixed = {u: parse_choice(o, 16) for u, o in mixed.items()}
    from bitsack.search.store import Stitcher

    Stitcher(model, units, store).write(mixed)
    packed = copy.deepcopy(base)
    res = assemble(packed, mixed, store.part, ApplyConfig(group_size=16, mlp_group=MLP,
                                                          scale_bits=scale_bits, grid=grid))
    with torch.no_grad():
        torch.testing.assert_close(packed(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)
    segs = [s for m in packed.modules() if hasattr(m, "_scale_bits") for s in m.segments
            if s.bits < 16]
    assert segs and {s.scale_bits for s in segs} == {scale_bits}
    costs = unit_costs(_shapes(units), Menu(store.menu.steps, prune=True),
                       make_cost_models(["memory"], {"memory": {"scale_bits": scale_bits}}))
    assert res.packed_bytes == sum(costs[u][c.option_id]["memory_bytes"]
                                   for u, c in mixed.items())


def _shapes(units):
    from bitsack.solver.costs import SliceShape, UnitShape

    return [UnitShape(u.id, u.kind, tuple(SliceShape(s.shape[0], s.shape[1], s.dim)
                                          for s in u.slices), u.layer) for u in units]


def test_store_persists_and_resumes(setup, tmp_path, one_thread):
    model = tiny_model("llama", seed=0)
    units = model_units(model, mlp_group=MLP)
    menu = Menu.parse(MENU)
    inc = parse_choice("b3g16", 16)
    key = {"k": 1, "splits": [(16, 256)]}  # a tuple: JSON gives it back as a list
    a = VariantStore.build(copy.deepcopy(model), units, menu, inc, _tokens(8, 4),
                           StoreConfig(batch_size=4), root=tmp_path / "s", key=key)
    files = sorted(p.name for p in (tmp_path / "s").glob("layer_*"))
    assert len(files) == 3  # two layers and the head
    (tmp_path / "s" / files[1]).unlink()  # as if killed before the last layer
    kept = {f: (tmp_path / "s" / f).stat().st_mtime_ns for f in (files[0], files[2])}
    b = VariantStore.build(copy.deepcopy(model), units, menu, inc, _tokens(8, 4),
                           StoreConfig(batch_size=4), root=tmp_path / "s", key=key)
    # the layers already built were read, not rebuilt
    assert {f: (tmp_path / "s" / f).stat().st_mtime_ns for f in kept} == kept
    for name, per in a.variants.items():
        for c in per:
            assert torch.equal(a.dense(name, c), b.dense(name, c)), (name, c)
    # another key: the stored layers are stale and rebuilt
    VariantStore.build(copy.deepcopy(model), units, menu, inc, _tokens(8, 4),
                       StoreConfig(batch_size=4), root=tmp_path / "s", key={"k": 2})
    assert json.loads((tmp_path / "s" / "store.json").read_text())["key"] == {"k": 2}


@pytest.mark.parametrize("arch, scale_bits", [("llama", None), ("opt", None), ("opt", 6)])
def test_a_persisted_store_opens_without_a_walk(tmp_path, arch, scale_bits, one_thread):
    from bitsack.errors import FormatError, ValidationError

    model = tiny_model(arch, seed=0)
    units = model_units(model, mlp_group=MLP)
    built = VariantStore.build(copy.deepcopy(model), units,
                               Menu.parse(MENU, scale_bits=scale_bits),
                               parse_choice("b3g16", 16), _tokens(8, 4),
                               StoreConfig(batch_size=4, scale_bits=scale_bits),
                               root=tmp_path / "s", key={"k": 1})
    with pytest.raises(ValidationError, match="menu.scale_bits: None, but the store quantizes "
                       "with scale_bits 6"):
        VariantStore.build(copy.deepcopy(model), units, Menu.parse(MENU), built.incumbent,
                           _tokens(8, 4), StoreConfig(scale_bits=6))
    opened = VariantStore.open(tmp_path / "s", model, units)
    assert opened.menu == built.menu and opened.incumbent == built.incumbent
    assert opened.scale_bits == scale_bits
    for per in opened.variants.values():  # the scale codes and steps come back too
        for c, pieces in per.items():
            for p in pieces:
                if c.bits < 16:
                    assert p.q.scale_bits == scale_bits
                    if scale_bits is not None:
                        assert p.q.scale_codes().max() < 1 << scale_bits
    assert set(opened.variants) == set(built.variants)
    for name, per in built.variants.items():
        for c in per:
            assert torch.equal(opened.dense(name, c), built.dense(name, c)), (name, c)
    next((tmp_path / "s").glob("layer_0001*")).unlink()
    with pytest.raises(FormatError, match="layer 1 of"):
        VariantStore.open(tmp_path / "s", model, units)
    with pytest.raises(FormatError, match="not a variant store"):
        VariantStore.open(tmp_path / "nothing", model, units)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_store_walked_along_a_plan_holds_that_plans_sequential_apply(setup, arch):
    from bitsack.search.store import Stitcher

    base, _, units, _, uniform, _ = setup(arch, incumbent="b3g16", grid="hmse")  # the defaults
    # one choice per (layer, kind) group: every matrix has one choice, so the plan's own
    # variants of a walk along it are exactly its sequential apply
    rng = np.random.default_rng(1)
    plan = {}
    for members in groups_of(units).values():
        c = parse_choice(str(rng.choice(MENU[:-2])), 16)
        plan.update({u: c for u in members})
    assert len(set(plan.values())) > 2
    walked = copy.deepcopy(base)
    store = VariantStore.build(walked, units, Menu.parse(MENU), plan, _tokens(8, 4),
                               StoreConfig(batch_size=4))
    assert store.walk == plan
    real = copy.deepcopy(base)
    compress(real, plan, _tokens(8, 4), ApplyConfig(group_size=16, mlp_group=MLP, batch_size=4,
                                                    backend="torch"))
    x = _tokens(2, 9, 20)
    with torch.no_grad():
        assert torch.equal(walked(x).logits, real(x).logits)
    # the walk left the model stitched at the plan, and the other variants differ from the
    # uniform walk's past the first layer (their Hessians came from the plan's layers)
    restitched = copy.deepcopy(base)
    Stitcher(restitched, units, store).write(plan)
    with torch.no_grad():
        assert torch.equal(restitched(x).logits, walked(x).logits)
    last = max(u.layer for u in units if u.layer is not None)
    name = next(n for n in store.variants if f".{last}." in n)
    assert not torch.equal(store.dense(name, MENU_C[0]), uniform.dense(name, MENU_C[0]))
    # a uniform plan walked unit by unit is the uniform walk
    same = VariantStore.build(copy.deepcopy(base), units, Menu.parse(MENU),
                              {u.id: uniform.incumbent for u in units}, _tokens(8, 4),
                              StoreConfig(batch_size=4))
    for n, per in uniform.variants.items():
        for c in per:
            assert torch.equal(same.dense(n, c), uniform.dense(n, c)), (n, c)
    with pytest.raises(Exception, match="walk"):
        VariantStore.build(copy.deepcopy(base), units, Menu.parse(MENU),
                           {units[0].id: uniform.incumbent}, _tokens(8, 4),
                           StoreConfig(batch_size=4))


MENU_C = [parse_choice(o, 16) for o in MENU]


def test_search_never_accepts_a_worse_holdout_and_fits(setup):
    _, model, units, meter, store, costs = setup()
    limits = _limit(units, 3.0)
    s = Search(model, units, store, meter, costs, limits, SearchConfig(budget_forwards=300, k=4))
    res = s.run()
    assert s.fits(res.plan)
    assert res.kl["holdout"] <= res.start["kl"]["holdout"] + 1e-12
    assert any(st.accepted for st in res.steps)
    # two steps at once only right after an accepted step (or at the start)
    assert [st.reach for st in res.steps] == \
        [2 if i == 0 or res.steps[i - 1].accepted else 1 for i in range(len(res.steps))]
    for st in res.steps:
        if st.accepted:
            assert st.holdout["delta"] <= 0.0
            assert st.select["delta"] < -2 * st.select["se"]
    # the measured KL of the final plan is what the meter says of the model now
    assert float(np.mean(meter.kl("holdout", 0))) == pytest.approx(res.kl["holdout"],
                                                                   rel=1e-9)


def test_planted_sensitive_unit_ends_at_high_precision(setup):
    _, _, units, _, _, costs = setup()
    # plant: make layer 1's first MLP block's down-projection columns huge in the base model,
    # so any quantization error there is amplified; rebuild the whole setup on that model
    base = tiny_model("llama", seed=0)
    with torch.no_grad():
        base.model.layers[1].mlp.down_proj.weight[:, :MLP] *= 100.0
    model = copy.deepcopy(base)
    meter = KLMeter(model, {"screen": _tokens(16, 1, 64), "select": _tokens(16, 2, 64),
                            "holdout": _tokens(16, 3, 64)}, batch_size=8)
    menu = Menu.parse(MENU)
    # min-max groups: on the MSE grid the planted block's 2-bit error is small enough that the
    # search spends the budget elsewhere (and ends at a lower KL: 0.28 vs 0.33 held out)
    store = VariantStore.build(model, units, menu, parse_choice("b2g32", 16), _tokens(8, 4),
                               StoreConfig(batch_size=4, grid="minmax"))
    s = Search(model, units, store, meter, costs, _limit(units, 3.0),
               SearchConfig(budget_forwards=1000, k=4, k_min=1))  # 6 groups: far moves of all
    res = s.run()
    planted = res.plan["L1.mlp.c0"]
    others = [nominal_bits(c) for u, c in res.plan.items() if u.startswith("L1.mlp")
              and u != "L1.mlp.c0"]
    assert nominal_bits(planted) > nominal_bits(parse_choice("b2g32", 16))
    assert nominal_bits(planted) >= max(others)


@pytest.mark.parametrize("bits, relinearise", [(2.85, "layers"), (3.1, "moved")])
def test_interrupted_search_resumes_to_the_identical_result(setup, bits, relinearise):
    # 3.1 with "moved": a descended start whose carried Δ's the first linearisation keeps
    cfg = SearchConfig(budget_forwards=400 if bits == 2.85 else 1000, k=4,
                       relinearise=relinearise)

    def run(stop_after=None, resume=None):
        _, model, units, meter, store, costs = setup()
        saved = []

        def checkpoint(ck):
            saved.append(json.loads(json.dumps(ck)))
            if stop_after is not None and len(ck["result"]["steps"]) >= stop_after:
                raise KeyboardInterrupt

        s = Search(model, units, store, meter, costs, _limit(units, bits), cfg,
                   checkpoint=checkpoint)
        try:
            return s.run(resume=resume).to_dict(), saved
        except KeyboardInterrupt:
            return None, saved

    full, _ = run()
    assert len(full["steps"]) >= 2
    assert (full["start"].get("carried", 0) > 0) == (relinearise == "moved")
    part, saved = run(stop_after=1)
    assert part is None
    resumed, _ = run(resume=saved[-1])
    assert resumed == full


def test_the_search_does_not_begin_a_linearisation_its_budget_cannot_pay_for(setup):
    """A linearisation begun runs to its end: the search starts one only when the budget
    left pays for it, estimated as its Δ's times the mean forwards of a Δ so far (steps
    scripted: each is rejected with nothing to propose, so every group is linearised
    again)."""
    from bitsack.search.types import Step

    def run(budget, descend=False):
        _, model, units, meter, store, costs = setup()
        s = Search(model, units, store, meter, costs, _limit(units, 2.85),
                   SearchConfig(budget_forwards=budget, k=16, k_min=2, descend=descend))
        s._step = lambda it, k, reach, floor=0.0: Step(it, k, {}, 0.0, None, None, None,
                                                       False, "scripted", 0, meter.forwards,
                                                       reach=reach)
        spent, linearise = [], s.linearise
        s.linearise = lambda groups=None, **kw: (spent.append(meter.forwards),
                                                 linearise(groups, **kw))
        return s.run(), spent

    full, before = run(1e9)
    assert full.stopped == "trust region below k_min=2" and len(before) == 4
    cost = full.forwards - before[-1]  # every linearisation here measures every group
    assert cost > 0 and before[2] - before[1] == pytest.approx(cost)
    short, _ = run(before[2] + cost / 2)  # pays for two, not for the third
    assert short.stopped.startswith("forward budget cannot pay for a linearisation (about ")
    assert short.linearisations == 2 and short.forwards == before[2]
    assert [st.iteration for st in short.steps] == [1, 2]
    # a descended start measured Δ's: the first linearisation is estimated from them
    started, _ = run(0.0, descend=True)
    assert started.start["incumbent"].endswith("descended") and not started.linearisations
    short, _ = run(started.forwards + 1, descend=True)
    assert short.stopped.startswith("forward budget cannot pay") and not short.linearisations
    assert short.forwards == started.forwards


def test_a_larger_budget_continues_a_finished_search_to_the_identical_result(setup):
    from dataclasses import asdict

    from bitsack.search.driver import resumable

    def run(budget, resume=None):
        _, model, units, meter, store, costs = setup()
        saved = []
        s = Search(model, units, store, meter, costs, _limit(units, 2.85),
                   SearchConfig(budget_forwards=budget, k=4),
                   checkpoint=lambda ck: saved.append(json.loads(json.dumps(ck))))
        return s.run(resume=resume).to_dict(), saved

    short, saved = run(200)
    assert short["stopped"].startswith("forward budget")  # spent, or cannot pay for more
    full, _ = run(500)
    assert len(full["steps"]) > len(short["steps"])
    continued, _ = run(500, resume=saved[-1])
    assert continued == full
    # only the budget may differ between the checkpoint's config and the new one
    was = json.loads(json.dumps(asdict(SearchConfig(budget_forwards=200, k=4))))
    assert resumable(was, SearchConfig(budget_forwards=500, k=4))
    assert not resumable(was, SearchConfig(budget_forwards=500, k=8))
    assert not resumable(None, SearchConfig())


def test_groups_are_layer_kinds_and_embeddings():
    units = model_units(tiny_model("llama"), mlp_group=MLP)
    groups = groups_of(units)
    assert groups["L0.head_group"] == ["L0.attn.g0", "L0.attn.g1"]
    assert groups["L1.mlp_group"] == ["L1.mlp.c0", "L1.mlp.c1", "L1.mlp.c2"]
    assert groups["embed"] == ["embed"]


def test_pruning_enters_as_measured_moves_when_bits_cannot_meet_the_budget(setup):
    from dataclasses import replace

    from bitsack.plan import PRUNE

    _, model, units, meter, store, _ = setup()
    menu = replace(store.menu, prune=True)
    store.menu = menu
    costs = unit_costs(_shapes(units), menu, make_cost_models(["memory"]))
    limits = _limit(units, 2.4)  # below the smallest uniform choice (b2g32: 2.56 bits)
    # a feasible start that prunes (a one-shot plan would give one): every other MLP block
    start = {u.id: (PRUNE if u.kind == "mlp_group" and u.id.endswith(("c0", "c2"))
                    else parse_choice("b2g32", 16)) for u in units}
    # without descend, the one-shot plan is the only start that fits
    s = Search(model, units, store, meter, costs, limits,
               SearchConfig(budget_forwards=0, descend=False))
    assert s.fits(start) and not s.fits({u.id: parse_choice("b2g32", 16) for u in units})
    assert s.start({"oneshot": start})["incumbent"] == "oneshot"
    # with it, uniform b2g32 descended by measured prune moves is a start too
    s = Search(model, units, store, meter, costs, limits, SearchConfig(budget_forwards=300, k=4))
    res = s.run(extra_starts={"oneshot": start})
    assert "uniform b2g32 descended" in res.start["select_kl"]
    assert res.start["incumbent"] in res.start["select_kl"]
    assert s.fits(res.plan)
    assert any(c.pruned for c in res.plan.values())
    assert any((g, 0) in s.deltas for g in s.groups)  # prune moves were measured
    assert res.kl["holdout"] <= res.start["kl"]["holdout"] + 1e-12


def test_proposals_keep_one_option_per_matrix_under_format_constraints(setup):
    """A target format's constraints bind every proposal, Thompson-resampled ones included:
    without them the same search splits a layer's MLP blocks (the control)."""
    from bitsack.solver.costs.formats import matrix_groups, target_constraints

    _, model, units, meter, store, costs = setup(quantizer="rtn")
    shapes = unit_shapes(model, units)
    groups = matrix_groups(shapes)
    cons = target_constraints("compressed-tensors", shapes,
                              {u.id: list(store.menu.option_ids) for u in units}, 16)
    assert {c.type for c in cons} == {"same_option"}
    splits = {}
    for name, c in (("constrained", cons), ("free", ())):
        s = Search(model, units, store, meter, costs, _limit(units, 2.9), SearchConfig(k=4),
                   constraints=c)
        s.start()
        s.linearise()
        splits[name] = 0
        for seed in range(4):
            changes = (s.propose(4, np.random.default_rng(seed)) or ({},))[0]
            assert changes
            for g in groups:
                moved = [u for u in g if u in changes]
                splits[name] += bool(moved) and len(moved) < len(g)
    assert splits["constrained"] == 0 and splits["free"] > 0


def test_a_budget_just_under_a_uniform_level_starts_from_that_level_descended(setup):
    """3.1 bits/weight: the fitting uniform plan is b2g32 (2.56); b2g16 (3.125) does not fit.
    The search also starts from b2g16 moved down by one knapsack over its measured down
    moves: that plan fits, uses most of the budget, and is a start candidate measured like
    the uniform ones; ``descend=False`` leaves it out."""
    from bitsack.search.driver import store_walk

    _, model, units, meter, store, costs = setup()
    limits = _limit(units, 3.1)
    b2g32, b2g16 = parse_choice("b2g32", 16), parse_choice("b2g16", 16)
    assert store_walk(store.menu, costs, limits) == b2g16  # nearer the budget than b2g32
    assert store_walk(store.menu, costs, _limit(units, 2.7)) == b2g32
    s = Search(model, units, store, meter, costs, limits, SearchConfig(budget_forwards=0))
    info = s.start()
    assert info["descend"]["from"] == "uniform b2g16" and info["descend"]["changed"] > 0
    name = "uniform b2g16 descended"
    assert name in info["select_kl"] and "uniform b2g32" in info["select_kl"]
    plan, _ = s.descend(b2g16)
    assert s.fits(plan)
    assert {c for c in plan.values()} <= {b2g16, b2g32}
    used = s.usage(plan)["memory_bytes"]
    assert s.usage(s.uniform(b2g32))["memory_bytes"] < used <= limits["memory_bytes"]
    # the candidate's score is its measured select KL
    s._set(plan)
    assert s._mean("select") == pytest.approx(info["select_kl"][name], rel=1e-9)
    off = Search(model, units, store, meter, costs, limits,
                 SearchConfig(budget_forwards=0, descend=False)).start()
    assert "descend" not in off and name not in off["select_kl"]


def test_a_descended_start_keeps_the_descents_deltas_of_the_groups_it_did_not_move(setup):
    """relinearise "moved": the Δ's the descent measured for groups it did not move are Δ's of
    those groups' moves from the descended plan too; the first linearisation keeps them and
    measures the rest ("layers" measures everything again)."""
    first, spent = {}, {}
    for mode in RELINEARISE:
        _, model, units, meter, store, costs = setup()
        saved = []
        s = Search(model, units, store, meter, costs, _limit(units, 3.1),
                   SearchConfig(budget_forwards=1000, relinearise=mode),
                   checkpoint=lambda ck, saved=saved: saved.append(json.loads(json.dumps(ck))))
        res = s.run()
        assert res.start["incumbent"] == "uniform b2g16 descended"
        first[mode] = {(d["group"], d["d"]): d["delta"] for d in saved[0]["deltas"]}
        spent[mode] = res.steps[0].forwards
        carried = s._descents["uniform b2g16 descended"]
        if mode == "moved":
            assert res.start["carried"] == len(carried) > 0
            assert {k: p.mean for k, (p, _) in carried.items()} == \
                {k: first[mode][k] for k in carried}
        else:
            assert "carried" not in res.start
    kept = [k for k, v in first["moved"].items() if v == first["layers"].get(k)]
    assert kept and len(kept) < len(first["layers"])  # measured again only by "layers"
    assert spent["moved"] < spent["layers"]


def test_start_plans_are_projected_onto_the_menu_and_a_pruned_start_measures_pruning(setup):
    """A one-shot plan (8-bit units, pruned units) is projected onto the store's menu window:
    off-menu choices move to the nearest by nominal bits, pruned units stay pruned; a pruned
    start that wins the start turns on the measured pruning moves."""
    from bitsack.plan import PRUNE
    from bitsack.search.driver import project

    _, model, units, meter, store, costs = setup()
    window = store.menu.window(parse_choice("b2g32", 16), 2)  # b2g32 … b3g32
    assert [c.option_id for c in window.steps] == ["b2g32", "b2g16", "b3g32"]
    b8, b2 = parse_choice("b8g16", 16), parse_choice("b2g32", 16)
    plan = {u.id: (PRUNE if u.kind == "mlp_group" and u.id.endswith("c0") else
                   b8 if u.layer == 0 else b2) for u in units}
    projected, moved = project(plan, window)
    assert moved == sum(1 for u in units if plan[u.id] == b8)
    assert {projected[u.id] for u in units if plan[u.id] == b8} == {parse_choice("b3g32", 16)}
    assert all(projected[u] == c for u, c in plan.items() if c != b8)
    # a start that prunes every MLP block but one per layer at 4 bits beats uniform 2 bits
    start = {u.id: (PRUNE if u.kind == "mlp_group" and not u.id.endswith("c0")
                    else parse_choice("b4g32", 16)) for u in units}
    from dataclasses import replace

    costs = unit_costs(_shapes(units), replace(store.menu, prune=True),
                       make_cost_models(["memory"]))  # as run prices them: prune included
    s = Search(model, units, store, meter, costs, _limit(units, 3.2),  # start: 3.16 bits
               SearchConfig(budget_forwards=300, k=4, descend=False))
    assert not s.menu.prune and s.fits(start)
    res = s.run(extra_starts={"oneshot": start})
    assert res.start["incumbent"] == "oneshot"
    assert s.menu.prune and any((g, 0) in s.deltas for g in s.groups)
    assert s.fits(res.plan)


def test_after_a_rejection_units_move_one_step_until_the_next_accept(setup):
    _, model, units, meter, store, costs = setup()
    menu = Menu.parse(MENU)
    # z large: nothing is accepted, so every step after the first follows a rejection
    s = Search(model, units, store, meter, costs, _limit(units, 2.85),
               SearchConfig(budget_forwards=400, k=8, k_min=1, z=1e9, descend=False))
    res = s.run()
    assert [st.accepted for st in res.steps] == [False] * len(res.steps)
    assert res.steps[0].reach == 2 and len(res.steps) >= 2

    def distance(frm, to):
        return abs(menu.index(parse_choice(to, 64)) - menu.index(parse_choice(frm, 64)))

    assert any(distance(*v) == 2 for v in res.steps[0].changed.values())  # reach 2 was used
    for st in res.steps[1:]:
        assert st.reach == 1
        assert all(distance(*v) == 1 for v in st.changed.values()), st.changed


def test_two_step_moves_are_measured_for_the_best_groups_and_priced_as_measured(setup):
    _, model, units, meter, store, costs = setup(incumbent="b4g16")
    s = Search(model, units, store, meter, costs, _limit(units, 8.0),  # room for b16 there
               SearchConfig(far=2, descend=False))
    s._set(s.uniform(parse_choice("b4g16", 16)))  # one step: b4g32 / b8g16, two: b3g16 / b16
    s.linearise()
    for d in (+1, -1):
        far = [g for (g, dd) in s.deltas if dd == 2 * d]
        assert far and set(far) == set(s._far_groups(list(s.groups), d)) and len(far) <= 2
    # the ranking, planted: up, the largest gain per budget spent (a step up that does not
    # help is never extended); down, the smallest loss per budget saved
    groups = list(s.groups)
    for d, planted in ((+1, [-1.0, -3.0, 0.5, -2.0, -0.1, 0.0]),
                       (-1, [0.4, 0.1, 2.0, 0.3, 5.0, 0.05])):
        for g, m in zip(groups, planted, strict=True):
            s.deltas[(g, d)] = (Paired(m, 0.0, 8), s._move(g, d))
        sizes = [sum(abs(costs[u][c.option_id]["memory_bytes"]
                         - costs[u][s.plan[u].option_id]["memory_bytes"])
                     for u, c in s._move(g, d).items()) for g in groups]
        per = sorted((m / z, i) for i, (m, z) in enumerate(zip(planted, sizes, strict=True))
                     if d < 0 or m < 0)
        assert s._far_groups(groups, d) == [groups[i] for _, i in per[:2]]
        assert d < 0 or len(per) == 4  # up: the groups whose step does not help are out
    # a far move measured as a large gain is proposed as measured (two steps at once), where
    # extrapolating its one step would not pay for it
    g = "L0.mlp_group"
    one, moved1 = s.deltas[(g, +1)]
    s.deltas[(g, +1)] = (Paired(0.0, 0.0, one.n), moved1)
    moved2 = s._move(g, +2)
    s.deltas[(g, +2)] = (Paired(-10.0, 0.0, one.n), moved2)
    for other in [k for k in s.deltas if k[0] != g]:
        paired, moved = s.deltas[other]
        s.deltas[other] = (Paired(abs(paired.mean) + 1e-3, 0.0, paired.n), moved)
    changes, predicted, _ = s.propose(k=len(s.units) * 2)
    assert {u: c.option_id for u, c in changes.items() if u in moved2} == \
        {u: c.option_id for u, c in moved2.items()}
    assert predicted < -1.0


def test_a_pruned_unit_never_moves_two_steps_and_a_spent_budget_is_not_descended(setup):
    from bitsack.plan import PRUNE

    _, model, units, meter, store, costs = setup()
    menu = replace(Menu.parse(MENU), prune=True)
    store.menu = menu
    b3 = parse_choice("b3g32", 16)
    s = Search(model, units, store, meter, costs, _limit(units, 6.0), SearchConfig())
    plan = {**s.uniform(b3), "L1.mlp.c0": PRUNE}
    s._set(plan)
    assert "L1.mlp.c0" in s._move("L1.mlp_group", +1)
    assert "L1.mlp.c0" not in s._move("L1.mlp_group", +2)
    assert set(s._move("L1.mlp_group", +2)) == {"L1.mlp.c1", "L1.mlp.c2"}
    # a budget that uniform b3g32 spends exactly: the descent from the level above is skipped
    exact = {"memory_bytes": s.usage(s.uniform(b3))["memory_bytes"]}
    s = Search(model, units, store, meter, costs, exact, SearchConfig(budget_forwards=0))
    info = s.start()
    assert "skipped" in info["descend"] and info["incumbent"] == "uniform b3g32"
    assert meter.forwards < 200  # no linearisation: the starts' traces only


@pytest.mark.parametrize("mode", RELINEARISE)
def test_an_accepted_step_re_measures_the_groups_relinearise_names(setup, mode):
    _, model, units, meter, store, costs = setup()
    # k = 1 (z = 0: any measured gain is accepted): a step moves one unit, so "moved" (its
    # group) and "layers" (its layer's groups) differ
    s = Search(model, units, store, meter, costs, _limit(units, 2.85),
               SearchConfig(budget_forwards=600, k=1, k_min=1, k_max=1, z=0.0, refresh=99,
                            relinearise=mode, descend=False))
    calls, linearise = [], s.linearise
    s.linearise = lambda groups=None, **kw: (calls.append(groups), linearise(groups, **kw))
    res = s.run()
    assert calls[0] is None  # the first linearisation measures every group
    rules = {"moved": lambda members, st, layers: any(u in st.changed for u in members),
             "layers": lambda members, st, layers: s.stitch.units[members[0]].layer in layers}
    expected, differ = [], False
    for st in res.steps[:-1]:
        layers = {s.stitch.units[u].layer for u in st.changed}
        if st.accepted and None in layers or not st.accepted and not st.changed:
            expected.append(None)
        elif st.accepted:
            stale = {m: [g for g, members in s.groups.items() if rule(members, st, layers)]
                     for m, rule in rules.items()}
            expected.append(stale[mode])
            differ |= stale["moved"] != stale["layers"]
    assert differ  # the case tells the two rules apart
    assert calls[1:] == expected


def test_meter_measures_some_batches_of_a_split(setup):
    """``kl(..., batches=…)`` gives those batches' rows of the full measurement, at their
    share of the forwards."""
    _, model, units, meter, store, _ = setup()
    meter.trace("screen")
    spent = [meter.forwards]
    full = meter.kl("screen", 1)
    spent.append(meter.forwards)
    part = meter.kl("screen", 1, [1])
    spent.append(meter.forwards)
    assert meter.n_batches("screen") == 2
    assert list(meter.rows("screen", [1])) == [4, 5, 6, 7]
    np.testing.assert_allclose(part, full[4:], rtol=1e-12, atol=0)
    assert spent[2] - spent[1] == pytest.approx((spent[1] - spent[0]) / 2)


@pytest.mark.parametrize("rse", [1e-12, 0.5, 1e6])
def test_sequential_screening_settles_large_deltas_on_half_the_split(setup, rse):
    """``rse``: a Δ whose standard error on the first half of ``screen`` is at most rse·|Δ|
    stands on that half (n = 4 of 8 sequences); the others are the whole split's Δ, equal to
    the one measured without sequential screening. Fewer forwards when any Δ stands on half."""
    deltas, spent = {}, {}
    for r in (0.0, rse):
        _, model, units, meter, store, costs = setup()
        s = Search(model, units, store, meter, costs, _limit(units, 2.85),
                   SearchConfig(budget_forwards=0, rse=r, descend=False))
        s.start()
        before = meter.forwards
        s.linearise()
        deltas[r], spent[r] = s.deltas, meter.forwards - before
    half = {k: p for k, (p, _) in deltas[rse].items() if p.n == 4}
    whole = {k: p for k, (p, _) in deltas[rse].items() if p.n == 8}
    assert set(half) | set(whole) == set(deltas[0.0])
    for k, p in whole.items():
        assert p.mean == pytest.approx(deltas[0.0][k][0].mean, rel=1e-9, abs=1e-12)
        assert p.se == pytest.approx(deltas[0.0][k][0].se, rel=1e-9, abs=1e-12)
    assert all(p.se <= rse * abs(p.mean) for p in half.values())
    if rse == 1e6:
        assert not whole and spent[rse] == pytest.approx(spent[0.0] / 2)
    elif rse == 1e-12:
        assert not half and spent[rse] == pytest.approx(spent[0.0])
    else:
        assert half and whole and spent[0.0] / 2 < spent[rse] < spent[0.0]


def test_trust_region_moves_by_the_ratio_of_measured_to_predicted(setup):
    """grow "ratio": after an accepted step k doubles (ρ ≥ 0.75), stays (0.25 ≤ ρ < 0.75) or
    halves (ρ < 0.25, and every group is linearised again); a rejected step halves k."""
    from bitsack.search.types import Step, trust_ratio

    _, model, units, meter, store, costs = setup()
    s = Search(model, units, store, meter, costs, _limit(units, 2.85),
               SearchConfig(budget_forwards=1e9, k=8, k_min=2, k_max=32, refresh=99,
                            grow="ratio", descend=False))
    uid = units[0].id
    # (ρ, accepted): measured / predicted on select
    script = [(0.9, True), (0.5, True), (0.1, True)] + [(None, False)] * 3
    ks, calls = [], []

    def step(it, k, reach, floor=0.0):
        ks.append(k)
        rho, ok = script[it - 1]
        cur = s.plan[uid]
        to = s.menu.step(cur, +1) or s.menu.step(cur, -1)
        sel = {"delta": -0.1 * rho if ok else 0.01, "se": 0.001, "n": 8}
        return Step(it, k, {uid: [cur.option_id, to.option_id]}, -0.1, sel, sel,
                    sel if ok else None, ok, "scripted", 1, meter.forwards, reach=reach)

    s._step = step
    linearise = s.linearise
    s.linearise = lambda groups=None, **kw: (calls.append(groups), linearise(groups, **kw))
    res = s.run()
    assert [trust_ratio(st) for st in res.steps[:3]] == pytest.approx([0.9, 0.5, 0.1])
    assert ks == [8, 16, 16, 8, 4, 2]
    assert res.stopped == "trust region below k_min=2"
    # a full linearisation first and after the poorly predicted step; partial after the others
    assert calls[0] is None and calls[1] is not None and calls[2] is not None
    assert calls[3] is None
    with pytest.raises(Exception, match="search_grow"):
        SearchConfig(grow="sometimes")


def test_the_search_stops_once_no_proposal_is_predicted_beyond_select_noise(setup):
    """stop_z: the search stops (converged) before measuring a proposal predicted to gain less
    than stop_z standard errors of the last select measurement; what it did until then is
    the unstopped search's, step for step; 0 searches until the budget."""
    def run(stop_z, budget=400, resume=None):
        _, model, units, meter, store, costs = setup()
        saved = []
        s = Search(model, units, store, meter, costs, _limit(units, 2.85),
                   SearchConfig(budget_forwards=budget, k=4, stop_z=stop_z),
                   checkpoint=lambda ck: saved.append(json.loads(json.dumps(ck))))
        return s.run(resume=resume).to_dict(), saved

    full, _ = run(0.0)
    assert not full["stopped"].startswith("converged")
    # each step records the best prediction among its candidates (what the rule compares)
    assert all(st["best_predicted"] <= st["predicted"] + 1e-12 for st in full["steps"]
               if st["candidates"])
    selected = [i for i, st in enumerate(full["steps"]) if st["select"]]
    assert selected and selected[0] + 1 < len(full["steps"])
    stopped, saved = run(1e6)  # nothing is worth a million standard errors
    assert stopped["stopped"].startswith("converged: the best of")
    n = selected[0] + 1  # the stop comes right after the first select measurement
    assert stopped["steps"] == full["steps"][:n]
    assert stopped["forwards"] < full["forwards"]
    # a converged search resumed with a larger budget converges again, identically
    again, _ = run(1e6, budget=800, resume=saved[-1])
    assert again["steps"] == stopped["steps"] and again["stopped"] == stopped["stopped"]
    with pytest.raises(Exception, match="search_stop_z"):
        SearchConfig(stop_z=-1.0)
