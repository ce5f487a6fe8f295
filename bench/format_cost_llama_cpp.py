"""llama.cpp's perplexity of ``bench/format_cost.py``'s GGUF exports against bitsack's own:
the same first ``--windows`` windows of 2048 WikiText-2 tokens the cells were evaluated on.

    python bench/format_cost_llama_cpp.py uniform:gguf+sym-hmse@4.5 \\
        oneshot:gguf+sym-hmse/4/m256@4.5

Needs the cells' run folders (``--runs``, with ``export-gguf/model.gguf``) and their results
(``--results``); llama-cpp-python is built from its sdist once and cached in
``.cache/llama-cpp`` (``bitsack.export.llama_cpp.ensure_llama_cpp``). Writes
``<results>/format_cost/llama_cpp.json`` (merged with earlier entries) and prints each row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cells", nargs="+", help="format_cost cells with a gguf export")
    p.add_argument("--runs", default=str(ROOT / "runs" / "format_cost"))
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    sys.path.insert(0, str(ROOT / "bench"))
    from format_cost import _name

    from bitsack.data import eval_tokens
    from bitsack.export.llama_cpp import ensure_llama_cpp, gguf_perplexity
    from bitsack.io import write_json
    from bitsack.models.loading import load_model

    site = ensure_llama_cpp(ROOT / ".cache" / "llama-cpp")
    lm = load_model("default", progress=False)
    tokens = eval_tokens("wikitext2", lm.tokenizer)
    windows = tokens[0, : 2048 * args.windows].reshape(args.windows, 2048).numpy()
    path = Path(args.results) / "format_cost" / "llama_cpp.json"
    out = json.loads(path.read_text()) if path.is_file() else {}
    for cell in args.cells:
        res = json.loads((Path(args.results) / "format_cost" / f"{_name(cell)}.json")
                         .read_text())
        if res["config"]["eval_windows"] != args.windows:
            raise SystemExit(f"{cell}: evaluated on {res['config']['eval_windows']} windows, "
                             f"not --windows {args.windows}")
        gguf = Path(args.runs) / _name(cell) / "export-gguf" / "model.gguf"
        t = time.time()
        got = gguf_perplexity(gguf, windows, site, threads=args.threads)
        out[cell] = {"bitsack": res["wikitext2"], "llama_cpp": got.ppl,
                     "ratio": got.ppl / res["wikitext2"], "types": res["export"]["types"],
                     "windows": args.windows, "seconds": round(time.time() - t, 1),
                     "command": "python bench/format_cost_llama_cpp.py " + " ".join(argv or
                                                                                   sys.argv[1:])}
        print(cell, json.dumps(out[cell]), flush=True)
    write_json(path, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
