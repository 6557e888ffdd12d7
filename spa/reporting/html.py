"""`spa report`: one self-contained HTML page for a compression run.

    DENSE + PRUNED... ─collect─▶ doc {summary, layers, breakdown, fidelity, latency, environment}
                      ─render──▶ page.html (inline CSS, plots as base64 PNG: one file, no network)

Collection is plain functions returning plain (JSON-ready) dicts; rendering reads only the
doc, so `spa report --json` prints exactly what the page shows. Layers of a pruned model are
matched to DENSE's by node name, else by weight initializer name.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from spa.core import __version__, cost, depth, shapes
from spa.core.data import load_npz, require_keys
from spa.core.errors import SpaError, first_line
from spa.core.graph import attr
from spa.core.model import constant_node_value, load, read_json
from spa.core.runtime import random_feeds
from spa.core.sizes import file_bytes
from spa.reporting import html_render
from spa.scoring.evaluate import evaluate, evaluate_arrays

SCHEMA = 1
BENCH_SCHEMA = 1
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SAME_SHAPE = ("Identity", "Cast", "DequantizeLinear", "QuantizeLinear")  # weight reaches its layer unchanged
WEIGHT_PATH = SAME_SHAPE + ("Transpose",)
CONSTANT_OPS = ("Constant", "ConstantOfShape")  # weights that are not initializers (some exporters, "light" models)
RANDOM_SAMPLES = 8
DATA_SAMPLES = 64
PLOT_HINT = "pip install 'spa[plot]'"


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SpaError("matplotlib is needed for spa report", PLOT_HINT) from None


# ------------------------------------------------------------------ collection


def collect(dense, pruned: list, bench=None, *, data=None, samples: int | None = None, title: str | None = None,
            command: str | None = None, step=None, shape=None) -> dict:
    """Everything the page shows. `bench`: a `spa bench --json` file; `data`: an .npz keyed by
    input name, or its arrays (else random inputs); `shape`: {input: dims} (or "name:1x3x736x736"
    text) the MACs and the random inputs are at (else the data's, else dynamic dims as 1);
    `step(what)`: a context manager around each slow part."""
    step = step or (lambda what: contextlib.nullcontext())
    bench_doc = read_bench(bench) if bench else None
    is_file = isinstance(data, (str, os.PathLike))
    arrays = load_npz(data) if is_file else data
    data = str(data) if is_file else "the data"
    paths = [str(dense), *map(str, pruned)]
    with step(f"loading {len(paths)} models"):
        facts = [model_facts(paths[0], shape, arrays)]
        if arrays is not None:  # the data must fit DENSE before the other models are read
            require_keys(arrays, facts[0]["inputs"])
        facts += [model_facts(p, shape, arrays) for p in paths[1:]]
    layers = layer_table(facts)
    with step("fidelity" + (" (random inputs)" if arrays is None else f" (on {data})")):
        fid = fidelity(paths[0], paths[1:], arrays, samples=samples, source=data, shape=shapes.parse(shape))
    return {"schema_version": SCHEMA, "title": title or f"spa report: {Path(paths[0]).name}",
            "dense": paths[0], "models": [_label(p, paths) + (" (dense)" if k == 0 else "") for k, p in enumerate(paths)],
            "summary": summary(facts, layers), "layers": layers, "breakdown": breakdown_table(facts),
            "fidelity": fid, "latency": latency(bench_doc, bench, paths, removed=layers["removed"]),
            "input_shapes": facts[0]["input_shapes"], "input_shapes_from": facts[0]["input_shapes_from"],
            "environment": environment(command)}


def _label(path: str, paths: list) -> str:
    """The file name, or the path where two models share a name."""
    name = Path(path).name
    return name if [Path(p).name for p in paths].count(name) == 1 else path


def model_facts(path, shape=None, arrays=None) -> dict:
    """What one model file says about itself: size, params, MACs (at `shape`, else the shapes of
    `arrays`, else dynamic dims as 1), weighted layers, costs per op type."""
    model = load(path)
    shapes.bind(model, shape, arrays, source="data")
    return {"path": str(path), "bytes": file_bytes(path), **cost.summary(model), "inputs": model.input_names,
            "layers": layers(model), "by_op": op_costs(model), "units": len(depth.find(model)[0]),
            **shapes.record(model)}


def layers(model) -> list[dict]:
    """Conv/ConvTranspose/Gemm/MatMul nodes with a constant weight: name, op, weight, output channels."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consts = {t.name: tuple(t.dims) for t in model.graph.initializer}
    consts.update({n.output[0]: model.shapes[n.output[0]] for n in model.graph.node
                   if n.op_type in CONSTANT_OPS and model.shapes.get(n.output[0]) is not None})
    rows = []
    for node in model.graph.node:
        for slot in _weight_slots(node):
            found = _weight(node.input[slot], consts, producer)
            if found is not None and len(found[1]) >= 2 and None not in found[1]:
                rows.append({"name": node.name, "op": node.op_type, "weight": found[0],
                             "channels": out_channels(node, slot, found[1])})
                break
    return rows


def _weight_slots(node) -> tuple:
    if node.op_type not in LAYER_OPS or len(node.input) < 2:
        return ()
    return (1, 0) if node.op_type == "MatMul" else (1,)


def _weight(name: str, consts: dict, producer: dict):
    """(constant, dims as the layer sees them) behind `name`, through Q/DQ, Cast, Identity, Transpose."""
    perms = []
    for _ in range(8):
        if name in consts:
            dims = consts[name]
            for perm in reversed(perms):
                dims = tuple(dims[p] for p in (perm or reversed(range(len(dims)))))
            return name, dims
        node = producer.get(name)
        if node is None or node.op_type not in WEIGHT_PATH:
            return None
        if node.op_type == "Transpose":
            perms.append(list(attr(node, "perm", []) or []))
        name = node.input[0]
    return None


def out_channels(node, slot: int, dims: tuple) -> int:
    if node.op_type == "Conv":
        return int(dims[0])
    if node.op_type == "ConvTranspose":
        return int(dims[1]) * int(attr(node, "group", 1))
    if node.op_type == "Gemm":
        return int(dims[0] if attr(node, "transB", 0) else dims[1])
    return int(dims[-1] if slot == 1 else dims[-2])


def op_costs(model) -> dict:
    """{op type: {params, macs}}: each parameter counted at the layer that uses it (through
    Q/DQ, Cast, Identity, Transpose), MACs per node; the sums equal cost.summary's totals."""
    out: dict = {}
    at = cost.at_shape(model)
    for node in model.graph.node:
        if n := cost._node_macs(node, at):
            out.setdefault(node.op_type, {"params": 0, "macs": 0})["macs"] += int(n)
    user = _users(model.graph)
    for name, size in _param_tensors(model):
        out.setdefault(user.get(name, "(unused)"), {"params": 0, "macs": 0})["params"] += size
    return out


def _param_tensors(model):
    """(tensor, elements) of what cost.params counts: float initializers and Constant outputs."""
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for t in model.graph.initializer:
        if t.data_type in cost.FLOAT_TYPES and not cost._is_copy(t.name, dims):
            yield t.name, cost._numel(dims[t.name])
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = constant_node_value(node)
            if value is not None and np.issubdtype(value.dtype, np.floating):
                yield node.output[0], int(value.size)


def _users(graph) -> dict:
    """{tensor: op type of the first node that computes with it}, looking through WEIGHT_PATH ops."""
    first = {}
    for node in graph.node:
        for name in node.input:
            first.setdefault(name, node)
    out = {}
    for name, node in first.items():
        for _ in range(8):
            if node.op_type not in WEIGHT_PATH or node.output[0] not in first:
                break
            node = first[node.output[0]]
        out[name] = node.op_type
    return out


def layer_table(facts: list) -> dict:
    """DENSE's weighted layers with their output channels in every model (None: not matched),
    and per model the fraction of those channels removed."""
    dense = facts[0]["layers"]
    rows = [{"name": d["name"] or d["weight"], "op": d["op"], "weight": d["weight"],
             "channels": [_match(d, f["layers"]) for f in facts]} for d in dense]
    removed = []
    for k in range(len(facts)):
        pairs = [(r["channels"][0], r["channels"][k]) for r in rows if r["channels"][k] is not None]
        before = sum(b for b, _ in pairs)
        removed.append(1 - sum(a for _, a in pairs) / before if before else None)
    unmatched = [sum(r["channels"][k] is None for r in rows) for k in range(len(facts))]
    return {"rows": rows, "removed": removed, "unmatched": unmatched}


def _match(layer: dict, others: list):
    """Output channels of `layer` in another model: same node name and op, else same weight."""
    for key in ("name", "weight"):
        for other in others:
            if layer[key] and other[key] == layer[key] and other["op"] == layer["op"]:
                return other["channels"]
    return None


def summary(facts: list, layers: dict) -> list[dict]:
    base = facts[0]
    rows = []
    for f, removed in zip(facts, layers["removed"]):
        rows.append({"path": f["path"], "bytes": f["bytes"], "params": f["params"], "macs": f["macs"],
                     "bytes_x": _ratio(f["bytes"], base["bytes"]), "params_x": _ratio(f["params"], base["params"]),
                     "macs_x": _ratio(f["macs"], base["macs"]), "channels_removed": removed,
                     "units": f.get("units")})
    return rows


def _ratio(a, b):
    return a / b if b else None


def breakdown_table(facts: list) -> dict:
    """{op types (most parameters and MACs in DENSE first), per model {op: {params, macs}}}."""
    ops = sorted({op for f in facts for op in f["by_op"]},
                 key=lambda op: (-sum(facts[0]["by_op"].get(op, {}).values()), op))
    return {"ops": ops, "models": [f["by_op"] for f in facts]}


def fidelity(dense, paths: list, arrays: dict | None = None, *, samples: int | None = None, source=None,
             shape: dict | None = None) -> dict:
    """Cosine, relative error and largest difference of every float output of each model vs DENSE's,
    on `arrays` (keyed by input name) or on random inputs (at `shape`: {input: dims}); a model ORT
    cannot run gets an error."""
    if arrays is not None:
        n = samples or DATA_SAMPLES
        what = f"the first {n} samples (at most) of {source or 'the data'}"
        measure = partial(evaluate_arrays, arrays=arrays, reference=str(dense), max_samples=n)
    else:
        n = samples or RANDOM_SAMPLES
        proto = onnx.load(str(dense), load_external_data=False)
        feeds = [random_feeds(proto, seed=s, shapes=shape) for s in range(n)]
        dims = ", ".join(f"{k} {shapes.text(v)}" for k, v in (shape or {}).items()) or "dynamic dims 1"
        what = f"{n} random inputs (floats standard normal, integers 0 or 1, {dims}; seeds 0-{n - 1})"
        measure = partial(evaluate, data=feeds, reference=str(dense))
    return {"inputs": what, "models": [_fidelity_row(p, measure) for p in paths]}


def _fidelity_row(path, measure) -> dict:
    try:
        rep = measure(str(path))
    except Exception as exc:  # noqa: BLE001 - one model that cannot run does not stop the page
        return {"path": str(path), "error": first_line(exc, limit=200)}
    outs = rep.get("fidelity") or {}
    return {"path": str(path), "samples": rep["samples"], "outputs": outs,
            "cosine": min((o["cosine"] for o in outs.values()), default=None),
            "rel_err": max((o["rel_err"] for o in outs.values()), default=None)}


def read_bench(path) -> dict:
    """A `spa bench --json` document (schema_version 1), or a one-line error."""
    doc = read_json(path, "bench file")
    results = doc.get("results") if isinstance(doc, dict) else None
    ok = (isinstance(doc, dict) and doc.get("schema_version") == BENCH_SCHEMA and isinstance(doc.get("models"), list)
          and isinstance(results, list) and all(isinstance(m, dict) and "path" in m for m in doc["models"])
          and all(isinstance(r, dict) and "model" in r and "batch" in r
                  and isinstance(r.get("latency_ms"), (dict, type(None))) for r in results))
    if not ok:
        raise SpaError(f"not a spa bench file: '{path}' (expected schema_version {BENCH_SCHEMA}, models and results)",
                       "write it with `spa bench DENSE PRUNED... --json > bench.json`")
    return doc


def latency(bench: dict | None, bench_path, paths: list, *, removed: list) -> dict:
    """Bench results of the report's models (matched by resolved path), with each model's
    fraction of channels removed; bench models that are not in the report are listed."""
    if bench is None:
        return {"bench": None, "hint": shlex.join(["spa", "bench", *paths, "--json"]) + " > bench.json"}
    mine = {Path(p).resolve(): k for k, p in enumerate(paths)}
    where = {}
    for m in bench["models"]:
        k = _find(m["path"], Path(bench_path).parent, mine)
        for key in {m["path"], m.get("label") or m["path"]}:
            where[key] = k
    rows = [_latency_row(r, where.get(r["model"]), paths, removed) for r in bench["results"]]
    return {"bench": str(bench_path), "environment": bench.get("environment") or {},
            "backend": bench.get("backend"), "rows": [r for r in rows if r is not None],
            "unmatched": [m["path"] for m in bench["models"] if where.get(m["path"]) is None],
            "missing": [p for k, p in enumerate(paths) if k not in where.values()]}


def _find(path: str, folder: Path, mine: dict):
    for candidate in (Path(path), folder / path):
        with contextlib.suppress(OSError):
            if candidate.resolve() in mine:
                return mine[candidate.resolve()]
    return None


def _latency_row(result: dict, k, paths: list, removed: list):
    if k is None:
        return None
    lat = result.get("latency_ms") or {}
    return {"model": paths[k], "index": k, "batch": result["batch"], "channels_removed": removed[k],
            "p50": lat.get("p50"), "p90": lat.get("p90"), "p99": lat.get("p99"),
            "throughput": result.get("throughput"), "speedup": result.get("speedup"), "skipped": result.get("skipped")}


def environment(command: str | None = None) -> dict:
    env = {"spa": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
           "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform()}
    with contextlib.suppress(ImportError):
        import matplotlib

        env["matplotlib"] = matplotlib.__version__
    env["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {**env, "command": command}


def render(doc: dict) -> str:
    """The page for a collected doc (spa/reporting/html_render.py)."""
    return html_render.render(doc)
