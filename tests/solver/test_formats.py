"""Target formats on synthetic shapes (no model): what each format stores, the matrix groups
found from shared matrices, the constraints, exact bytes, and ``retarget`` of a problem."""

from __future__ import annotations

import pytest

from bitsack.errors import ValidationError
from bitsack.kernels.formats import compressed_tensors_nbytes, gguf_nbytes, gguf_type
from bitsack.solver import solve
from bitsack.solver.costs import MemoryModel, SliceShape, UnitShape
from bitsack.solver.costs.formats import (
    geometry_metadata,
    matrix_groups,
    retarget,
    shapes_from_metadata,
    target_constraints,
    target_menu,
    target_options,
)
from bitsack.solver.costs.memory import unit_nbytes
from bitsack.solver.problem import Option, Problem, Resource, Unit, parse_option
from bitsack.solver.solution import evaluate
from bitsack.solver.transforms import with_limits

H, F = 64, 96  # hidden width, MLP width


def _layer(i: int, prefix: str = "x") -> list[UnitShape]:
    """A Llama-like layer under arbitrary matrix names: 2 head groups (rows of a, b; columns
    of c) and 3 MLP blocks (rows of d; columns of e)."""
    a, b, c, d, e = (f"{prefix}{i}.{k}" for k in "abcde")
    heads = [UnitShape(f"h{i}.{g}", "head_group", (
        SliceShape(32, H, 0, a, 32 * g, H), SliceShape(16, H, 0, b, 16 * g, 32),
        SliceShape(H, 32, 1, c, 32 * g, H)), layer=i) for g in range(2)]
    mlp = [UnitShape(f"m{i}.{k}", "mlp_group", (
        SliceShape(32, H, 0, d, 32 * k, F), SliceShape(H, 32, 1, e, 32 * k, F)), layer=i)
        for k in range(3)]
    return heads + mlp


EMBED = UnitShape("emb", "embedding", (SliceShape(128, H, 0, "table", 0, 128),))
SHAPES = [EMBED] + _layer(0) + _layer(1)


def test_matrix_groups_come_from_shared_matrices_not_names():
    groups = matrix_groups(SHAPES)
    assert groups == [["emb"], ["h0.0", "h0.1"], ["m0.0", "m0.1", "m0.2"], ["h1.0", "h1.1"],
                      ["m1.0", "m1.1", "m1.2"]]
    # a unit that shares one matrix with another group joins it (transitively)
    bridge = UnitShape("z", "other", (SliceShape(8, H, 0, "x0.a", 0, H),
                                      SliceShape(8, H, 0, "x1.d", 0, F)))
    merged = matrix_groups(SHAPES + [bridge])
    assert sorted(len(g) for g in merged) == [1, 2, 3, 6]


def test_gguf_keeps_stored_undominated_options_and_prices_blocks():
    opts = ["prune", "b2g32", "b3g32", "b4g32", "b4g64", "b5g32", "b8g32", "b8g64", "b16",
            "b4g16"]
    left: dict[str, str] = {}
    allowed = target_options("gguf", SHAPES, {s.id: opts if s.kind != "embedding" else opts[1:]
                                              for s in SHAPES}, 64, left)
    assert allowed["h0.0"] == ("prune", "b3g32", "b4g32", "b5g32", "b8g32", "b16")
    assert allowed["emb"] == ("b3g32", "b4g32", "b5g32", "b8g32", "b16")
    assert "no ggml type holds 4-bit groups of 16" in left["b4g16"]
    assert left["b2g32"].startswith("dominated by b3g32")  # both Q4_0
    assert left["b8g64"].startswith("dominated by b8g32")
    # a block of 32 weights: Q4_0 18 bytes, Q4_1 20, Q5_1 24, Q8_0 34; F16 2 per weight
    unit = SHAPES[1]
    n = unit.params
    for bits, per32 in ((3, 18), (4, 20), (5, 24), (8, 34), (16, 64)):
        assert unit_nbytes("gguf", unit, bits, 32) == n // 32 * per32
    assert [gguf_type(b) for b in (1, 4, 5, 6, 8, 16)] == ["Q4_0", "Q4_1", "Q5_1", "Q8_0",
                                                          "Q8_0", "F16"]


def test_compressed_tensors_has_no_pruning_and_fp16_embeddings():
    opts = ["prune", "b2g32", "b4g32", "b4g64", "b8g64", "b16"]
    left: dict[str, str] = {}
    allowed = target_options("compressed-tensors", SHAPES, {s.id: opts for s in SHAPES}, 64,
                             left)
    # g64 does not divide a head group's 32 columns of c (nor MLP blocks' 32 of e)
    assert allowed["h0.0"] == ("b2g32", "b4g32", "b16")
    assert left["b4g64"].startswith("dominated by b16")  # the first group's reason: emb's
    left = {}
    target_options("compressed-tensors", SHAPES[1:], {s.id: opts for s in SHAPES[1:]}, 64, left)
    assert "does not divide the unit's 32 columns" in left["b4g64"]
    assert "pruned" in left["prune"]
    assert allowed["emb"] == ("b16",)  # any other option is written fp16 too: dominated
    assert unit_nbytes("compressed-tensors", EMBED, 4, 32) == 2 * EMBED.params


@pytest.mark.parametrize("bits,g", [(2, 32), (3, 32), (4, 16), (8, 32)])
def test_compressed_tensors_shares_add_up_to_each_matrix(bits, g):
    layer = _layer(0)
    for members in (layer[:2], layer[2:]):
        total = sum(unit_nbytes("compressed-tensors", u, bits, g) for u in members)
        mats = {s.param: s.matrix for u in members for s in u.slices}
        assert total == sum(compressed_tensors_nbytes(r, c, bits, g, shape=False)
                            for r, c in mats.values())


def test_gguf_sizes_refuse_partial_blocks():
    with pytest.raises(ValidationError, match="4-bit groups of 32 on 48-wide rows exactly; "
                       "valid: groups and rows of whole blocks of 32"):
        gguf_nbytes(4, 48, 4)
    with pytest.raises(ValidationError, match="does not divide"):
        compressed_tensors_nbytes(4, 96, 4, 64)
    assert gguf_nbytes(4, 64, 0) == compressed_tensors_nbytes(4, 64, 0, 32) == 0


def test_constraints_per_format():
    ids = {s.id: ("prune", "b4g32", "b16") if s.kind != "embedding" else ("b4g32", "b16")
           for s in SHAPES}
    gguf = target_constraints("gguf", SHAPES, ids, 64)
    assert [(c.type, c.units) for c in gguf] == [
        ("same_bits", ("h0.0", "h0.1")), ("same_bits", ("m0.0", "m0.1", "m0.2")),
        ("same_bits", ("h1.0", "h1.1")), ("same_bits", ("m1.0", "m1.1", "m1.2")),
        ("min_kept", ("h0.0", "h0.1"))]
    assert gguf[-1].count == 1
    # without pruning, or for compressed-tensors: one option per matrix group
    no_prune = {u: tuple(o for o in v if o != "prune") for u, v in ids.items()}
    for fmt, offered in (("gguf", no_prune), ("compressed-tensors", no_prune)):
        cons = target_constraints(fmt, SHAPES, offered, 64)
        assert [c.type for c in cons] == ["same_option"] * 4
    # two group sizes of one bit-width: same_bits would let them mix, so same_option
    mixed = {u: ("prune", "b4g32", "b4g64") for u in ids}
    assert {c.type for c in target_constraints("gguf", SHAPES, mixed, 64)} == \
        {"same_option", "min_kept"}
    assert target_constraints("bitsack", SHAPES, ids, 64) == ()


def test_menu_is_what_every_unit_stores():
    menu = ("b2g128", "b2g64", "b2g32", "b3g64", "b3g32", "b4g128", "b4g64", "b4g32",
            "b8g64", "b16")
    # g64 and g128 split the 32 columns a unit holds of c and e; g128 does not divide 64
    left: dict[str, str] = {}
    assert target_menu("gguf", SHAPES, menu, 64, left) == ("b3g32", "b4g32", "b16")
    assert left["b2g32"].startswith("dominated by b3g32")
    assert "32 columns" in left["b8g64"]
    # the embedding's quantized options cost fp16 in compressed-tensors, but not the others'
    assert target_menu("compressed-tensors", SHAPES, menu, 64) == ("b2g32", "b3g32", "b4g32",
                                                                 "b16")
    wide = [EMBED] + [UnitShape(u.id, u.kind, tuple(
        SliceShape(s.rows * 4, s.cols, 0, s.param, s.start * 4, s.extent * 4) if s.dim == 0
        else SliceShape(s.rows, s.cols * 4, 1, s.param, s.start * 4, s.extent * 4)
        for s in u.slices), u.layer) for u in _layer(0)]
    assert target_menu("gguf", wide, menu, 64) == ("b3g32", "b4g32", "b8g64", "b16")
    assert target_menu("bitsack", SHAPES, menu, 64) == menu
    with pytest.raises(ValidationError, match="stores none"):
        target_menu("gguf", SHAPES, ("b4g16",), 64)


def _problem(shapes, options=("prune", "b2", "b4", "b8", "b16")) -> Problem:
    model = MemoryModel()
    units = []
    for s in shapes:
        ids = options if s.kind != "embedding" else tuple(o for o in options if o != "prune")
        opts = tuple(Option(o, 0.0 if o == "b16" else 1.0 / (1 + i),
                            model.cost(s, parse_option(o).bits, 32)) for i, o in enumerate(ids))
        units.append(Unit(s.id, opts, kind=s.kind, layer=s.layer, params=s.params))
    return Problem(name="synthetic", units=tuple(units), resources=(Resource("memory_bytes"),),
                   metadata={"geometry": geometry_metadata(shapes), "group_size": 32,
                             "cost_models": [model.describe()]})


def test_retarget_restricts_prices_and_constrains_a_problem():
    problem = _problem(SHAPES)
    assert shapes_from_metadata(problem) == [
        UnitShape(s.id, s.kind, s.slices, s.layer) for s in SHAPES]
    assert retarget(problem, "bitsack") is problem
    for fmt in ("gguf", "compressed-tensors"):
        out = retarget(problem, fmt)
        assert out.metadata["format"] == fmt
        assert out.metadata["cost_models"][0]["format"] == fmt
        assert retarget(out, fmt) is out
        with pytest.raises(ValidationError, match="was built for"):
            retarget(out, "bitsack" if fmt == "gguf" else "gguf")
        for u in out.units:
            shape = next(s for s in SHAPES if s.id == u.id)
            for o in u.options:
                assert o.cost["memory_bytes"] == unit_nbytes(
                    fmt, shape, o.bits, o.spec.group_size or 32)
        tight = with_limits(out, {"memory_bytes": 0.6 * sum(
            max(o.cost["memory_bytes"] for o in u.options) for u in out.units)})
        sol = solve(tight, "auto")
        assert sol.has_solution
        ev = evaluate(tight, sol.assignment)
        assert ev.max_violation <= 1e-9
        for group in matrix_groups(SHAPES):
            kept = {sol.assignment[u] for u in group} - {"prune"}
            assert len(kept) <= 1
            if fmt == "compressed-tensors":
                assert "prune" not in {sol.assignment[u] for u in group}
    gguf = retarget(problem, "gguf")
    # b2 is Q4_0 (4.5 bits per weight), b4 Q4_1 (5): neither dominates
    assert [o.id for o in gguf.units[1].options] == ["prune", "b2", "b4", "b8", "b16"]
    assert "format_left_out" not in gguf.metadata
    sym = retarget(problem, "gguf", scale_bits=4, symmetric=True)
    assert sym.metadata["symmetric"] is True and sym.metadata["scale_bits"] == 4
    # symmetric: b4 is Q4_0 too, and dominates b2 (no row here is a whole super-block)
    assert [o.id for o in sym.units[1].options] == ["prune", "b4", "b8", "b16"]
    assert sym.metadata["format_left_out"]["b2"].startswith("dominated by b4")


def test_scale_codes_reprice_a_bitsack_problem_and_keep_its_losses():
    from bitsack.solver.costs.formats import with_scale_bits

    problem = _problem(SHAPES)
    assert with_scale_bits(problem, None) is problem
    dq = with_scale_bits(problem, 6)
    assert dq.metadata["scale_bits"] == 6 and dq.metadata["cost_models"][0]["scale_bits"] == 6
    cheaper = 0
    for u, v in zip(problem.units, dq.units, strict=True):
        shape = next(s for s in SHAPES if s.id == u.id)
        for o, p in zip(u.options, v.options, strict=True):
            assert (p.id, p.loss) == (o.id, o.loss)
            assert p.cost["memory_bytes"] == unit_nbytes(
                "bitsack", shape, o.bits, o.spec.group_size or 32, 6)
            cheaper += p.cost["memory_bytes"] < o.cost["memory_bytes"]
    assert cheaper  # 6-bit codes instead of fp16 scales
    with pytest.raises(ValidationError, match="scale_bits: 6 with format 'compressed-tensors'"):
        with_scale_bits(retarget(problem, "compressed-tensors"), 6)


def test_retarget_needs_geometry():
    bare = Problem(name="bare", units=(Unit("u", (Option("b4", 0.1, {"memory_bytes": 1.0}),)),),
                   resources=(Resource("memory_bytes"),))
    with pytest.raises(ValidationError, match="geometry"):
        retarget(bare, "gguf")
    with pytest.raises(ValidationError, match="format"):
        retarget(bare, "safetensors")


def test_default_memory_model_is_unchanged():
    assert MemoryModel().describe() == {
        "name": "memory", "resources": ["memory_bytes"],
        "formula": "rows*ceil(bits*cols/32)*4 + rows*ceil(cols/g)*2 + "
                   "ceil(rows*ceil(cols/g)*bits/32)*4 per slice; 16 bits: 2*rows*cols; "
                   "pruned: 0"}
    unit = SHAPES[1]
    assert MemoryModel().cost(unit, 3, 32)["memory_bytes"] == sum(
        s.rows * -(-3 * s.cols // 32) * 4 + s.rows * -(-s.cols // 32) * 2
        + -(-s.rows * -(-s.cols // 32) * 3 // 32) * 4 for s in unit.slices)
