#!/usr/bin/env python3
"""ONNX Runtime CPU latency of a ResNet-50-class model, dense versus pruned by `spa prune`.

For every model, batch size and ratio: both sessions live in this one process with the
same intra-op thread count; after a warm-up, timed iterations run in short interleaved
slices (dense, pruned r1, pruned r2, ..., order rotated every round, each slice after one
untimed re-warm iteration) until each variant has run for --duration seconds, so drift
(frequency, other load) hits all variants alike. Slices rather than strict alternation:
a model run back to back keeps its caches warm, as in a server, and strict alternation
penalises the pruned model, whose weights would otherwise stay in L3.
Reported: median and p90 latency per iteration, speed-up = dense / pruned median, MACs
reduction = dense MACs / pruned MACs (spa.cost on the model, per sample), and speed-up /
MACs reduction (1.0 = the pruned model is as much faster as it is cheaper).

Models (built once into --cache-dir):
  resnet50-caffe2  the onnx/onnx "light" Caffe2 ResNet-50 rehydrated with the corpus tool,
                   made batch-dynamic (input/output dim 0 -> 'N', Reshape [1,2048] -> [-1,2048])
  resnet50-torch   models/resnet50.py: plain-torch ResNet-50, random weights, TorchScript
                   export opset 17 (needs torch; skipped with a warning without it)
Pruned models are written to --out-dir by the real CLI: spa prune DENSE --ratio R -o OUT
(plus --round-to N for each N given to --round-to other than 1).

usage:
    python tools/bench_latency.py --cache-dir /tmp/spa-bench-cache --out-dir /tmp/spa-bench-out
    python tools/bench_latency.py ... --ratios 0.5 --batches 1 --duration 5    # quick
    python tools/bench_latency.py ... --round-to 1 16     # also channel counts rounded to 16

Markdown table on stdout, progress on stderr, raw numbers in OUT_DIR/bench_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
from _machine import busy_cpu_s, loadavg, own_cpu_s

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO.parent / "shared" / "corpus"
MODELS = ("resnet50-caffe2", "resnet50-torch")


class BenchError(Exception):
    """A missing input or a failed step: one line for the user, exit 1."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)




# ---------------------------------------------------------------- models


def caffe2_resnet50(corpus: Path, cache: Path) -> Path:
    """Rehydrated Caffe2 ResNet-50 with a symbolic batch axis (built once)."""
    import onnx
    from onnx import numpy_helper

    out = cache / "resnet50_rehydrated_dynbatch.onnx"
    if out.exists():
        return out
    tool = corpus / "tools" / "rehydrate_light.py"
    light = corpus / "real" / "onnx-light" / "light_resnet50.onnx"
    missing = [str(p) for p in (tool, light) if not p.exists()]
    if missing:
        raise BenchError(f"missing corpus file(s): {', '.join(missing)}. Hint: pass --corpus DIR")
    static = cache / "resnet50_rehydrated.onnx"
    if not static.exists():
        log(f"building {static} (corpus tool, seed 0) ...")
        tmp = static.with_name(static.name + ".tmp")
        proc = subprocess.run([sys.executable, str(tool), str(light), str(tmp), "--seed", "0"],
                              check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BenchError(f"rehydrate_light.py failed for {light}: {proc.stderr.strip()[-300:]}")
        os.replace(tmp, static)
    log(f"building {out} (batch axis made symbolic) ...")
    model = onnx.load(str(static))
    inits = {t.name: t for t in model.graph.initializer}
    for vi in [i for i in model.graph.input if i.name not in inits] + list(model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    reshapes = 0
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.input[1] in inits:
            shape = numpy_helper.to_array(inits[node.input[1]]).copy()
            if shape.size and shape[0] == 1:
                shape[0] = -1
                inits[node.input[1]].CopyFrom(numpy_helper.from_array(shape, node.input[1]))
                reshapes += 1
    if reshapes != 1:
        raise BenchError(f"expected one batch-1 Reshape in {static}, found {reshapes}")
    onnx.checker.check_model(model, full_check=True)
    tmp = out.with_name(out.name + ".tmp")
    onnx.save(model, str(tmp))
    check_batch_dynamic(tmp)
    os.replace(tmp, out)
    return out


def check_batch_dynamic(path: Path) -> None:
    """Batch 2 must give the same rows as two batch-1 runs (the edit kept the model)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    both = sess.run(None, {name: x})[0]
    one = np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(2)])
    if not np.allclose(both, one, rtol=1e-4, atol=1e-6):
        raise BenchError(f"batch-dynamic edit of {path} changed the outputs")


def torch_resnet50(cache: Path) -> Path | None:
    out = cache / "resnet50_torch.onnx"
    if out.exists():
        return out
    try:
        sys.path.insert(0, str(REPO))
        from models import resnet50
    except ImportError as exc:
        log(f"warning: skipping resnet50-torch ({exc}); pip install -e '.[torch]' to include it")
        return None
    log(f"exporting {out} (models/resnet50.py, TorchScript, opset 17) ...")
    tmp = out.with_name("tmp_" + out.name)
    resnet50.export(tmp)
    os.replace(tmp, out)
    return out


def prune(dense: Path, ratio: float, round_to: int, out_dir: Path, name: str) -> Path:
    """The real CLI: spa prune DENSE --ratio R [--round-to N] -o OUT (default output check)."""
    out = out_dir / (f"{name}.r{ratio:g}" + (f".round{round_to}" if round_to > 1 else "") + ".onnx")
    exe = shutil.which("spa")
    cmd = ([exe] if exe else [sys.executable, "-m", "spa.cli"]) + \
        ["prune", str(dense), "--ratio", f"{ratio:g}", "-o", str(out)] + \
        (["--round-to", str(round_to)] if round_to > 1 else [])
    log(f"  {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"spa prune failed (exit {proc.returncode}): {' '.join(cmd)}: "
                         f"{proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else ''}")
    return out


def label(ratio: float, round_to: int) -> str:
    if ratio == 0:
        return "dense"
    return f"{ratio:g}" + (f" (round-to {round_to})" if round_to > 1 else "")


def cost(path: Path) -> dict:
    import spa

    return spa.cost.summary(spa.load(path))


# ---------------------------------------------------------------- timing


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def feed(sess, batch: int) -> dict:
    inp = sess.get_inputs()[0]
    shape = [batch] + [int(d) for d in inp.shape[1:]]
    return {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def timed_slice(sess, feeds: dict, seconds: float, into: list) -> None:
    """Run until `seconds` have passed (at least one iteration: seconds=0 runs exactly
    one); append each latency."""
    end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        sess.run(None, feeds)
        t1 = time.perf_counter()
        into.append(t1 - t0)
        if t1 >= end:
            return


def bench(variants: dict[str, Path], batch: int, args) -> tuple[dict[str, list[float]], float]:
    """Interleaved timing of all variants of one model at one batch size.

    Each round runs every variant for one slice, in an order rotated every round, so
    drift and bursts of other load hit all variants alike. The first iteration after a
    switch is not timed: it re-warms the caches the other variants evicted (the pruned
    ResNet-50's weights fit in a 32 MB L3, the dense one's do not), as they would be
    warm in a server running one model. Returns the latencies per variant and the
    cores other processes used meanwhile.
    """
    sessions = {k: session(p, args.threads) for k, p in variants.items()}
    feeds = {k: feed(s, batch) for k, s in sessions.items()}
    for k, s in sessions.items():  # warm-up: allocations, kernels, caches
        timed_slice(s, feeds[k], args.warmup, [])
    wait_for_idle(args.wait_idle)
    busy0, own0, wall0 = busy_cpu_s(), own_cpu_s(), time.perf_counter()
    times: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions)
    spent = {k: 0.0 for k in sessions}
    rnd = 0
    while min(spent.values()) < args.duration or min(len(v) for v in times.values()) < args.min_iters:
        for k in order[rnd % len(order):] + order[:rnd % len(order)]:
            before = len(times[k])
            sessions[k].run(None, feeds[k])  # re-warm after the switch, untimed
            timed_slice(sessions[k], feeds[k], args.slice, times[k])
            spent[k] += sum(times[k][before:])
        rnd += 1
    other = (busy_cpu_s() - busy0 - (own_cpu_s() - own0)) / (time.perf_counter() - wall0)
    return times, max(other, 0.0)


def wait_for_idle(limit: float, threshold: float = 0.25) -> None:
    """Wait (up to `limit` s) until other processes use less than `threshold` cores."""
    start = time.perf_counter()
    said = -1
    while True:
        busy0, own0 = busy_cpu_s(), own_cpu_s()
        time.sleep(1.0)
        other = busy_cpu_s() - busy0 - (own_cpu_s() - own0)
        waited = time.perf_counter() - start
        if other < threshold or waited >= limit:
            if other >= threshold:
                log(f"  warning: other processes still use {other:.2f} cores after {waited:.0f} s; timing anyway")
            return
        if waited // 15 > said:
            said = waited // 15
            log(f"  other processes use {other:.2f} cores; waiting up to {limit:.0f} s for the machine to go idle ...")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# ---------------------------------------------------------------- report


def table(rows: list[dict], args) -> str:
    lines = [(f"ONNX Runtime {rows[0]['ort'] if rows else ''} CPU, intra-op threads {args.threads}, "
             f"{args.duration:g} s timed per variant, interleaved "
             f"({'one iteration' if args.slice <= 0 else f'slices of {args.slice:g} s'} per variant per round, "
             "after one untimed re-warm iteration), "
             f"warm-up {args.warmup:g} s; latency per batch in ms."), "",
             ("'other load' = cores used by other processes while that model/batch was timed "
             "(from /proc/stat), to show how quiet the machine was."), "",
             ("| model | batch | ratio | params | GMACs/sample | MACs reduction | median ms | p90 ms | iters "
             "| speed-up (median) | speed-up / MACs reduction | other load |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dense = r["ratio"] == 0
        ratio = r["label"]
        reduction = "-" if dense else f"{r['macs_reduction']:.2f}x"
        speedup = "-" if dense else f"**{r['speedup']:.2f}x**"
        efficiency = "-" if dense else f"{r['efficiency']:.2f}"
        lines.append(f"| {r['model']} | {r['batch']} | {ratio} | {r['params'] / 1e6:.2f}M | {r['macs'] / 1e9:.2f} | "
                     f"{reduction} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['iters']} | {speedup} | {efficiency} | "
                     f"{r['other_cores']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--cache-dir", required=True, type=Path, help="where the dense models are built and kept")
    p.add_argument("--out-dir", required=True, type=Path, help="where pruned models and bench_latency.json go")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help=f"corpus folder (default {DEFAULT_CORPUS})")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    p.add_argument("--round-to", nargs="+", type=int, default=[1], metavar="N",
                   help="spa prune --round-to values; one pruned variant per ratio and value (default 1)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads (default: all cores)")
    p.add_argument("--duration", type=float, default=15.0, help="timed seconds per variant and batch")
    p.add_argument("--min-iters", type=int, default=20, help="at least this many timed iterations per variant")
    p.add_argument("--slice", type=float, default=1.0,
                   help="timed seconds per variant per round (0: one iteration); one untimed re-warm "
                        "iteration precedes each slice")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per session")
    p.add_argument("--wait-idle", type=float, default=120.0,
                   help="before each timed block, wait up to this many seconds for other processes to go idle")
    args = p.parse_args(argv)
    try:
        import onnxruntime as ort

        import spa  # noqa: F401
    except ImportError as exc:
        print(f"error: {exc}. Hint: pip install -e . (from {REPO})", file=sys.stderr)
        return 1
    rows = []
    load_before = loadavg()
    log(f"load average {load_before}")
    try:
        for d in (args.cache_dir, args.out_dir):
            d.mkdir(parents=True, exist_ok=True)
        dense_models = {}
        if "resnet50-caffe2" in args.models:
            dense_models["resnet50-caffe2"] = caffe2_resnet50(args.corpus, args.cache_dir)
        if "resnet50-torch" in args.models:
            path = torch_resnet50(args.cache_dir)
            if path is not None:
                dense_models["resnet50-torch"] = path
        if not dense_models:
            raise BenchError("no model to benchmark")
        for name, dense in dense_models.items():
            log(f"{name}: {dense}")
            variants = {"dense": (0.0, 1, dense)}
            for r in args.ratios:
                for n in args.round_to:
                    variants[label(r, n)] = (r, n, prune(dense, r, n, args.out_dir, name))
            costs = {k: cost(path) for k, (_, _, path) in variants.items()}
            for batch in args.batches:
                log(f"  timing batch {batch}: {len(variants)} variants x {args.duration:g} s ...")
                times, other = bench({k: path for k, (_, _, path) in variants.items()}, batch, args)
                log(f"    other processes used {other:.2f} cores on average while timing")
                dense_med = statistics.median(times["dense"])
                for k, (r, n, path) in variants.items():
                    t = times[k]
                    med = statistics.median(t)
                    row = {"model": name, "batch": batch, "ratio": r, "round_to": n, "label": k, "path": str(path),
                           "params": costs[k]["params"], "macs": costs[k]["macs"],
                           "median_ms": med * 1e3, "p90_ms": pct(t, 90) * 1e3, "iters": len(t),
                           "speedup": dense_med / med, "macs_reduction": costs["dense"]["macs"] / costs[k]["macs"],
                           "ort": ort.__version__, "threads": args.threads, "other_cores": other}
                    row["efficiency"] = row["speedup"] / row["macs_reduction"]
                    rows.append(row)
                    log(f"    {k}: median {row['median_ms']:.1f} ms, p90 {row['p90_ms']:.1f} ms, "
                        f"{len(t)} iters, speed-up {row['speedup']:.2f}x")
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    (args.out_dir / "bench_latency.json").write_text(json.dumps(
        {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"Load average before / after: {load_before} / {loadavg()}\n")
    print(table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
