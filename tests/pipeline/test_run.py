"""``bitsack run`` end to end on a tiny random model: files, summary, resumption, errors."""

from __future__ import annotations

import json

import pytest
import torch

from bitsack.cli import main
from bitsack.errors import ValidationError
from bitsack.models.testing import ByteTokenizer, tiny_model
from bitsack.pipeline import RunConfig, run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """``load_model`` returns a fresh (identical) tiny Llama each call; text files as data."""
    from bitsack.models import loading

    def fake(*args, **kwargs):
        return loading.LoadedModel(model=tiny_model("llama", seed=3), tokenizer=ByteTokenizer(),
                                   source={"kind": "test", "spec": "tiny"})

    monkeypatch.setattr(loading, "load_model", fake)
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    ev = tmp_path / "eval.txt"
    ev.write_text("Pack my box with five dozen liquor jugs, said the sphinx. " * 30)
    return calib, ev


def _cfg(tiny, out, **kw) -> RunConfig:
    calib, ev = tiny
    base = dict(model="tiny", out=str(out), avg_bits=3.0, calib=str(calib), eval=str(ev),
                method="oneshot", bits=(2, 3, 4), group_size=16, mlp_group=32,
                profile_nsamples=4, profile_seqlen=24, compress_nsamples=4, compress_seqlen=24,
                eval_seqlen=32, eval_windows=4, time_limit_s=10.0, solver="auto",
                menu=("b2g32", "b2g16", "b3g32", "b3g16", "b4g32", "b4g16", "b16"),
                screen=(6, 24), select=(8, 24), holdout=(8, 24), search_budget=150.0,
                search_k=4)
    base.update(kw)
    return RunConfig(**base)


def test_oneshot_writes_every_stage_and_a_consistent_summary(tiny, tmp_path):
    out = tmp_path / "run"
    s = run(_cfg(tiny, out))
    for name in ("profile/problem.yaml", "profile/interactions.npz", "solution.json",
                 "model/bitsack.json", "eval.json", "eval_base.json", "summary.json",
                 "report.md", "allocation.png"):
        assert (out / name).is_file(), name
    assert s.status in ("optimal", "feasible")
    assert s.reused == ()
    # the plan meets its budget: 3 bits per weight of the planned units, overhead included
    assert s.bits_per_weight is not None and s.bits_per_weight <= 3.0 + 1e-9
    assert s.memory_after_bytes < s.memory_before_bytes
    assert s.ppl_before > 1 and s.ppl_after > 1
    import math
    assert s.measured_loss_increase == pytest.approx(math.log(s.ppl_after / s.ppl_before))
    sol = json.loads((out / "solution.json").read_text())
    assert s.predicted_loss_increase == pytest.approx(sol["objective"])
    saved = json.loads((out / "summary.json").read_text())
    assert saved["schema"] == "bitsack.run/v2" and saved["ppl_after"] == s.ppl_after
    assert "Certificate: status" in (out / "report.md").read_text()
    # the problem as solved (priced with the run's 6-bit scale codes, budget applied) is
    # written beside the solution, so the certificate can be re-checked as it stands
    from bitsack.cli import main
    assert main(["check", str(out / "problem.yaml"), str(out / "solution.json"),
                 "--json"]) == 0


def test_run_resumes_finished_stages_and_redoes_what_changed(tiny, tmp_path):
    out = tmp_path / "run"
    first = run(_cfg(tiny, out))
    again = run(_cfg(tiny, out))
    assert set(again.reused) == {"eval_base", "compress", "eval"}
    assert again.ppl_after == first.ppl_after
    assert again.memory_after_bytes == first.memory_after_bytes
    # a new budget keeps the profile, re-solves, re-compresses, re-evaluates
    looser = run(_cfg(tiny, out, avg_bits=4.0))
    assert set(looser.reused) == {"profile", "eval_base"}
    assert looser.bits_per_weight <= 4.0 + 1e-9
    assert looser.predicted_loss_increase <= first.predicted_loss_increase + 1e-12


@pytest.mark.parametrize("vocab_groups", [1, 3])
def test_run_and_compress_give_byte_identical_models(tiny, tmp_path, capsys, vocab_groups):
    """The two routes from one plan and seed build the same bytes (one calibration call);
    compress reads the embedding's row ranges from the plan's unit ids."""
    calib, _ = tiny
    out = tmp_path / "run"
    run(_cfg(tiny, out, seed=5, vocab_groups=vocab_groups))
    argv = ["compress", "--model", "tiny", "--problem", str(out / "profile" / "problem.yaml"),
            "--solution", str(out / "solution.json"), "--calib", str(calib), "--nsamples", "4",
            "--seqlen", "24", "--seed", "5", "--group-size", "16", "--mlp-group", "32",
            "--out", str(tmp_path / "c")]
    assert main(argv) == 0, capsys.readouterr().err
    a = (out / "model" / "model.safetensors").read_bytes()
    b = (tmp_path / "c" / "model.safetensors").read_bytes()
    assert a == b


def test_uniform_is_the_largest_menu_option_that_fits(tiny, tmp_path):
    s = run(_cfg(tiny, tmp_path / "u", method="uniform", avg_bits=4.5))
    # 6-bit scale codes (the default) and a bits-wide zero point per group, one fp16 step per
    # 64-wide row here: b3g16 (3.81) fits, b4g32 (4.56) does not
    (label,) = {lab for counts in s.plan_counts.values() for lab in counts}
    assert label == "b3g16"
    assert s.bits_per_weight <= 4.5 + 1e-9


def test_search_run_records_its_trail_and_resumes(tiny, tmp_path):
    out = tmp_path / "s"
    s = run(_cfg(tiny, out, method="search", search_start="both", avg_bits=3.5,
                 search_budget=400.0))
    assert s.search is not None and s.search["steps"]
    assert s.search["final"]["kept"] in ("stitched", "sequential")
    # wall seconds per phase: every phase ran, the search's own phases partition its time
    phases = s.search["seconds"]
    assert set(phases) == {"base distributions", "store", "search: start",
                           "search: linearise", "search: steps", "search: other", "final"}
    assert all(v >= 0 for v in phases.values())
    assert phases["store"] > 0 and phases["search: start"] + phases["search: steps"] > 0
    assert "seconds" not in json.loads((out / "solution.json").read_text())["search"]
    assert s.bits_per_weight <= 3.5 + 1e-9
    assert (out / "search.json").is_file() and (out / "store" / "store.json").is_file()
    report = (out / "report.md").read_text()
    assert "## Search" in report and (out / "search.png").is_file()
    sol = json.loads((out / "solution.json").read_text())
    assert sol["search"]["kl"]["holdout"] <= sol["search"]["start"]["kl"]["holdout"] + 1e-12
    again = run(_cfg(tiny, out, method="search", search_start="both", avg_bits=3.5,
                     search_budget=400.0))
    assert "compress" in again.reused and again.ppl_after == s.ppl_after


def test_a_rewalk_round_continues_a_finished_search_and_never_ends_worse(tiny, tmp_path):
    import shutil

    kw = dict(method="search", search_start="uniform", avg_bits=3.5, search_budget=250.0)
    one = tmp_path / "one"
    first = run(_cfg(tiny, one, **kw))
    # the same folder, one round more: round 1 is resumed from its checkpoint, not redone
    two = tmp_path / "two"
    shutil.copytree(one, two)
    s = run(_cfg(tiny, two, search_rewalks=1, **kw))
    srch = s.search
    (rec,) = srch["start"]["rounds"]
    assert rec["round"] == 2
    walk = next(st for st in srch["steps"] if st["reason"].startswith("store re-walked"))
    assert walk["changed"] == {} and walk["accepted"] == rec["accepted"]
    n1 = len(first.search["steps"])
    assert srch["steps"][:n1] == first.search["steps"]
    sol = json.loads((two / "solution.json").read_text())
    assert sol["search"]["kl"]["holdout"] <= first.search["kl"]["holdout"] + 1e-12
    if rec["accepted"]:
        assert (two / "store_round2" / "store.json").is_file()
        assert srch["forwards"] > first.search["forwards"]
        assert json.loads((two / "store_round2" / "store.json").read_text())["walk"] == \
            first.search["plan"]
    assert s.bits_per_weight <= 3.5 + 1e-9
    # resumed whole: the identical record
    again = run(_cfg(tiny, two, search_rewalks=1, **kw))
    assert again.search == srch or "compress" in again.reused


def test_a_rewalk_that_measures_worse_leaves_the_first_round_standing(tiny, tmp_path,
                                                                        monkeypatch):
    from bitsack.search import driver
    from bitsack.search.meter import Paired

    kw = dict(method="search", search_start="uniform", avg_bits=3.5, search_budget=250.0)
    first = run(_cfg(tiny, tmp_path / "one", **kw))

    class Worse(Paired):  # every re-walk measures worse
        @classmethod
        def of(cls, a, b):
            return Paired(1.0, 0.01, len(a))

    monkeypatch.setattr(driver, "Paired", Worse)
    s = run(_cfg(tiny, tmp_path / "two", search_rewalks=1, **kw))
    (rec,) = s.search["start"]["rounds"]
    assert rec["accepted"] is False and s.search["stopped"] == "re-walk worse"
    assert s.search["plan"] == first.search["plan"]
    assert s.search["kl"] == pytest.approx(first.search["kl"])
    assert s.search["final"]["kept"] == first.search["final"]["kept"]
    assert s.search["final"]["stitched_holdout_kl"] == \
        pytest.approx(first.search["final"]["stitched_holdout_kl"])
    assert s.ppl_after == pytest.approx(first.ppl_after, rel=1e-6)


def test_run_cli_json(tiny, tmp_path, capsys):
    calib, ev = tiny
    out = tmp_path / "cli"
    argv = ["run", "--model", "tiny", "--avg-bits", "3", "--calib", str(calib), "--eval",
            str(ev), "--method", "oneshot", "--bits", "2,3,4", "--group-size", "16",
            "--mlp-group", "32", "--nsamples", "4", "--seqlen", "24", "--compress-nsamples",
            "4", "--compress-seqlen", "24", "--eval-seqlen", "32", "--eval-windows", "2",
            "--quantizer", "rtn", "--out", str(out), "--json"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["schema"] == "bitsack.run/v2"
    assert got["bits_per_weight"] <= 3.0 + 1e-9
    assert set(got["stage_seconds"]) >= {"profile", "compress", "eval"}


@pytest.mark.parametrize("kw, field", [
    ({"avg_bits": None}, "budget"),
    ({"avg_bits": 40.0}, "--avg-bits"),
    ({"budgets": {"memory_bytes": -1.0}}, "--budget memory_bytes"),
    ({"budgets": {"memory_bytes": 1e6}}, "--avg-bits"),
    ({"method": "greedy"}, "method"),
    ({"menu": ("b3g64", "b9g64")}, "menu[1]"),
    ({"units": ("heads", "attn")}, "units"),
    ({"eval_windows": 0}, "eval_windows"),
    ({"quantizer": "awq"}, "quantizer"),
    ({"vocab_groups": 0}, "vocab_groups"),
    ({"vocab_groups": 17}, "vocab_groups"),
])
def test_bad_config_names_the_field(kw, field, tmp_path):
    args = dict(out=str(tmp_path), avg_bits=3.0)
    args.update(kw)
    with pytest.raises(ValidationError) as err:
        RunConfig(**args)
    assert err.value.path == field


def test_cli_bad_budget_is_one_line_error(tmp_path, capsys):
    assert main(["run", "--budget", "memory_bytes", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "--budget" in err and "RESOURCE=VALUE" in err and "Traceback" not in err


def test_interaction_weight_changes_the_solved_objective_only(tiny, tmp_path):
    from bitsack.solver import evaluate, load_problem, with_interaction_weight

    out = tmp_path / "w"
    add = run(_cfg(tiny, out, quantizer="rtn"))
    full = run(_cfg(tiny, out, quantizer="rtn", interactions=1.0))
    assert set(full.reused) == {"profile", "eval_base"}  # same profile, new solve
    problem = load_problem(out / "profile" / "problem.yaml")
    assert problem.interactions is not None
    # weight w: objective = (1-w)·additive + w·full, checked on an arbitrary plan
    plan = {u.id: u.options[-1].id for u in problem.units}
    a = evaluate(with_interaction_weight(problem, 0.0), plan).objective
    f = evaluate(problem, plan).objective
    h = evaluate(with_interaction_weight(problem, 0.5), plan).objective
    assert h == pytest.approx(0.5 * a + 0.5 * f, rel=1e-9, abs=1e-15)
    assert add.status in ("optimal", "feasible") and full.status in ("optimal", "feasible")
    with pytest.raises(ValidationError) as err:
        with_interaction_weight(problem, 1.5)
    assert err.value.path == "interactions"


def test_no_prune_keeps_every_unit(tiny, tmp_path):
    out = tmp_path / "np"
    # 3 bits/weight at group 16 (2 bits of scale + zero per weight): bits-only is all-1-bit
    joint = run(_cfg(tiny, out, avg_bits=3.0, bits=(1, 2), quantizer="rtn"))
    bits = run(_cfg(tiny, out, avg_bits=3.0, bits=(1, 2), quantizer="rtn", prune=False))
    assert set(bits.reused) == {"profile", "eval_base"}
    assert not any("prune" in c for c in bits.plan_counts.values())
    assert bits.predicted_loss_increase >= joint.predicted_loss_increase - 1e-12


def test_uniform_with_double_quantized_scales_fits_more_bits_and_reloads(tiny, tmp_path):
    from bitsack.checkpoint import load_compressed
    from bitsack.kernels.formats import packed_nbytes

    # 4 bits/weight: with fp16 scales b3g32 fits (3 + 19/16 = 3.59), b3g16 does not (4.19);
    # with 6-bit scales b3g16 does: 3 + 9/16 + one fp16 step per 64-wide row (0.25) = 3.81
    # (wider rows share a step among 256 columns: 3.62 on SmolLM2)
    plain = run(_cfg(tiny, tmp_path / "p", method="uniform", avg_bits=4.0, scale_bits=None))
    dq = run(_cfg(tiny, tmp_path / "d", method="uniform", avg_bits=4.0))  # 6: the default
    labels = {lab for counts in dq.plan_counts.values() for lab in counts}
    assert labels == {"b3g16"}
    assert {lab for c in plain.plan_counts.values() for lab in c} == {"b3g32"}
    assert dq.bits_per_weight <= 4.0 + 1e-9
    lm = load_compressed(tmp_path / "d" / "model")
    segs = [s for m in lm.model.modules() if hasattr(m, "_scale_bits") for s in m.segments]
    assert segs and all(s.scale_bits == 6 for s in segs if s.bits < 16)
    assert sum(s.nbytes for s in segs if s.bits < 16) == sum(
        packed_nbytes(*s.shape, s.bits, s.group_size, 6) for s in segs if s.bits < 16)
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["config"]["scale_bits"] == 6


@pytest.mark.parametrize("method", ["search", "oneshot"])
def test_search_and_oneshot_price_and_build_double_quantized_scales(tiny, tmp_path, method):
    from bitsack.checkpoint import load_compressed

    out = tmp_path / method
    if method == "oneshot":  # one profile serves fp16 scales and scale codes: re-priced
        run(_cfg(tiny, out, method=method, avg_bits=3.5))
    s = run(_cfg(tiny, out, method=method, avg_bits=3.5, scale_bits=6, search_budget=200.0))
    assert s.bits_per_weight <= 3.5 + 1e-9
    if method == "oneshot":
        assert "profile" in s.reused and "compress" not in s.reused
    sol = json.loads((out / "solution.json").read_text())
    cert = sol["certificate"]
    # the plan was priced in the bytes it was packed into: scale codes and steps included
    packed = sol.get("extra", sol)["packed_bytes"]
    assert cert["usage"]["memory_bytes"] == pytest.approx(packed)
    lm = load_compressed(out / "model")
    segs = [g for m in lm.model.modules() if hasattr(m, "_scale_bits") for g in m.segments
            if g.bits < 16]
    assert segs and all(g.scale_bits == 6 for g in segs)
    if method == "search":  # the variant store was built on the same grid
        assert json.loads((out / "store" / "store.json").read_text())["scale_bits"] == 6


def test_grid_is_a_run_setting_recorded_and_keyed(tiny, tmp_path):
    """``grid``: hmse by default, recorded in the model's apply record; another grid in the
    same folder compresses again (the stage key holds it) to the same bytes on other codes."""
    from bitsack.checkpoint import load_compressed

    with pytest.raises(ValidationError, match="grid: 'mean'; valid: minmax, mse, hmse"):
        _cfg(tiny, tmp_path / "x", grid="mean")
    out = tmp_path / "u"
    hm = run(_cfg(tiny, out, method="uniform", avg_bits=3.5))
    assert json.loads((out / "summary.json").read_text())["config"]["grid"] == "hmse"
    assert load_compressed(out / "model").model.bitsack_apply["grid"] == "hmse"
    seen = {(out / "model" / "model.safetensors").read_bytes()}
    for grid in ("mse", "minmax"):
        other = run(_cfg(tiny, out, method="uniform", avg_bits=3.5, grid=grid))
        assert "compress" not in other.reused
        assert other.memory_after_bytes == hm.memory_after_bytes
        assert load_compressed(out / "model").model.bitsack_apply["grid"] == grid
        seen.add((out / "model" / "model.safetensors").read_bytes())
    assert len(seen) == 3  # three grids, three sets of codes


def test_double_quantized_scales_are_refused_where_not_stored(tiny, tmp_path):
    with pytest.raises(ValidationError, match="scale_bits: 6 with format 'compressed-tensors', "
                       "which stores fp16 scales; valid: --format bitsack or gguf"):
        _cfg(tiny, tmp_path / "x", scale_bits=6, method="uniform", format="compressed-tensors")
    # GGUF's K-quants store scale codes (tests/export/test_gguf_kquants.py)
    assert _cfg(tiny, tmp_path / "x", scale_bits=6, method="uniform", format="gguf") \
        .scale_bits == 6


@pytest.mark.parametrize("method", ["search", "oneshot", "uniform"])
def test_vocab_groups_split_the_embedding_into_row_ranges(tiny, tmp_path, method):
    # --vocab-groups 3: embed.v0/v1/v2 (and lm_head.v0.. on this untied model) are units of
    # their own, each planned, priced and packed as a row segment of its own
    from bitsack.checkpoint import load_compressed
    from bitsack.kernels.packed import PackedEmbedding

    out = tmp_path / method
    s = run(_cfg(tiny, out, method=method, avg_bits=3.5, vocab_groups=3, search_budget=200.0))
    assert s.bits_per_weight <= 3.5 + 1e-9
    sol = json.loads((out / "solution.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["vocab_groups"] == 3
    assert sum(summary["plan_counts"]["embedding"].values()) == 6
    lm = load_compressed(out / "model")
    emb = next(m for m in lm.model.modules() if isinstance(m, PackedEmbedding))
    bounds = sorted((g.start, g.stop) for g in emb.segments)
    assert bounds[0][0] == 0 and bounds[-1][1] == emb.num_embeddings
    cuts = {0, 32, 64, 128}  # vocab_ranges(128, 3): 0:32, 32:64, 64:128
    assert all(a in cuts and b in cuts for a, b in bounds)
    cert = sol["certificate"]
    packed = sol.get("extra", sol)["packed_bytes"]
    assert cert["usage"]["memory_bytes"] == pytest.approx(packed)
    report = (out / "report.md").read_text()  # the ranges and their options, one row each
    assert "| embed.v0 | 0–31 |" in report and "| lm_head.v2 | 64–127 |" in report


def test_a_plan_names_its_vocab_ranges_consistently():
    from bitsack.apply import plan_vocab_groups

    assert plan_vocab_groups({"embed": "b4", "L0.attn.g0": "b3"}) == 1
    assert plan_vocab_groups({"embed.v0": "b4", "embed.v1": "b2", "lm_head.v0": "b3",
                              "lm_head.v1": "b3"}) == 2
    for bad in ({"embed.v0": "b4", "embed.v2": "b2"}, {"embed.v0": "b4", "embed": "b4"},
                {"embed.v0": "b4", "embed.v1": "b4", "lm_head.v0": "b4"}):
        with pytest.raises(ValidationError, match=r"plan\.(embed|lm_head)\.v\*"):
            plan_vocab_groups(bad)
    # declared (a run's vocab_groups): a plan may name only some of its ranges — read from
    # the ids alone, {v0, v1} would be a split in two
    part = {"embed.v0": "b4", "embed.v1": "b2"}
    assert plan_vocab_groups(part) == 2 and plan_vocab_groups(part, 6) == 6
    for bad, n in ((part, 1), ({"embed.v6": "b4"}, 6), ({"embed": "b4"}, 3)):
        with pytest.raises(ValidationError, match=r"plan\.embed"):
            plan_vocab_groups(bad, n)
    assert plan_vocab_groups({"embed": "b4"}, 1) == 1


def test_a_partial_plan_keeps_its_declared_ranges(tiny, tmp_path):
    # ApplyConfig.vocab_groups: the two ranges a plan names land on their own rows of a
    # six-range split (the rest fp16), and the compressed model records the split
    from bitsack.apply import ApplyConfig, compress
    from bitsack.kernels.packed import PackedEmbedding

    model = tiny_model("llama", seed=3)
    res = compress(model, {"embed.v0": "b4g16", "embed.v1": "b2g16"},
                   config=ApplyConfig(quantizer="rtn", group_size=16, mlp_group=32,
                                      vocab_groups=6))
    emb = next(m for m in res.model.modules() if isinstance(m, PackedEmbedding))
    assert [(g.start, g.stop, g.bits) for g in emb.segments] == [(0, 4, 4), (4, 8, 2),
                                                                 (8, 128, 16)]
    assert res.model.bitsack_apply["vocab_groups"] == 6
    with pytest.raises(ValidationError, match="vocab_groups"):
        ApplyConfig(vocab_groups=0)


def test_vocab_groups_need_the_embedding_among_the_units(tmp_path):
    with pytest.raises(ValidationError, match="vocab_groups: 3 with units"):
        RunConfig(out=str(tmp_path), avg_bits=3.0, vocab_groups=3, units=("heads", "mlp"))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_vocab_groups_on_a_tied_embedding(tiny, tmp_path, fake_load_model, arch):
    # a tied embedding is one matrix (embed.v0.. only; the head follows it): searched, packed
    # in row segments, reloaded with the same logits
    from bitsack.checkpoint import load_compressed

    def make():
        model = tiny_model(arch, seed=3, tie_word_embeddings=True)
        model.tie_weights()
        return model

    fake_load_model(make)  # after the `tiny` fixture's loader: a fresh tied model per load
    out = tmp_path / "tied"
    s = run(_cfg(tiny, out, method="search", avg_bits=3.5, vocab_groups=2, search_budget=150.0))
    assert s.bits_per_weight <= 3.5 + 1e-9
    assert sum(s.plan_counts["embedding"].values()) == 2 + (arch == "gpt2")  # + pos_embed
    lm = load_compressed(out / "model")
    ids = torch.tensor([[1, 70, 100, 127]])
    head = lm.model.get_output_embeddings()
    assert torch.equal(lm.model.get_input_embeddings()(ids)[0],
                       head.dequantize()[ids[0]].to(lm.model.dtype))


def test_search_start_auto_profiles_only_where_pruning_takes_part(tiny, tmp_path):
    from bitsack.models import model_units
    from bitsack.profiling.build import make_cost_models, unit_shapes

    # bits alone meet 3.5 bits/weight: the uniform starts only, no profile stage
    kw = dict(method="search", search_start="auto", search_budget=60.0, quantizer="rtn",
              avg_bits=3.5)
    bits = run(_cfg(tiny, tmp_path / "bits", **kw))
    assert "oneshot" not in bits.search["start"]["select_kl"]
    assert not (tmp_path / "bits" / "profile.stage.json").exists()
    # a prefill latency below what quantization alone reaches: pruning takes part, and the
    # one-shot plan of the profile is a start too
    model = tiny_model("llama", seed=3)
    shapes = unit_shapes(model, model_units(model, mlp_group=32))
    roofline = make_cost_models(["roofline"], {"roofline": {"device": "h200"}})[0]
    low = sum(min(roofline.cost(s, b, g)["prefill_latency_us"] for b in (2, 3, 4)
                  for g in (16, 32)) for s in shapes)
    pruned = run(_cfg(tiny, tmp_path / "pruned", budgets={"prefill_latency_us": 0.85 * low},
                      **kw))
    assert "oneshot" in pruned.search["start"]["select_kl"]
    assert (tmp_path / "pruned" / "profile.stage.json").is_file()
    assert any("prune" in counts for counts in pruned.plan_counts.values())
