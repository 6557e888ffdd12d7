"""spa bench and spa compare: latency and output parity on any backend (spa.backends).

    spa bench MODEL [MODEL ...] --backend B --batch 1,8,32  ─▶ per model and batch: min/mean/p50/
        p90/p95/p99/max ms, throughput, speed-up vs the first model, the environment; JSON with -o
    spa compare A [B] [--backend X] [--backend-b Y] [--data DATA] ─▶ per output: max abs/rel error,
        cosine; exit 3 when an output is outside the tolerance (a CI gate)
"""

from __future__ import annotations

import json
from pathlib import Path

from spa.core.errors import SpaError

SCHEMA = 1


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
    b.add_argument("-o", "--output", metavar="JSON", help="also write the results to this JSON file")
    b.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    b.add_argument("-v", "--verbose", action="store_true")
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
    c.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    c.add_argument("-v", "--verbose", action="store_true")


def _backend_options(p) -> None:
    from spa.backends.base import BACKENDS, PRECISIONS

    p.add_argument("--backend", default="ort", choices=list(BACKENDS), help="runtime (ort: ONNX Runtime CPU)")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="torch/TensorRT math precision (ORT runs the model's own types)")
    p.add_argument("--sparse", action="store_true", help="2:4 sparse kernels where the backend has them")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (default: the runtime's)")
    p.add_argument("--cache-dir", help="TensorRT engine/timing cache folder (ort-trt, trt)")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", help="plain launches on the GPU")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                   help="size of a named dynamic axis, e.g. --dim sequence=128 (others: 1; the first axis: --batch)")
    p.add_argument("--shapes", help="TensorRT profiles, trtexec-like: name:MIN/OPT/MAX with dims as 1x3x224x224")


def _options(args):
    from spa.backends.base import Options

    shapes = {}
    if getattr(args, "shapes", None):
        from spa.backends.trt import parse_shapes

        shapes = parse_shapes(args.shapes)
    return Options(precision=args.precision, sparse=args.sparse, threads=args.threads, cache_dir=args.cache_dir,
                   cuda_graph=args.cuda_graph, shapes=shapes)


def _dims(items: list) -> dict:
    dims = {}
    for item in items:
        name, _, size = item.partition("=")
        if not name or not size.isdigit() or int(size) < 1:
            raise SpaError(f"bad --dim '{item}'", "write NAME=SIZE with a positive size, e.g. --dim sequence=128")
        dims[name] = int(size)
    return dims


def _batches(text: str) -> list:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise SpaError(f"bad --batch '{text}'", "give positive batch sizes separated by commas, e.g. 1,8,32")
    return sizes


def _open(path: str, backend: str, options):
    from spa.backends.base import open_session

    if not Path(path).is_file():
        raise SpaError(f"cannot read model '{path}': no such file")
    try:
        return open_session(path, backend, options)
    except SpaError as exc:
        raise SpaError(f"{path}: {exc.message}", exc.hint) from None
    except Exception as exc:  # noqa: BLE001 - a runtime's own load errors, as one line
        from spa.core.errors import first_line

        raise SpaError(f"cannot load model '{path}' on '{backend}': {first_line(exc)}") from None


def _cost(path: str) -> dict:
    """Params and MACs per sample (None for files spa cannot read as ONNX, e.g. engines)."""
    from spa.core import cost
    from spa.core.model import load

    try:
        return cost.summary(load(path))
    except SpaError:
        return {"params": None, "macs": None}


def bench(args) -> int:
    from spa.backends import bench as method
    from spa.cli.app import err
    from spa.core.model import check_writable

    batches, dims, options = _batches(args.batch), _dims(args.dim), _options(args)
    if args.duration_s <= 0 or args.warmup_ms < 0:
        raise SpaError("--duration-s must be positive and --warmup-ms not negative")
    if args.output:
        check_writable(args.output)
    sessions = [_open(p, args.backend, options) for p in args.models]
    plan = method.Plan(args.warmup_ms, args.duration_s, args.min_iterations)
    results = []
    for batch in batches:
        results += _bench_batch(args.models, sessions, batch, dims, plan, err)
    doc = {"schema_version": SCHEMA, "backend": args.backend, "environment": method.environment(),
           "options": {"batches": batches, "warmup_ms": args.warmup_ms, "duration_s": args.duration_s,
                       "precision": args.precision, "sparse": args.sparse, "threads": args.threads, "dims": dims},
           "models": [{"path": p, "label": Path(p).name, **_cost(p), "session": s.describe()}
                      for p, s in zip(args.models, sessions)],
           "results": results}
    slow = _below(results, args.min_speedup)
    doc["min_speedup"] = {"required": args.min_speedup, "failed": slow} if args.min_speedup else None
    if args.output:
        from spa.core.model import write_text_atomic

        write_text_atomic(args.output, json.dumps(doc, indent=1))
    if args.json:
        print(json.dumps(doc))
    else:
        _bench_table(doc)
    if slow:
        err.print(f"speed-up below {args.min_speedup:g}x: {'; '.join(slow)}", markup=False, highlight=False)
        return 3
    return 0


def _below(results: list, required: float | None) -> list:
    """'model at batch N: X.XXx' for every measured non-first model slower than required."""
    if not required:
        return []
    first = {r["batch"]: r["model"] for r in reversed(results)}  # the first model of each batch
    return [f"{Path(r['model']).name} at batch {r['batch']}: {r['speedup']:.2f}x" for r in results
            if r["speedup"] is not None and r["model"] != first[r["batch"]] and r["speedup"] < required]


def _bench_batch(paths: list, sessions: list, batch: int, dims: dict, plan, err) -> list:
    """Results of every model at one batch size (a fixed-batch model that cannot take it: skipped)."""
    from spa.backends import bench as method
    from spa.backends.base import feeds_for, fixed_batch

    runners, rows = [], []
    for path, sess in zip(paths, sessions):
        fixed = fixed_batch(sess.inputs)
        row = {"model": path, "batch": batch, "clock": None, "iterations": 0, "skipped": None,
               "latency_ms": None, "throughput": None}
        if fixed is not None and fixed != batch:
            row["skipped"] = f"the model's batch size is fixed to {fixed}"
        else:
            try:
                runner = sess.runner(feeds_for(sess.inputs, batch, dims))
                runner()
                row["clock"] = runner.clock
                runners.append((row, runner))
            except Exception as exc:  # noqa: BLE001 - a runtime refusing these inputs: a reason, not a crash
                from spa.core.errors import first_line

                row["skipped"] = f"does not run at batch {batch}: {first_line(exc, limit=200)}"
        rows.append(row)
    if runners:
        with err.status(f"batch {batch}: timing {len(runners)} model(s)") as status:
            def progress(done: float) -> None:
                status.update(f"batch {batch}: timing {len(runners)} model(s), {done:.0%}")

            measured = method.measure([r for _, r in runners], batch, plan, progress)
        for (row, _), m in zip(runners, measured):
            row.update(m)
    method.speedups(rows)
    return rows


def _bench_table(doc: dict) -> None:
    from rich.table import Table

    from spa.reporting.report import out

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
    from spa.backends.compare import compare as parity

    backend_b = args.backend_b or args.backend
    model_b = args.model_b or args.model_a
    if args.model_b is None and backend_b == args.backend:
        raise SpaError("nothing to compare: one model on one backend", "give a second model, or --backend-b")
    if min(args.atol, args.rtol) < 0 or args.samples < 1 or args.batch < 1:
        raise SpaError("--atol/--rtol must not be negative, --samples and --batch must be positive")
    options = _options(args)
    a = _open(args.model_a, args.backend, options)
    b = _open(model_b, backend_b, options)
    batches, source = _inputs(args, a)
    result = parity(a, b, batches, args.atol, args.rtol, args.min_cosine)
    doc = {"schema_version": SCHEMA, "a": {"model": args.model_a, **a.describe()},
           "b": {"model": model_b, **b.describe()}, "inputs": source,
           "tolerance": {"atol": args.atol, "rtol": args.rtol, "min_cosine": args.min_cosine}, **result}
    if args.json:
        print(json.dumps(doc))
    else:
        _compare_table(doc)
    return 0 if result["pass"] else 3


def _inputs(args, sess) -> tuple:
    from spa.backends.base import feeds_for
    from spa.core.data import calibration_batches, load_npz, require_keys

    if args.data:
        data = load_npz(args.data)
        names = [i.name for i in sess.inputs]
        require_keys(data, names)
        batches = calibration_batches({n: data[n] for n in names}, args.batch, args.samples)
        return batches, f"{args.data} ({sum(len(next(iter(f.values()))) for f in batches)} samples)"
    feeds = feeds_for(sess.inputs, args.batch, _dims(args.dim))
    return [feeds], f"random (seed 0, batch {args.batch})"


def _compare_table(doc: dict) -> None:
    from rich.table import Table

    from spa.reporting.report import out

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
