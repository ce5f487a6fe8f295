"""How often the tokens of each ``--vocab-groups`` range occur, and what the profile predicts.

    python bench/vocab_ranges.py [--groups 6] [--profile runs/e2e/profile-v6/profile/problem.yaml]
    # -> bench/results/vocab_ranges.md

For the embedded default model (SmolLM2-135M, vocabulary 49,152) and its tokenizer: the share
of WikiText-2's test tokens and of C4's evaluation documents (0–1099) whose id falls in each
token-id range of ``bitsack.models.adapter.vocab_ranges`` — the evidence that BPE ids are
ordered roughly by frequency, so that a few rows of the embedding carry most of the text.
With ``--profile`` (a ``problem.yaml`` profiled with ``--vocab-groups``), each range's
predicted loss of its 2- and 3-bit options (Fisher, nats/token) per million weights beside.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def shares(ids: np.ndarray, ranges: list[tuple[int, int]]) -> list[float]:
    """Fraction of ``ids`` in each range."""
    return [float(((ids >= a) & (ids < b)).mean()) for a, b in ranges]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=6)
    p.add_argument("--profile", type=Path, default=None,
                   help="a problem.yaml profiled with --vocab-groups GROUPS")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/vocab_ranges.md")
    args = p.parse_args(argv)

    from bitsack.data import eval_tokens
    from bitsack.io import atomic_write
    from bitsack.models.adapter import vocab_ranges
    from bitsack.models.loading import load_model

    t0 = time.perf_counter()
    lm = load_model("default", progress=False)
    rows = lm.model.get_input_embeddings().weight.shape[0]
    cols = lm.model.get_input_embeddings().weight.shape[1]
    ranges = vocab_ranges(rows, args.groups)
    table = {}
    for name, spec in (("WikiText-2 test", "wikitext2"), ("C4 eval (docs 0–1099)", "c4")):
        ids = eval_tokens(spec, lm.tokenizer)[0].numpy()  # the evaluation streams, whole
        table[name] = (len(ids), shares(ids, ranges))
    loss = {}
    if args.profile:
        from bitsack.solver.schema import load_problem

        problem = load_problem(args.profile)
        for u in problem.units:
            if u.id.startswith("embed.v"):
                loss[int(u.id.split(".v")[1])] = {o.id: o.loss for o in u.options}
    cmd = "python bench/vocab_ranges.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    L = [f"# Token-id ranges of SmolLM2-135M's embedding (`--vocab-groups {args.groups}`)", "",
         f"Command: `{cmd.strip()}` ({time.strftime('%Y-%m-%d %H:%M')}, "
         f"{time.perf_counter() - t0:.0f} s). Tokenizer of the embedded default model on the "
         "evaluation streams "
         + ", ".join(f"({name}: {n:,} tokens)" for name, (n, _) in table.items()) + ".", "",
         "| range | ids | rows | weights | " + " | ".join(f"share of {n}" for n in table)
         + (" | 2-bit loss / M weights | 3-bit loss / M weights" if loss else "") + " |",
         "|---|---|---|---|" + "---|" * len(table) + ("---|---|" if loss else "")]
    for i, (a, b) in enumerate(ranges):
        row = (f"| v{i} | {a}–{b - 1} | {b - a:,} | {(b - a) * cols / 1e6:.2f} M | "
               + " | ".join(f"{s[i]:.1%}" for _, s in table.values()))
        if loss:
            per_m = (b - a) * cols / 1e6
            lo = loss.get(i, {})
            row += " | " + " | ".join(f"{lo[k] / per_m:.4f}" if k in lo else "—"
                                      for k in ("b2", "b3"))
        L.append(row + " |")
    L += ["", "Cumulative from the front: " + "; ".join(
        f"{name}: " + ", ".join(f"≤ id {b - 1}: {sum(s[:i + 1]):.0%}"
                                for i, (_, b) in enumerate(ranges[:-1]))
        for name, (_, s) in table.items()) + "."]
    with atomic_write(args.out, "w", encoding="utf-8") as fh:
        fh.write("\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    sys.exit(main())
