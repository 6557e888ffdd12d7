"""Params and MACs before/after `--ratio 0.3` for every models/hf_zoo.py model, both exporters.

    python tools/bench_transformers.py [--cache DIR]      # prints a markdown table

MACs are per sample at the exported sequence length (dynamic dims count as 1 in
spa.cost, so for text models they are per token). "heads" is the number of prunable
attention-head groups (groups on a Softmax input's head axis); "hidden" says whether the
hidden size is a prunable statistics-only group (pruned only with --prune-hidden).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    print("| model | exporter | params before | after | ratio | MACs before | after | ratio | head groups | hidden |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in hf_zoo.BUILDERS:
        for exporter in ("torchscript", "dynamo"):
            path = cache / f"{name}.{exporter}.onnx"
            if not path.exists():
                hf_zoo.export(name, path, exporter=exporter)
            model = spa.load(path)
            analysis = spa.analyze(model)
            pruned = api.reinfer(api.prune(analysis, api.make_plan(analysis, args.ratio)))
            softmax_in = {n.input[0] for n in model.graph.node if n.op_type == "Softmax"}
            heads = sum(1 for g in analysis.groups if g.prunable and any(
                tt in softmax_in and k == 1 for tt, k in g.positions))
            hidden = "yes" if any(g.prunable and g.stats_only for g in analysis.groups) else "no"
            p0, p1 = spa.cost.params(model), spa.cost.params(pruned)
            m0, m1 = spa.cost.macs(model), spa.cost.macs(pruned)
            print(f"| {name} | {exporter} | {p0:,} | {p1:,} | {p1 / p0:.2f} | {m0:,} | {m1:,} | "
                  f"{m1 / max(m0, 1):.2f} | {heads} | {hidden} |", flush=True)


if __name__ == "__main__":
    main()
