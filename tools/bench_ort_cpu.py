#!/usr/bin/env python3
"""ONNX Runtime CPU latency, dense versus `spa prune --ratio R`, for a ResNet-50-class CNN and a
BERT-base-class encoder, measured with `spa bench` (one process per model, the variants taking
turns in slices: backends/bench.py).

    python tools/bench_ort_cpu.py [--cache-dir DIR] [--out-dir DIR] [--ratios 0.3,0.5,0.7]
                                  [--batches 1,32] [--duration-s 10] [--seq 128] [--round-to 16]

Models (random weights, built once into --cache-dir):
  resnet50   models/resnet50.py, plain-torch ResNet-50 v1.5, TorchScript export, opset 17, 224x224
  bert-base  models/encoders.py, transformers BertModel (hidden 768, 12 layers, 12 heads, FFN 3072),
             TorchScript export, opset 17, sequence --seq; spa prunes heads and FFN channels
             (the hidden size stays: --prune-hidden is not used)
Each ratio is also pruned with `--round-to 16` (channel counts multiples of 16, which the CPU
kernels run at full speed: docs/benchmarks.md §2), where that changes the channel counts.
MACs are counted by spa.cost at the benchmarked shape (batch 1, sequence --seq), so the MACs
reduction includes attention's sequence-squared products. Columns: speed-up = dense p50 / pruned
p50 at the same batch; speed-up / MACs reduction = 1.0 when the model got as much faster as it
got cheaper (Torch-Pruning's ResNet-50 figure, 2.19x for 3.85x fewer MACs, is 0.57).
Raw results: OUT_DIR/bench_<model>.json (spa bench's JSON); markdown on stdout, progress on stderr.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools._models import dense_model, folders, log, parser, quiet_spa


def pruned_model(dense: Path, ratio: float, out_dir: Path, round_to: int = 1) -> Path:
    out = out_dir / f"{dense.stem}.r{ratio}{f'.round{round_to}' if round_to > 1 else ''}.onnx"
    if not out.exists():
        log(f"spa prune {dense.name} --ratio {ratio} --round-to {round_to}")
        argv = ["prune", str(dense), "--ratio", str(ratio), "--round-to", str(round_to), "-o", str(out), "--json"]
        if quiet_spa(argv) != 0:
            raise SystemExit(f"spa prune failed for {dense} at ratio {ratio}")
    return out


def macs_at(path: Path, dims: dict) -> dict:
    """spa.cost's params and MACs with the named dynamic dims fixed (batch 1)."""
    import spa as spa_api
    from spa.core import cost

    proto = onnx.load(str(path))
    for vi in proto.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_value = dims.get(d.dim_param, 1)
    for vi in proto.graph.output:
        for d in vi.type.tensor_type.shape.dim:
            d.Clear()
    with tempfile.TemporaryDirectory() as tmp:
        fixed = Path(tmp) / path.name
        onnx.save(proto, str(fixed))
        return cost.summary(spa_api.load(fixed))


def bench(name: str, variants: dict, args, out_dir: Path) -> dict:
    out = out_dir / f"bench_{name}.json"
    argv = ["bench", *map(str, variants.values()), "--batch", args.batches, "--duration-s", str(args.duration_s),
            "--warmup-ms", "1000", "--min-iterations", "8", "--threads", str(args.threads), "-o", str(out), "--json"]
    if name != "resnet50":
        argv += ["--dim", f"sequence={args.seq}"]
    log(f"spa {' '.join(argv)}")
    if quiet_spa(argv) != 0:
        raise SystemExit(f"spa bench failed for {name}")
    return json.loads(out.read_text())


def rows(name: str, variants: dict, doc: dict, costs: dict) -> list:
    by_path = {str(p): label for label, p in variants.items()}
    dense = costs["dense"]
    out = []
    for r in doc["results"]:
        label = by_path[r["model"]]
        c = costs[label]
        red = dense["macs"] / c["macs"]
        lat = r["latency_ms"] or {}
        out.append({"model": name, "batch": r["batch"], "ratio": label, "params": c["params"], "macs": c["macs"],
                    "macs_reduction": red, "p50": lat.get("p50"), "p90": lat.get("p90"), "iterations": r["iterations"],
                    "speedup": r["speedup"], "efficiency": r["speedup"] / red if r["speedup"] else None})
    return out


def markdown(table: list, env: dict) -> str:
    lines = [f"Machine: {env['cpu']}, {env['cores']} cores; onnxruntime {env['onnxruntime']} CPU; spa {env['spa']}.",
             "", ("| model | batch | ratio | params | GMACs/sample | MACs reduction | p50 ms | p90 ms | iters | "
                  "speed-up | speed-up / MACs reduction |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        dense = r["ratio"] == "dense"
        lines.append(f"| {r['model']} | {r['batch']} | {r['ratio']} | {r['params'] / 1e6:.2f}M | {r['macs'] / 1e9:.2f} | "
                     + ("- | " if dense else f"{r['macs_reduction']:.2f}x | ")
                     + f"{r['p50']:.1f} | {r['p90']:.1f} | {r['iterations']} | "
                     + ("- | -" if dense else f"**{r['speedup']:.2f}x** | {r['efficiency']:.2f}") + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = parser(__doc__, "/tmp/spa-bench-ort", "resnet50,bert-base", "1,32", 10.0)
    ap.add_argument("--ratios", default="0.3,0.5,0.7")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--round-to", type=int, default=16, help="also each ratio with --round-to N where that "
                    "changes the channel counts (1: not)")
    args = ap.parse_args(argv)
    cache, out_dir = folders(args)
    table, env = [], {}
    for name in args.models.split(","):
        dense = dense_model(name, cache)
        variants = {"dense": dense}
        for r in args.ratios.split(","):
            variants[r] = pruned_model(dense, float(r), out_dir)
            if args.round_to > 1:
                variants[f"{r} (round-to {args.round_to})"] = pruned_model(dense, float(r), out_dir, args.round_to)
        costs = {label: macs_at(p, {"sequence": args.seq}) for label, p in variants.items()}
        for label in [k for k in variants if "round-to" in k]:  # the same channel counts: not timed twice
            if costs[label] == costs[label.split(" ")[0]]:
                del variants[label]
        doc = bench(name, variants, args, out_dir)
        env = doc["environment"]
        table += rows(name, variants, doc, costs)
    print(markdown(sorted(table, key=lambda r: (r["model"], r["batch"])), env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
