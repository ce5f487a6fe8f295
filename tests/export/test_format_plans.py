"""``--format``: plans made for a target file format export without refusal, one option per
matrix, and the budget's bytes are the bytes the exporter writes for the units' tensors —
for every method (oneshot, uniform, search), through ``bitsack run``, ``profile``/``solve``
and the Python API."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitsack.export import export_model
from bitsack.export.common import GridMatrix
from bitsack.export.compressed_tensors import grid_tensors
from bitsack.export.ggml_blocks import encode
from bitsack.kernels.formats import compressed_tensors_nbytes, gguf_type
from bitsack.models import model_units
from bitsack.models.testing import tiny_model
from bitsack.pipeline import RunConfig, run
from bitsack.solver.costs.formats import matrix_groups

MLP = 32


def test_types_are_the_exporters():
    # block sizes: tests/export/test_gguf_kquants.py
    rng = np.random.default_rng(0)
    for bits in range(1, 9):
        m = GridMatrix("m", bits, 32, rng.integers(0, 1 << bits, (4, 64), dtype=np.uint8),
                       np.full((4, 2), 0.01, np.float16), np.zeros((4, 2), np.float16))
        assert encode(m).type == gguf_type(bits)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("rows,cols,g", [(6, 64, 32), (40, 96, 32), (3, 128, 64)])
def test_compressed_tensors_size_is_the_written_arrays(bits, rows, cols, g):
    rng = np.random.default_rng(bits)
    m = GridMatrix("m", bits, g, rng.integers(0, 1 << bits, (rows, cols), dtype=np.uint8),
                   np.full((rows, cols // g), 0.01, np.float16),
                   rng.integers(0, 1 << bits, (rows, cols // g)).astype(np.float16))
    written = sum(a.nbytes for a in grid_tensors(m).values())
    assert written == compressed_tensors_nbytes(rows, cols, bits, g)


@pytest.fixture
def tiny(monkeypatch, tmp_path, one_thread):
    """``load_model`` returns a fresh (identical) tiny Llama each call (a run consumes it)."""
    from export_helpers import patch_tiny_run

    return patch_tiny_run(monkeypatch, tmp_path)


def _settings(tiny, **kw) -> dict:
    calib, ev = tiny
    base = dict(calib=str(calib), eval=str(ev), bits=(2, 3, 4, 8),
                group_size=32, mlp_group=MLP, profile_nsamples=4, profile_seqlen=24,
                compress_nsamples=4, compress_seqlen=24, eval_seqlen=32, eval_windows=2,
                time_limit_s=10.0, quantizer="rtn",
                menu=("b2g32", "b3g32", "b4g32", "b4g64", "b8g32", "b16"),
                screen=(6, 24), select=(8, 24), holdout=(8, 24), search_budget=150.0,
                search_k=4)
    base.update(kw)
    return base


def _cfg(tiny, out, **kw) -> RunConfig:
    return RunConfig(model="tiny", out=str(out), **_settings(tiny, **kw))


def _one_type_per_matrix(plan: dict[str, str], fmt: str, vocab_groups: int = 1) -> None:
    from bitsack.profiling.build import unit_shapes

    model = tiny_model("llama", seed=3)
    shapes = unit_shapes(model, model_units(model, mlp_group=MLP, vocab_groups=vocab_groups))
    for group in matrix_groups(shapes):
        chosen = [plan[u] for u in group]
        kept = set(chosen) - {"prune"}
        assert len(kept) <= 1, (group, chosen)
        if fmt == "compressed-tensors":
            assert "prune" not in chosen


def _unit_tensor_bytes(result, folder) -> int:
    """Bytes the export wrote for tensors that came from the planned units' matrices (the
    packed modules of the folder; not norms, not a zero FFN, not compressed-tensors'
    16-byte ``weight_shape`` of each module)."""
    packed = json.loads((folder / "bitsack.json").read_text())["packed"]
    return sum(t.nbytes for t in result.tensors
               if t.source in packed and not t.name.endswith(".weight_shape"))


# compressed-tensors keeps embeddings fp16 (a fifth of this tiny model's weights): the budgets
# leave room for them
CASES = [("compressed-tensors", "oneshot", 6.5), ("compressed-tensors", "uniform", 7.0),
         ("compressed-tensors", "search", 7.0), ("gguf", "oneshot", 4.5),
         ("gguf", "uniform", 6.0), ("gguf", "search", 6.0)]


@pytest.mark.parametrize("fmt,method,avg_bits,vocab_groups",
                         [(*c, 1) for c in CASES] + [("gguf", "search", 6.0, 3),
                                                     ("compressed-tensors", "oneshot", 6.5, 3)])
def test_plan_for_a_format_exports_with_the_budgeted_bytes(tiny, tmp_path, tokenizer_gguf,
                                                           fmt, method, avg_bits, vocab_groups):
    # with the embedding in row ranges (vocab_groups 3) the format's one-type-per-matrix rule
    # binds them together: the export still writes exactly the certified bytes
    out = tmp_path / "run"
    s = run(_cfg(tiny, out, method=method, format=fmt, avg_bits=avg_bits,
                 vocab_groups=vocab_groups))
    sol = json.loads((out / "solution.json").read_text())
    plan = sol["assignment"]
    _one_type_per_matrix(plan, fmt, vocab_groups)
    assert ("embed.v2" in plan) == (vocab_groups == 3)
    usage = s.certificate["usage"]["memory_bytes"]
    assert usage <= s.certificate["limits"]["memory_bytes"] + 1e-6
    kw = {"tokenizer_gguf": tokenizer_gguf} if fmt == "gguf" else {}
    res = export_model(out / "model", tmp_path / "export", format=fmt, **kw)
    assert _unit_tensor_bytes(res, out / "model") == usage
    if fmt == "gguf":  # a pruned plan is written as arch deci
        pruned = "prune" in plan.values()
        assert res.layout["architecture"] == ("deci" if pruned else "llama")
        assert pruned or method != "oneshot"  # this one-shot plan prunes (deci exercised)


def test_default_format_is_unchanged(tiny, tmp_path):
    free = run(_cfg(tiny, tmp_path / "a", method="oneshot", avg_bits=3.5))
    again = run(_cfg(tiny, tmp_path / "b", method="oneshot", avg_bits=3.5, format="bitsack"))
    assert free.certificate["usage"] == again.certificate["usage"]
    stage = json.loads((tmp_path / "a" / "compress.stage.json").read_text())
    assert "format" not in stage["inputs"]["config"]  # earlier runs' records stay valid


def test_formats_share_one_profile_and_the_api_passes_format(tiny, tmp_path):
    import bitsack

    out = tmp_path / "run"
    run(_cfg(tiny, out, method="oneshot", avg_bits=6.5, format="compressed-tensors"))
    res = bitsack.compress("tiny", avg_bits=6.0, method="oneshot", out=out, format="gguf",
                           **_settings(tiny))
    assert "profile" in res.summary.reused
    _one_type_per_matrix(res.plan, "gguf")


def test_profile_and_solve_cli_take_a_format(tiny, tmp_path, capsys):
    from bitsack.cli import main
    from bitsack.solver import load_problem

    calib, _ = tiny
    common = ["--model", "tiny", "--calib", str(calib), "--bits", "2,3,4,8", "--group-size",
              "32", "--mlp-group", str(MLP), "--nsamples", "4", "--seqlen", "24", "--quiet"]
    assert main(["profile", *common, "--out", str(tmp_path / "free")]) == 0
    assert main(["profile", *common, "--format", "gguf", "--out", str(tmp_path / "gguf")]) == 0
    free = load_problem(tmp_path / "free" / "problem.yaml")
    gguf = load_problem(tmp_path / "gguf" / "problem.yaml")
    assert "format" not in free.metadata and gguf.metadata["format"] == "gguf"
    # the free profile is priced with 6-bit codes (the default), the gguf one with fp16 scales
    assert free.metadata["scale_bits"] == 6 and "scale_bits" not in gguf.metadata
    assert json.loads((tmp_path / "gguf" / "profile.json").read_text())["format"] == "gguf"
    # solving the free profile for gguf is solving the gguf profile
    sols = []
    for path, extra in ((tmp_path / "free", ["--format", "gguf"]), (tmp_path / "gguf", [])):
        assert main(["solve", str(path / "problem.yaml"), "--avg-bits", "5.5", "--json",
                     *extra]) == 0
        sols.append(json.loads(capsys.readouterr().out))
    assert sols[0]["assignment"] == sols[1]["assignment"]
    assert sols[0]["certificate"]["usage"]["memory_bytes"] == \
        sols[1]["certificate"]["usage"]["memory_bytes"]
    # retargeted, the plan is priced with the format's fp16 scales, and says so: compress
    # packs fp16 scales for it
    assert sols[0]["extra"]["scale_bits"] is None and sols[1]["extra"]["scale_bits"] is None
    assert [c.type for c in gguf.constraints].count("same_bits") == 4
    # a gguf problem cannot be solved as another format
    assert main(["solve", str(tmp_path / "gguf" / "problem.yaml"), "--avg-bits", "5.5",
                 "--format", "compressed-tensors"]) == 1
    assert "was built for 'gguf'" in capsys.readouterr().err


def test_solve_prices_a_symmetric_grid_for_gguf_and_compress_quantizes_on_it(
        tiny, tmp_path, capsys, tokenizer_gguf):
    from bitsack.cli import main

    calib, _ = tiny
    common = ["--model", "tiny", "--calib", str(calib), "--mlp-group", str(MLP), "--quiet"]
    assert main(["profile", *common, "--bits", "2,3,4,8", "--group-size", "32", "--nsamples",
                 "4", "--seqlen", "24", "--scale-bits", "fp16", "--out",
                 str(tmp_path / "p")]) == 0
    problem = tmp_path / "p" / "problem.yaml"
    # a grid without --format gguf changes no bytes: refused before any work
    assert main(["solve", str(problem), "--avg-bits", "4.5", "--grid", "sym-hmse"]) == 1
    assert "--grid with --format gguf" in capsys.readouterr().err
    usage = {}
    for grid in ("hmse", "sym-hmse"):
        sol = tmp_path / f"{grid}.json"
        assert main(["solve", str(problem), "--avg-bits", "4.5", "--format", "gguf", "--grid",
                     grid, "--out", str(sol), "--json"]) == 0
        usage[grid] = json.loads(capsys.readouterr().out)["certificate"]["usage"]
        assert json.loads(sol.read_text())["extra"]["grid"] == grid
        # compress follows the solution's grid; the export holds the certified bytes
        assert main(["compress", "--model", "tiny", "--problem", str(problem), "--solution",
                     str(sol), "--quantizer", "rtn", "--out", str(tmp_path / f"c-{grid}"),
                     "--quiet"]) == 0
        assert "warning" not in capsys.readouterr().err
        res = export_model(tmp_path / f"c-{grid}", tmp_path / f"g-{grid}", format="gguf",
                           tokenizer_gguf=tokenizer_gguf)
        assert _unit_tensor_bytes(res, tmp_path / f"c-{grid}") == \
            usage[grid]["memory_bytes"]
        if grid == "sym-hmse":  # 4 bits fit Q4_0 there (Q4_1 on a min-max grid)
            assert "Q4_1" not in res.type_counts()


def test_profile_solve_compress_cli_with_vocab_groups(tiny, tmp_path, capsys):
    # profile --vocab-groups 3 -> units embed.v0..v2 (lm_head.v0..v2: untied), recorded in
    # the metadata; solve; compress infers the split from the solution's ids
    from bitsack.checkpoint import load_compressed
    from bitsack.cli import main
    from bitsack.kernels.packed import PackedEmbedding
    from bitsack.solver import load_problem

    calib, _ = tiny
    common = ["--model", "tiny", "--calib", str(calib), "--mlp-group", str(MLP), "--quiet"]
    assert main(["profile", *common, "--bits", "2,3,4,8", "--group-size", "32", "--nsamples",
                 "4", "--seqlen", "24", "--vocab-groups", "3", "--out", str(tmp_path / "p")]) == 0
    problem = load_problem(tmp_path / "p" / "problem.yaml")
    ids = {u.id for u in problem.units}
    assert {"embed.v0", "embed.v1", "embed.v2", "lm_head.v2"} <= ids and "embed" not in ids
    assert problem.metadata["vocab_groups"] == 3
    sol = tmp_path / "sol.json"
    assert main(["solve", str(tmp_path / "p" / "problem.yaml"), "--avg-bits", "4.0",
                 "--out", str(sol)]) == 0
    assert main(["compress", *common, "--problem", str(tmp_path / "p" / "problem.yaml"),
                 "--solution", str(sol), "--quantizer", "rtn", "--out",
                 str(tmp_path / "m")]) == 0, capsys.readouterr().err
    lm = load_compressed(tmp_path / "m")
    emb = next(m for m in lm.model.modules() if isinstance(m, PackedEmbedding))
    assert {g.start for g in emb.segments} <= {0, 32, 64}
    assert main(["profile", *common, "--vocab-groups", "17", "--out", str(tmp_path / "x")]) == 2
    assert "--vocab-groups" in capsys.readouterr().err


def test_profile_refuses_vocab_groups_without_the_embedding(tiny, tmp_path, capsys):
    from bitsack.cli import main

    calib, _ = tiny
    assert main(["profile", "--model", "tiny", "--calib", str(calib), "--units", "heads,mlp",
                 "--vocab-groups", "3", "--out", str(tmp_path / "p"), "--quiet"]) == 1
    assert "--vocab-groups: 3 with --units heads,mlp" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["oneshot", "search"])
def test_compressed_tensors_prunes_what_its_decilm_layout_holds_at_the_certified_bytes(
        monkeypatch, tmp_path, one_thread, method):
    # MLPs of 512 channels in blocks of 256: vLLM's DeciLM layout holds them unpadded
    from export_helpers import patch_tiny_run

    from bitsack.profiling.build import unit_shapes
    from bitsack.solver.costs.formats import target_constraints

    tiny = patch_tiny_run(monkeypatch, tmp_path, intermediate_size=512, num_hidden_layers=4)
    out = tmp_path / "run"
    # the search starts from the one-shot plan too, which prunes
    s = run(_cfg(tiny, out, method=method, format="compressed-tensors", avg_bits=4.0,
                 mlp_group=256, search_start="both"))
    plan = json.loads((out / "solution.json").read_text())["assignment"]
    assert "prune" in plan.values()
    for layer in range(4):  # head groups leave together (DeciLM fixes the query heads)
        heads = {o for u, o in plan.items() if u.startswith(f"L{layer}.attn.")}
        assert len(heads) == 1 and (layer or heads != {"prune"})
    model = tiny_model("llama", seed=3, intermediate_size=512, num_hidden_layers=4)
    shapes = unit_shapes(model, model_units(model, mlp_group=256))
    kinds = {c.units[0].split(".")[1]: c.type for c in target_constraints(
        "compressed-tensors", shapes, {u.id: ["prune", "b4g32"] for u in shapes})
        if c.type != "min_kept"}
    assert kinds == {"attn": "same_option", "mlp": "same_bits"}
    res = export_model(out / "model", tmp_path / "export", format="compressed-tensors")
    assert res.layout["kind"] == "pruned"
    assert _unit_tensor_bytes(res, out / "model") == s.certificate["usage"]["memory_bytes"]
    assert any("about 0 bytes of zero rows" in n for n in res.notes)


def test_compressed_tensors_does_not_prune_mlps_its_layout_would_pad(tiny, tmp_path):
    # the tiny model's 96-wide MLPs: a pruned export would pad every MLP to 256
    from bitsack.profiling.build import unit_shapes
    from bitsack.solver.costs.formats import prune_refusal, target_options

    model = tiny_model("llama", seed=3)
    shapes = unit_shapes(model, model_units(model, mlp_group=MLP))
    assert "96-wide MLPs are no multiple of 256" in prune_refusal("compressed-tensors", shapes)
    why: dict[str, str] = {}
    kept = target_options("compressed-tensors", shapes,
                          {u.id: ["prune", "b4g32"] for u in shapes}, 32, why)
    assert all("prune" not in o for o in kept.values())
    assert "96-wide MLPs" in why["prune"]
