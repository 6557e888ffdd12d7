"""spa.bench and spa.compare: latency and output parity of models on any backend (spa.backends).

    bench([A, B, ...], backend=, batch=[1, 8]) ─sessions─▶ per batch: every model timed in turns
        ─▶ {environment, options, models (params, MACs, session), results (min/mean/p50.../max ms,
            throughput, speed-up vs the first model), min_speedup}  (also written to output=)
    compare(A, B | backend_b=) ─the same inputs (data= or random)─▶ per output: max abs/rel error,
        cosine, elements outside |a-b| <= atol + rtol*|b| ─▶ {a, b, inputs, tolerance, outputs, pass}

Thresholds do not raise: a failed min_speedup= (bench) or tolerance (compare) still gives the
complete document (bench writes it to output= first) carrying the verdict (doc["min_speedup"]
["failed"], doc["pass"]); `result.failure` says what failed and `result.check()` raises
VerificationError with it (the CLI's exit code 3). Models are paths (ONNX files, or TensorRT
engines with backend="trt"), onnx.ModelProtos or spa.Models; in memory a model's path is None.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from spa.api.result import Result, as_model, model_name, stepper
from spa.backends import bench as method
from spa.backends.base import BACKENDS, PRECISIONS, Options, feeds_for, fixed_batch, open_session
from spa.backends.compare import compare as parity
from spa.backends.trt_plan import parse_shapes
from spa.core import cost
from spa.core.data import load_npz, model_batches, require_keys, samples_in
from spa.core.errors import SpaError, UsageError, VerificationError, require
from spa.core.executor import Job, opened
from spa.core.model import Model, check_file, check_writable, write_text_atomic
from spa.core.runtime import ort_reason
from spa.core.shapes import check as check_shape
from spa.core.shapes import parse as parse_shape
from spa.core.shapes import text as shape_text
from spa.passes.quantize import fused_kernels

SCHEMA = 1


@dataclass
class Measurement(Result):
    """A Result with the verdict of a requested threshold: `failure` is None when it held (or
    none was asked for), else what failed."""

    failure: str | None = None

    def check(self) -> Measurement:
        """Raise VerificationError when a requested threshold failed; else return self."""
        if self.failure:
            raise VerificationError(self.failure)
        return self


# -- options ---------------------------------------------------------------------------------


def batch_sizes(batch) -> list:
    """`batch`: an int, a list of ints or text '1,8,32' -> [1, 8, 32] (each positive)."""
    text = batch if isinstance(batch, str) else ",".join(map(str, [batch] if isinstance(batch, int) else batch))
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    require(bool(sizes) and min(sizes) >= 1, f"bad batch='{text}'",
            "give positive batch sizes separated by commas, e.g. 1,8,32")
    return sizes


def named_dims(dim) -> dict:
    """`dim`: {name: size} or ['NAME=SIZE', 'INPUT:AXIS=SIZE', ...] -> {key: size}, each size positive:
    a named dynamic axis by its symbol, an unnamed one (shown as ?) by its input's name and axis index
    (key 'INPUT:AXIS')."""
    items = [f"{k}={v}" for k, v in dim.items()] if isinstance(dim, dict) else list(dim or [])
    dims = {}
    for item in items:
        name, _, size = str(item).partition("=")
        require(bool(name) and size.isdigit() and int(size) >= 1, f"bad dim='{item}'",
                "write NAME=SIZE or INPUT:AXIS=SIZE with a positive size, e.g. dim=sequence=128 or dim=x:2=736")
        head, sep, axis = name.rpartition(":")
        dims[f"{head}:{int(axis)}" if sep and head and axis.isdigit() else name] = int(size)
    return dims


def run_shapes(sessions: list, shape, options: Options, *, dims: dict) -> dict:
    """{input: dims} the random inputs take: `shape` (checked against every session's inputs), else the
    OPT shapes of the TensorRT profiles (`options.shapes`) where they fit; 'INPUT:AXIS' keys of `dims`
    must name a dynamic axis of an input."""
    given = parse_shape(shape)
    for sess in sessions:
        inputs = {i.name: tuple(d if isinstance(d, int) and d > 0 else None for d in i.shape) for i in sess.inputs}
        if given:
            check_shape(inputs, given)
        for key in (k for k in dims if ":" in k and k.rpartition(":")[2].isdigit()):
            name, _, axis = key.rpartition(":")
            ok = name in inputs and int(axis) < len(inputs[name]) and inputs[name][int(axis)] is None
            require(ok, f"bad dim='{key}=...': '{name}' has no dynamic axis {axis}",
                    "its inputs: " + ", ".join(f"{n} ({shape_text(d)})" for n, d in inputs.items()))
    if given:
        return given
    opt = {name: tuple(profile[1]) for name, profile in (options.shapes or {}).items()}
    first = {i.name: len(i.shape) for i in sessions[0].inputs} if sessions else {}
    return {name: dims_ for name, dims_ in opt.items() if first.get(name) == len(dims_)}


def check_backend(backend: str, name: str = "backend") -> None:
    require(backend in BACKENDS, f"invalid {name}='{backend}'", f"choose one of {', '.join(BACKENDS)}")


def backend_options(backend: str, precision="fp32", sparse=False, *, threads=0, cache_dir=None, cuda_graph=True,
                    shapes=None) -> Options:
    """The backend's Options; `shapes`: TensorRT profiles as text 'name:MIN/OPT/MAX' or a dict."""
    check_backend(backend)
    require(precision in PRECISIONS, f"invalid precision='{precision}'", f"choose one of {', '.join(PRECISIONS)}")
    require(isinstance(threads, int) and threads >= 0, f"invalid threads={threads}: it must not be negative")
    profiles = parse_shapes(shapes) if isinstance(shapes, str) else dict(shapes or {})
    return Options(precision=precision, sparse=sparse, threads=threads, cache_dir=cache_dir, cuda_graph=cuda_graph,
                   shapes=profiles)


def _models(models) -> list:
    if isinstance(models, (str, os.PathLike, onnx.ModelProto, Model)):
        return [models]
    models = list(models)
    require(bool(models), "models= is empty", "give one or more models")
    return models


def _open(model, backend: str, options: Options):
    """A session of one model, with load failures as one line naming the model."""
    model = _unwrapped(model)
    name = model_name(model) or "the model in memory"
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise SpaError(f"cannot read model '{model}': no such file")
        check_file(model)
    try:
        return open_session(model, backend, options)
    except SpaError as exc:
        raise SpaError(f"{name}: {exc.message}", exc.hint) from None
    except Exception as exc:  # noqa: BLE001 - a runtime's own load errors, as one line
        raise SpaError(f"cannot load model '{name}' on '{backend}': {ort_reason(exc)}") from None


def _loaded(model) -> Model | None:
    """The model as spa reads it, once for its costs and its Q/DQ (None for files spa cannot read
    as ONNX, e.g. engines)."""
    try:
        return as_model(model)
    except SpaError:
        return None


def _cost(model: Model | None) -> dict:
    """Params and MACs per sample (None where spa cannot read the model)."""
    try:
        return cost.summary(model) if model is not None else {"params": None, "macs": None}
    except SpaError:
        return {"params": None, "macs": None}


# -- bench -----------------------------------------------------------------------------------


def bench(models, *, backend: str = "ort", batch=(1,), precision: str = "fp32", sparse: bool = False,
          threads: int = 0, cache_dir=None, cuda_graph: bool = True, dim=None, shapes=None, shape=None,
          warmup_ms: float = 200.0, duration_s: float = 3.0, min_iterations: int = 10, min_speedup: float | None = None,
          output=None, progress=None, executor=None, retries: int = 1, on_task=None) -> Measurement:
    """Latency of each model at each batch size (speed-ups against the first model), trtexec's
    method with the models taking turns; `output=`: also write the document there (JSON). Random
    inputs: `shape` ({"x": (1, 3, 736, 736)} or "x:1x3x736x736"; the first axis is the batch),
    else the OPT shapes of `shapes` (TensorRT profiles), else `dim` sizes, else dynamic dims of 1.
    `executor` (spa.executor, not in-process): each model is timed by its own task instead, on the
    executor's workers (`threads` or 1 CPUs each; model files must be readable there); a model
    whose task fails after `retries` more tries is listed in the document's "failed"."""
    per_task = {k: v for k, v in locals().items() if k not in ("models", "output", "progress", "executor",
                                                               "retries", "on_task", "min_speedup")}
    models = _models(models)
    batches, dims = batch_sizes(batch), named_dims(dim)
    options = backend_options(backend, precision, sparse, threads=threads, cache_dir=cache_dir, cuda_graph=cuda_graph,
                              shapes=shapes)
    require(duration_s > 0, f"invalid duration_s={duration_s}: it must be positive")
    require(warmup_ms >= 0, f"invalid warmup_ms={warmup_ms}: it must not be negative")
    parse_shape(shape)
    if output is not None:
        check_writable(output, reads=models)
    if getattr(executor, "name", executor) not in (None, "in-process"):  # options checked here, once
        with opened(executor) as ex:
            return _spread(models, per_task, ex, retries, on_task, output=output, min_speedup=min_speedup)
    sessions = [_open(m, backend, options) for m in models]
    names = [model_name(m) or f"model{k}" for k, m in enumerate(models)]
    given = run_shapes(sessions, shape, options, dims=dims)
    plan = method.Plan(warmup_ms, duration_s, min_iterations)
    step = stepper(progress)
    results = []
    for size in batches:
        results += _bench_batch(names, sessions, size, (dims, given), plan, step)
    _require_measured(names, results)
    loaded = [_loaded(m) for m in models]
    doc = {"schema_version": SCHEMA, "backend": backend, "environment": method.environment(),
           "options": {"batches": batches, "warmup_ms": warmup_ms, "duration_s": duration_s,
                       "precision": precision, "sparse": sparse, "threads": threads, "dims": dims,
                       "input_shapes": {k: list(v) for k, v in given.items()} or None},
           "models": [{"path": model_name(m), "label": Path(n).name, **_cost(lm), "session": s.describe()}
                      for m, n, s, lm in zip(models, names, sessions, loaded)],
           "results": results}
    doc["warnings"] = _unfused(doc["models"], loaded) if backend == "ort" else []
    return _finished(doc, min_speedup, output)


def _finished(doc: dict, min_speedup: float | None, output) -> Measurement:
    """The document with its speed-up requirement checked, written to `output` if given."""
    slow = below(doc["results"], min_speedup)
    doc["min_speedup"] = {"required": min_speedup, "failed": slow} if min_speedup else None
    if output is not None:
        write_text_atomic(output, json.dumps(doc, indent=1))
    return Measurement(doc, failure=f"speed-up below {min_speedup:g}x: {'; '.join(slow)}" if slow else None)


def _spread(models: list, options: dict, ex, retries: int, on_task, *, output, min_speedup) -> Measurement:
    """bench() with one task per model on `ex`: the documents merged, speed-ups against the first
    model recomputed per batch size."""
    for m in models:
        if isinstance(m, (str, os.PathLike)):
            check_file(m)
    outcomes = ex.map(Job(_bench_task, options, cpus=max(1, options["threads"])), [_portable(m) for m in models],
                      retries=retries, progress=on_task)
    docs = [o.value for o in outcomes if o.ok]
    if not docs:
        raise SpaError(f"no model could be timed: {outcomes[0].error}")
    doc = {**docs[0], "models": [m for d in docs for m in d["models"]], "executor": ex.describe(),
           "failed": [{"model": model_name(models[k]) or f"model{k}", "error": o.error}
                      for k, o in enumerate(outcomes) if not o.ok]}
    doc["results"] = [r for b in doc["options"]["batches"] for d in docs for r in d["results"] if r["batch"] == b]
    for b in doc["options"]["batches"]:
        method.speedups([r for r in doc["results"] if r["batch"] == b])
    doc["warnings"] = [w for d in docs for w in d["warnings"]]
    if ex.name == "processes" and len(models) > 1:
        doc["warnings"].append(f"timed side by side in {ex.workers} processes on this machine: the timings disturb "
                               "each other (compare models with the default in-process executor)")
    return _finished(doc, min_speedup, output)


def _unwrapped(model):
    """A spa.Model as the runtimes take it: its file, or its proto when it has none."""
    if isinstance(model, Model):
        return model.path if model.path is not None else model.proto
    return model


def _portable(model) -> str | bytes:
    """A model as a task takes it: a file's path, or the bytes of one held in memory."""
    model = _unwrapped(model)
    return model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)


def _bench_task(options: dict, model) -> dict:
    """One model timed on a worker: a path, or the bytes of a model held in memory."""
    return bench(onnx.load_from_string(model) if isinstance(model, bytes) else model, **options).to_json()


def _unfused(entries: list, models: list[Model | None]) -> list[str]:
    """ONNX Runtime CPU runs INT8 Q/DQ fast only where its optimizer fuses them into integer kernels:
    each Q/DQ model's entry gets `fused_kernels`, and a warning where ORT fused none (the model then
    computes in float plus the Q/DQ work: placed for another runtime, e.g. TensorRT)."""
    warnings = []
    for entry, model in zip(entries, models):
        if model is None or not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
            continue
        entry["fused_kernels"] = fused_kernels(model.path if model.path is not None else model.proto)
        if not entry["fused_kernels"]:
            warnings.append(f"{entry['label']}: ONNX Runtime's CPU provider fuses none of its Q/DQ into an integer "
                            "kernel, so it runs in float plus the Q/DQ work (placed for another runtime?): quantize it "
                            "for this backend with `spa quantize --target ort-cpu`")
    return warnings


def _require_measured(names: list, results: list) -> None:
    """A model measured at none of the batch sizes is an error (with its first reason), not a table of
    skipped rows: ONNX Runtime cannot run it as given."""
    for name in names:
        rows = [r for r in results if r["model"] == name]
        if rows and all(r["skipped"] for r in rows):
            raise SpaError(f"model '{name}' could not be measured: {rows[0]['skipped']}",
                           "pass a batch size it takes (batch=)" if "fixed" in rows[0]["skipped"] else None)


def below(results: list, required: float | None) -> list:
    """'model at batch N: X.XXx' for every measured non-first model slower than required."""
    if not required:
        return []
    first = {r["batch"]: r["model"] for r in reversed(results)}  # the first model of each batch
    return [f"{Path(r['model']).name} at batch {r['batch']}: {r['speedup']:.2f}x" for r in results
            if r["speedup"] is not None and r["model"] != first[r["batch"]] and r["speedup"] < required]


def _runnable(name: str, sess, batch: int, dims: tuple):
    """(result row, runner or None): a fixed-batch model that cannot take `batch`, or a runtime
    refusing the inputs, is a row with the reason it was skipped."""
    row = {"model": name, "batch": batch, "clock": None, "iterations": 0, "skipped": None,
           "latency_ms": None, "throughput": None}
    fixed = fixed_batch(sess.inputs)
    if fixed is not None and fixed != batch:
        row["skipped"] = f"the model's batch size is fixed to {fixed}"
        return row, None
    # an input too large to make is an error, not a skipped row
    feeds = feeds_for(sess.inputs, batch, dims[0], shapes=dims[1])
    try:
        runner = sess.runner(feeds)
        runner()
    except Exception as exc:  # noqa: BLE001 - a runtime refusing these inputs: a reason, not a crash
        row["skipped"] = f"does not run at batch {batch}: {ort_reason(exc)}"
        return row, None
    row["clock"] = runner.clock
    return row, runner


def _bench_batch(names: list, sessions: list, batch: int, dims: tuple, plan, step) -> list:
    """Results of every model at one batch size. The step's context may show the share done
    (a rich Status: its update())."""
    rows = [_runnable(n, s, batch, dims) for n, s in zip(names, sessions)]
    runners = [(row, runner) for row, runner in rows if runner is not None]
    if runners:
        what = f"batch {batch}: timing {len(runners)} model(s)"
        with step(what) as status:
            def tick(done: float) -> None:
                if hasattr(status, "update"):
                    status.update(f"{what}, {done:.0%}")

            measured = method.measure([r for _, r in runners], batch, plan, tick)
        for (row, _), m in zip(runners, measured):
            row.update(m)
    rows = [row for row, _ in rows]
    method.speedups(rows)
    return rows


# -- compare ---------------------------------------------------------------------------------


def compare(reference, candidate=None, *, data=None, backend: str = "ort", backend_b: str | None = None,
            precision: str = "fp32", sparse: bool = False, threads: int = 0, cache_dir=None, cuda_graph: bool = True,
            dim=None, shapes=None, shape=None, samples: int = 64, batch: int = 1, atol: float = 1e-4,
            rtol: float = 1e-3, min_cosine: float | None = None, progress=None) -> Measurement:
    """Output parity of `reference` and `candidate` (default: `reference` again, on `backend_b`)
    on `data` (an .npz path or arrays keyed by input name; its first `samples` in runs of
    `batch`) or on random inputs of `batch` samples (seed 0) at `shape` (as for bench)."""
    backend_b = backend_b or backend
    require(candidate is not None or backend_b != backend, "nothing to compare: one model on one backend",
            "give a second model, or backend_b=NAME")
    candidate = reference if candidate is None else candidate
    require(min(atol, rtol) >= 0, f"invalid atol={atol}, rtol={rtol}: tolerances must not be negative or NaN")
    require(min_cosine is None or -1 <= min_cosine <= 1, f"invalid min_cosine={min_cosine}: a cosine is in [-1, 1]")
    for name, value in (("samples", samples), ("batch", batch)):
        require(isinstance(value, int) and value >= 1, f"invalid {name}={value}: it must be a positive integer")
    dims = named_dims(dim)
    parse_shape(shape)
    options = backend_options(backend, precision, sparse, threads=threads, cache_dir=cache_dir, cuda_graph=cuda_graph,
                              shapes=shapes)
    check_backend(backend_b, "backend_b")
    arrays = load_npz(data) if isinstance(data, (str, os.PathLike)) else data
    step = stepper(progress)
    with step("opening the sessions"):
        a, b = _open(reference, backend, options), _open(candidate, backend_b, options)
    batches, source = _inputs(a, arrays, data, samples, batch, (dims, run_shapes([a, b], shape, options, dims=dims)))
    with step(f"comparing ({source})"):
        result = parity(a, b, batches, atol=atol, rtol=rtol, min_cosine=min_cosine,
                        names=tuple(model_name(m) or "the model in memory" for m in (reference, candidate)))
    doc = {"schema_version": SCHEMA, "a": {"model": model_name(reference), **a.describe()},
           "b": {"model": model_name(candidate), **b.describe()}, "inputs": source,
           "tolerance": {"atol": atol, "rtol": rtol, "min_cosine": min_cosine}, **result}
    failed = [name for name, o in result["outputs"].items() if not o["pass"]]
    failure = None if result["pass"] else ("outputs outside the tolerance: " + ", ".join(failed) if failed
                                           else "no outputs to compare: " + "; ".join(result["notes"]))
    return Measurement(doc, failure=failure)


def _inputs(sess, arrays, data, samples: int, batch: int, dims: tuple) -> tuple:
    """(feed dicts, what they are): `samples` of the arrays in runs of `batch`, else random."""
    if arrays is None:
        feeds = feeds_for(sess.inputs, batch, dims[0], shapes=dims[1])
        at = ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in feeds.items())
        return [feeds], f"random (seed 0, batch {batch}: {at})"
    if not isinstance(arrays, dict):
        raise UsageError(f"invalid data={type(arrays).__name__}: expected an .npz path or a dict of arrays")
    names = [i.name for i in sess.inputs]
    require_keys(arrays, names)
    batches = model_batches({n: np.asarray(arrays[n]) for n in names}, batch, fixed=fixed_batch(sess.inputs),
                            max_samples=samples)
    label = str(data) if isinstance(data, (str, os.PathLike)) else "data"
    return batches, f"{label} ({sum(samples_in(f) for f in batches)} samples)"
