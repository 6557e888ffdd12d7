"""spa bench and spa compare: latency and output parity on any backend (spa.backends).

    spa bench MODEL [MODEL ...] --backend B --batch 1,8,32  ─▶ per model and batch: min/mean/p50/
        p90/p95/p99/max ms, throughput, speed-up vs the first model, the environment; JSON with -o
    spa compare A [B] [--backend X] [--backend-b Y] [--data DATA] ─▶ per output: max abs/rel error,
        cosine; exit 3 when an output is outside the tolerance (a CI gate)
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from spa.api.bench import bench as run_bench
from spa.api.bench import compare as run_compare
from spa.backends.base import BACKENDS, PRECISIONS
from spa.cli.app import add_common, add_executor, add_shape, err, executor_of, failed_tasks
from spa.reporting.report import out


def parser(sub) -> None:
    b = sub.add_parser("bench", help="latency of one or more models on a backend (trtexec-like method)")
    b.add_argument("models", nargs="+", metavar="MODEL", help="ONNX models (or TensorRT engines with --backend trt); "
                   "speed-ups are against the first")
    _backend_options(b)
    b.add_argument("--batch", default="1", help="batch sizes, comma-separated (1)")
    b.add_argument("--warmup-ms", type=float, default=200.0, help="untimed warm-up per model and batch (200)")
    b.add_argument("--duration-s", type=float, default=3.0, help="timed seconds per model and batch (3)")
    b.add_argument("--min-iterations", type=int, default=10, help="timed runs at least, whatever the duration (10)")
    b.add_argument("--min-speedup", type=float, metavar="X",
                   help="exit 3 when a model after the first is less than X times as fast (p50) at some batch")
    add_executor(b)  # one task per model (timings of tasks side by side on one machine disturb each other)
    add_common(b, output="also write the results to this JSON file", json_help="print the results as JSON on stdout")
    c = sub.add_parser("compare", help="output parity of two models, or of one model on two backends; "
                       "exit 3 when outside the tolerance")
    c.add_argument("model_a", metavar="A")
    c.add_argument("model_b", metavar="B", nargs="?", help="second model (default: A, run on --backend-b)")
    _backend_options(c)
    c.add_argument("--backend-b", help="backend of B (default: --backend)")
    c.add_argument("--data", metavar="DATA", help=".npz of inputs keyed by input name (default: random inputs)")
    c.add_argument("--samples", type=int, default=64, help="samples of --data to compare (64)")
    c.add_argument("--batch", type=int, default=1, help="batch size: of the random inputs, or per run of --data (1)")
    c.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (1e-4)")
    c.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance (1e-3): |a-b| <= atol + rtol*|b|")
    c.add_argument("--min-cosine", type=float, help="also fail when an output's cosine similarity is below this")
    add_common(c)


def _backend_options(p) -> None:
    p.add_argument("--backend", default="ort", choices=list(BACKENDS), help="runtime (ort: ONNX Runtime CPU)")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="torch/TensorRT math precision (ORT runs the model's own types)")
    p.add_argument("--sparse", action="store_true", help="2:4 sparse kernels where the backend has them")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (default: the runtime's)")
    p.add_argument("--cache-dir", help="TensorRT engine/timing cache folder (ort-trt, trt)")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", help="plain launches on the GPU")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                   help="size of a dynamic axis: named, e.g. --dim sequence=128, or unnamed (shown as ?) by input "
                        "and axis, e.g. --dim x:2=48 (others: 1; the first axis: --batch)")
    add_shape(p, help="input shape of the random inputs, e.g. --shape x:1x3x736x736 (repeatable; the first axis is "
                      "--batch); default: the OPT shape of --shapes, else --dim")
    p.add_argument("--shapes", help="TensorRT profiles, trtexec-like: name:MIN/OPT/MAX with dims as 1x3x224x224")


def _backend(args) -> dict:
    """The backend options of bench and compare, as the API takes them."""
    return {"backend": args.backend, "precision": args.precision, "sparse": args.sparse, "threads": args.threads,
            "cache_dir": args.cache_dir, "cuda_graph": args.cuda_graph, "dim": args.dim, "shapes": args.shapes,
            "shape": args.shape}


def bench(args) -> int:
    with executor_of(args) as ex:
        result = run_bench(args.models, batch=args.batch, warmup_ms=args.warmup_ms, duration_s=args.duration_s,
                           min_iterations=args.min_iterations, min_speedup=args.min_speedup, output=args.output,
                           progress=err.status, executor=ex, retries=args.retries, **_backend(args))
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        _bench_table(result.to_json())
        for warning in result.to_json().get("warnings", []):
            err.print(f"warning: {warning}", markup=False, highlight=False)
        if args.output:
            err.print(f"wrote {args.output}", markup=False, highlight=False)
    if result.failure:
        err.print(result.failure, markup=False, highlight=False)
        return 3
    return failed_tasks([f"{f['model']}: {f['error']}" for f in result.to_json().get("failed", [])], "benchmark")


def _bench_table(doc: dict) -> None:
    env = doc["environment"]
    t = Table(title=f"spa bench: {doc['backend']} on {env.get('gpu') or env['cpu']} ({env['cores']} cores)")
    for col in ("model", "batch", "min", "p50", "p90", "p99", "max", "samples/s", "speed-up", "clock"):
        t.add_column(col, justify="left" if col in ("model", "clock") else "right")
    for r in doc["results"]:
        lat = r["latency_ms"]
        if lat is None:
            t.add_row(Path(r["model"]).name, str(r["batch"]), f"skipped: {r['skipped']}", *[""] * 7)
            continue
        t.add_row(Path(r["model"]).name, str(r["batch"]), *[f"{lat[k]:.3f}" for k in ("min", "p50", "p90", "p99", "max")],
                  f"{r['throughput']:.1f}", f"{r['speedup']:.2f}x" if r["speedup"] else "-", r["clock"])
    out.print(t)
    out.print("latencies in ms per batch; speed-up = p50 of the first model / p50 (same batch)")


def compare(args) -> int:
    result = run_compare(args.model_a, args.model_b, data=args.data, backend_b=args.backend_b, samples=args.samples,
                         batch=args.batch, atol=args.atol, rtol=args.rtol, min_cosine=args.min_cosine,
                         progress=err.status, **_backend(args))
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        _compare_table(result.to_json())
    return 3 if result.failure else 0


def _compare_table(doc: dict) -> None:
    a, b = doc["a"], doc["b"]
    t = Table(title=f"spa compare: {a['model']} ({a['backend']}) vs {b['model']} ({b['backend']}) on {doc['inputs']}")
    for col in ("output", "max abs", "max rel", "cosine", "outside tol.", "verdict"):
        t.add_column(col, justify="left" if col in ("output", "verdict") else "right")
    for name, o in doc["outputs"].items():
        if "reason" in o:
            t.add_row(name, "", "", "", "", f"FAIL: {o['reason']}")
            continue
        cos = o.get("cosine")
        t.add_row(name, f"{o.get('max_abs', 0):.3g}", f"{o['max_rel']:.3g}", "-" if cos is None else f"{cos:.6f}",
                  f"{o['outside_tolerance']} of {o['elements']}", "ok" if o["pass"] else "FAIL")
    out.print(t)
    for note in doc["notes"]:
        out.print(f"note: {note}")
    tol = doc["tolerance"]
    out.print(f"{'PASS' if doc['pass'] else 'FAIL'}: |a-b| <= {tol['atol']:g} + {tol['rtol']:g}*|b| for every element"
              + (f", cosine >= {tol['min_cosine']:g}" if tol["min_cosine"] is not None else ""))


COMMANDS = {"bench": bench, "compare": compare}
