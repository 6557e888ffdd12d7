"""Params and MACs before/after `--ratio 0.3` for every models/hf_zoo.py model, both exporters.

    python tools/bench_transformers.py [--cache DIR]      # prints a markdown table

MACs are per sample at the exported sequence length (dynamic dims count as 1 in
spa.cost, so for text models they are per token). "heads" is the number of prunable
attention-head groups (groups on a Softmax input's head axis); "hidden" says whether the
hidden size is a prunable statistics-only group (pruned only with --prune-hidden).
The "--simplify" columns repeat the run after the onnxslim pre-pass (passes/simplify.py):
graph nodes before -> after, and the same ratios and head groups.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spa.passes.simplify import simplify

import spa
from spa import api


def main() -> None:
    from models import hf_zoo

    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="/tmp/spa-hfzoo")
    ap.add_argument("--ratio", type=float, default=0.3)
    args = ap.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    print("| model | exporter | params before | after | ratio | MACs before | after | ratio | head groups | hidden "
          "| --simplify: nodes | params ratio | MACs ratio | head groups |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in hf_zoo.BUILDERS:
        for exporter in ("torchscript", "dynamo"):
            path = cache / f"{name}.{exporter}.onnx"
            if not path.exists():
                hf_zoo.export(name, path, exporter=exporter)
            model = spa.load(path)
            p0, m0 = spa.cost.params(model), spa.cost.macs(model)
            heads, hidden, p1, m1 = _run(model, args.ratio)
            slim, stats = simplify(spa.load(path))
            s_heads, _, s_p1, s_m1 = _run(slim, args.ratio)
            print(f"| {name} | {exporter} | {p0:,} | {p1:,} | {p1 / p0:.2f} | {m0:,} | {m1:,} | "
                  f"{m1 / max(m0, 1):.2f} | {heads} | {hidden} | {stats['nodes_before']} -> {stats['nodes_after']} | "
                  f"{s_p1 / p0:.2f} | {s_m1 / max(m0, 1):.2f} | {s_heads} |", flush=True)


def _run(model, ratio):
    """(head groups, hidden prunable, params after, MACs after) at `ratio`."""
    analysis = spa.analyze(model)
    pruned = api.reinfer(api.prune(analysis, api.make_plan(analysis, ratio)))
    softmax_in = {n.input[0] for n in model.graph.node if n.op_type == "Softmax"}
    heads = sum(1 for g in analysis.groups if g.prunable and any(
        tt in softmax_in and k == 1 for tt, k in g.positions))
    hidden = "yes" if any(g.prunable and g.hidden for g in analysis.groups) else "no"
    return heads, hidden, spa.cost.params(pruned), spa.cost.macs(pruned)


if __name__ == "__main__":
    main()
