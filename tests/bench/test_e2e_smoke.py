"""bench/e2e.py end to end on a tiny model: cells through ``bitsack run``, cached results, the
report's comparison at each budget."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from bitsack.models.testing import ByteTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH = Path(__file__).resolve().parents[2] / "bench" / "e2e.py"


@pytest.fixture
def e2e(monkeypatch):
    from bitsack.models import loading

    def fake(*args, **kwargs):
        return loading.LoadedModel(model=tiny_model("llama", seed=3), tokenizer=ByteTokenizer(),
                                   source={"kind": "test", "spec": "tiny"})

    monkeypatch.setattr(loading, "load_model", fake)
    spec = importlib.util.spec_from_file_location("bench_e2e", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "UNIFORM", ("b2g32", "b3g32", "b4g32"))
    return mod


def test_cells_report_and_cache(e2e, tmp_path, capsys):
    args = ["--cells", "uniform,search", "--budgets", "4.5", "--eval-windows", "2",
            "--compress-nsamples", "4", "--search-budget", "60", "--model", "tiny",
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res")]
    assert e2e.main(args) == 0
    cells = {p.stem for p in (tmp_path / "res" / "e2e").glob("*.json")}
    assert {"base", "uniform-b2g32", "uniform-b3g32", "uniform-b4g32", "search@4.5"} <= cells
    search = json.loads((tmp_path / "res" / "e2e" / "search@4.5.json").read_text())
    assert search["bits_per_weight"] <= 4.5 + 1e-9
    assert search["wikitext2"] > 1 and search["c4"] > 1
    md = (tmp_path / "res" / "e2e.md").read_text()
    assert "| 4.5 |" in md and "bitsack / uniform" in md
    # a second call reuses every cell
    capsys.readouterr()
    assert e2e.main(args) == 0
    assert capsys.readouterr().err.count("cached") == 4
    # a re-walk cell continues the search cell's finished first round in its own folder
    args_rw = [a if a != "uniform,search" else "search-rewalk@4.5" for a in args]
    assert e2e.main(args_rw) == 0
    rw = json.loads((tmp_path / "res" / "e2e" / "search-rewalk@4.5.json").read_text())
    srch = rw["summary"]["search"]
    assert srch["steps"][:len(search["summary"]["search"]["steps"])] == \
        search["summary"]["search"]["steps"]
    assert srch["start"]["rounds"][0]["round"] == 2
    assert (tmp_path / "runs" / "search-rewalk_4.5" / "store_round2").is_dir() or \
        not srch["start"]["rounds"][0]["accepted"]
    md = (tmp_path / "res" / "e2e.md").read_text()
    assert "## Rounds on a re-walked store" in md and "| search-rewalk@4.5 |" in md
    # search-rewalk2 resumes search-rewalk's two rounds and adds a third
    assert e2e.main([a if a != "search-rewalk@4.5" else "search-rewalk2@4.5"
                     for a in args_rw]) == 0
    rw2 = json.loads((tmp_path / "res" / "e2e" / "search-rewalk2@4.5.json").read_text())
    s2 = rw2["summary"]["search"]
    if srch["start"]["rounds"][0]["accepted"]:
        assert [r["round"] for r in s2["start"]["rounds"]] == [2, 3]
        assert s2["steps"][:len(srch["steps"])] == srch["steps"]
    # a variant cell: its own section, compared with the default search at its budget
    assert e2e.main([a if a != "search-rewalk@4.5" else "search-moved@4.5"
                     for a in args_rw]) == 0
    moved = json.loads((tmp_path / "res" / "e2e" / "search-moved@4.5.json").read_text())
    assert moved["config"]["search_relinearise"] == "moved"
    # its variant store (the same inputs) is the search cell's, hard-linked, not rebuilt
    runs = tmp_path / "runs"
    layers = sorted((runs / "search-moved_4.5" / "store").glob("layer_*"))
    assert layers and all(f.stat().st_ino == (runs / "search-rewalk_4.5" / "store" / f.name
                                              ).stat().st_ino for f in layers)
    md = (tmp_path / "res" / "e2e.md").read_text()
    assert "(`search-moved`)" in md
    row = next(line for line in md.splitlines() if line.startswith("| 4.5 |")
               and "(`search-moved`)" in md.split(line)[0].rsplit("## ", 1)[-1])
    assert row.count("|") == 10
    # a variant's re-walk continues that variant's first round
    assert e2e.main([a if a != "search-rewalk@4.5" else "search-moved-rewalk@4.5"
                     for a in args_rw]) == 0
    mrw = json.loads((tmp_path / "res" / "e2e" / "search-moved-rewalk@4.5.json").read_text())
    assert mrw["config"]["search_relinearise"] == "moved"
    assert mrw["config"]["search_rewalks"] == 1
    steps = moved["summary"]["search"]["steps"]
    assert mrw["summary"]["search"]["steps"][:len(steps)] == steps
    assert "| search-moved-rewalk@4.5 |" in (tmp_path / "res" / "e2e.md").read_text()


def test_calibration_draws(e2e, tmp_path):
    """``<cell>~s<N>`` runs a cell from calibration draw N (its own key and run folder); the
    report pairs each draw with the best uniform configuration's run from the same draw."""
    assert e2e.split_cell("search-moved@3.5~s2") == ("search-moved", "3.5", 2)
    assert e2e.split_cell("uniform:b3g64") == ("uniform:b3g64", "", 0)
    with pytest.raises(ValueError, match="~s"):
        e2e.split_cell("search@3.5~sx")
    common = ["--eval-windows", "2", "--compress-nsamples", "4", "--search-budget", "30",
              "--model", "tiny", "--runs", str(tmp_path / "runs"), "--results",
              str(tmp_path / "res"), "--budgets", ""]
    cells = ("uniform:b2g32,uniform:b3g32,search@4.5,uniform:b2g32~s1,uniform:b3g32~s1,"
             "search@4.5~s1")
    assert e2e.main(["--cells", cells, *common]) == 0
    res = tmp_path / "res" / "e2e"
    s0 = json.loads((res / "search@4.5.json").read_text())
    s1 = json.loads((res / "search@4.5~s1.json").read_text())
    assert (s0["config"]["seed"], s1["config"]["seed"]) == (0, 1)
    assert s0["key"] != s1["key"] and (tmp_path / "runs" / "search_4.5~s1").is_dir()
    md = (tmp_path / "res" / "e2e.md").read_text()
    draws = md.split("## Calibration draws", 1)[1].split("\n## ", 1)[0]
    best = e2e.best_uniform({c: json.loads((res / f"{c.replace(':', '-')}.json").read_text())
                             for c in ("uniform:b2g32", "uniform:b3g32")}, 4.5)
    u1 = json.loads((res / f"uniform-{best['cell'][8:]}~s1.json").read_text())
    assert f"| search@4.5 | {s1['machine']['platform']} | 1 |" in draws
    assert f"{s1['wikitext2'] / u1['wikitext2']:.3f}, {s1['c4'] / u1['c4']:.3f}" in draws
    assert "mean of 2 draws" in draws
    # the per-budget table shows one draw: the one most searches ran from, the lowest on a
    # tie (here 0), or the one asked for, compared with that draw's uniform cells
    table = md.split("## At each budget", 1)[1].split("\n## ", 1)[0]
    assert table.count("| 4.5 |") == 1 and f"| {s0['wikitext2']:.4g} |" in table
    assert e2e.main(["--report", "--draw", "1", *common]) == 0
    md = (tmp_path / "res" / "e2e.md").read_text()
    table = md.split("## At each budget", 1)[1].split("\n## ", 1)[0]
    assert f"| {s1['wikitext2']:.4g} | {s1['c4']:.4g} | {e2e._ratios(s1, u1)} |" in table
    assert "calibration draw 1" in md
    every = {"search@3~s2": {}, "search@4~s2": {}, "search@3": {}, "uniform:b3g64": {}}
    assert e2e.main_draw(every) == 2 and e2e.main_draw({}) == 0


def test_a_uniform_cell_with_scale_codes(e2e):
    """``uniform:b3g32s6``: the uniform run with 6-bit scale codes (``--scale-bits 6``)."""
    args = e2e.argparse.Namespace(model="tiny", eval_windows=2, compress_nsamples=4,
                                  search_budget=30.0)
    cfg = e2e.cell_config("uniform:b3g32s6~s2", args)
    assert (cfg["menu"], cfg["scale_bits"], cfg["seed"]) == (["b3g32"], 6, 2)
    assert "scale_bits" not in e2e.cell_config("uniform:b3g32", args)


def test_cells_name_their_grid_and_meet_the_uniform_of_the_same_grid(e2e):
    """``-mse`` cells run on the MSE grid; cells naming none run on the pinned min-max grid
    (as recorded); a cell is compared with the best uniform of its own grid."""
    args = e2e.argparse.Namespace(model="tiny", eval_windows=2, compress_nsamples=4,
                                  search_budget=30.0, latency_limit=None)
    assert e2e.cell_config("uniform:b3g32s6-mse~s2", args)["grid"] == "mse"
    assert e2e.cell_config("search-s6v6-mse@2.5", args)["grid"] == "mse"
    assert "grid" not in e2e.cell_config("search-s6@2.5", args)
    assert e2e.PINNED["grid"] == "minmax"
    assert [e2e.cell_grid(c) for c in ("uniform:b3g32s6-mse", "uniform:b3g32s6",
                                       "search-s6v6-mse@3.5~s3", "search@3.5")] == \
        ["mse", "minmax", "mse", "minmax"]
    res = {"uniform:b3g32s6": {"bits_per_weight": 3.4, "wikitext2": 50.0},
           "uniform:b3g32s6-mse": {"bits_per_weight": 3.4, "wikitext2": 45.0},
           "uniform:b4g32s6-mse": {"bits_per_weight": 4.5, "wikitext2": 30.0}}
    for c, r in res.items():
        r["cell"] = c
    assert e2e.best_uniform(res, 3.5)["cell"] == "uniform:b3g32s6-mse"
    assert e2e.best_uniform(res, 3.5, "minmax")["cell"] == "uniform:b3g32s6"
    assert e2e.best_uniform(res, 3.0, "mse") is None


def test_numeric_budgets_leave_out_the_latency_case_of_any_draw(e2e):
    cells = ["search@3.5~s3", "sequential@lat~s3", "search@lat", "uniform:b3g64~s3",
             "search-s6@2.5", "oneshot@10"]
    assert e2e.numeric_budgets(cells) == ["2.5", "3.5", "10"]
