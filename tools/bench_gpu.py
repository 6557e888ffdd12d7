#!/usr/bin/env python3
"""The GPU table in one go: torch-CUDA, fp16, dense vs 2:4 vs pruned, batch 1/8/64, for BERT-base-
and BERT-large-sized encoders and a ResNet-50-class CNN, through `spa bench --backend torch-cuda`.

    python tools/bench_gpu.py [--cache-dir DIR] [--out-dir DIR] [--models bert-base,bert-large,resnet50]
                              [--batches 1,8,64] [--duration-s 5] [--seq 128] [--ratio 0.5]
                              [--backend torch-cuda] [--precision fp16]

Variants of each model, all built here with the real CLI:
  dense    the exported model
  2:4      spa sparsify DENSE --pattern 2:4 (magnitude; timings do not depend on which weights
           stay), run with --sparse: MatMul/Gemm weights through torch.sparse.to_sparse_semi_structured
           (convolutions have no semi-structured kernel in torch and stay dense)
  pruned   spa prune DENSE --ratio R --round-to 64 (channel counts the tensor cores like)
The variants take turns within one `spa bench` process (backends/bench.py), timed with CUDA
events, with CUDA graphs for batches up to 16 where the graph can be captured. The JSON of each
model goes to OUT_DIR/gpu_<model>.json and its `environment.gpu` names the GPU; a markdown table
goes to stdout. Anchor: PyTorch's semi-structured sparsity tutorial reports 1.1-1.3x for
BERT-base at batch 16-256 on an A100.

`--backend torch --precision fp32 --models tiny` runs the same pipeline on the CPU with
examples/tiny_resnet.onnx (the test suite does that, to keep this script working).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools._models import dense_model, folders, log, parser, quiet_spa


def variants(dense: Path, out_dir: Path, ratio: float) -> dict:
    out = {"dense": dense, "2:4": out_dir / f"{dense.stem}.2x4.onnx", "pruned": out_dir / f"{dense.stem}.r{ratio}.onnx"}
    steps = {"2:4": ["sparsify", str(dense), "--pattern", "2:4", "-o", str(out["2:4"]), "--json"],
             "pruned": ["prune", str(dense), "--ratio", str(ratio), "--round-to", "64", "-o", str(out["pruned"]),
                        "--json"]}
    for label, argv in steps.items():
        if not out[label].exists():
            log(f"spa {' '.join(argv)}")
            if quiet_spa(argv) != 0:
                raise SystemExit(f"spa {argv[0]} failed for {dense}")
    return out


def bench(name: str, paths: dict, args, out_dir: Path) -> dict:
    out = out_dir / f"gpu_{name}.json"
    argv = ["bench", *map(str, paths.values()), "--backend", args.backend, "--precision", args.precision, "--sparse",
            "--batch", args.batches, "--duration-s", str(args.duration_s), "--warmup-ms", "500", "-o", str(out),
            "--json"]
    if name.startswith("bert"):
        argv += ["--dim", f"sequence={args.seq}"]
    log(f"spa {' '.join(argv)}")
    if quiet_spa(argv) != 0:
        raise SystemExit(f"spa bench failed for {name}")
    return json.loads(out.read_text())


def markdown(name: str, paths: dict, doc: dict) -> list:
    label = {str(p): k for k, p in paths.items()}
    sessions = {m["path"]: m["session"] for m in doc["models"]}
    lines = []
    for r in doc["results"]:
        lat, s = r["latency_ms"], sessions[r["model"]]
        sparse = len(s.get("sparse_layers", [])) if label[r["model"]] == "2:4" else "-"
        if lat is None:
            lines.append(f"| {name} | {r['batch']} | {label[r['model']]} | skipped: {r['skipped']} | | | | |")
            continue
        lines.append(f"| {name} | {r['batch']} | {label[r['model']]} | {lat['p50']:.3f} | {lat['p99']:.3f} | "
                     f"{r['throughput']:.0f} | **{r['speedup']:.2f}x** | {sparse} |")
    return lines


def main(argv=None) -> int:
    ap = parser(__doc__, "/tmp/spa-bench-gpu", "bert-base,bert-large,resnet50", "1,8,64", 5.0)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--backend", default="torch-cuda")
    ap.add_argument("--precision", default="fp16")
    args = ap.parse_args(argv)
    cache, out_dir = folders(args)
    lines, env = [], {}
    for name in args.models.split(","):
        paths = variants(dense_model(name, cache), out_dir, args.ratio)
        doc = bench(name, paths, args, out_dir)
        env = doc["environment"]
        lines += markdown(name, paths, doc)
    device = env.get("gpu") or f"{env.get('cpu')} (no GPU)"
    print(f"Device: {device}; {args.backend}, {args.precision}; torch {env.get('torch')}, CUDA {env.get('cuda')}.\n")
    print("| model | batch | variant | p50 ms | p99 ms | samples/s | speed-up vs dense | 2:4 layers run sparse |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
