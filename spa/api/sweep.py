"""spa.sweep: prune, evaluate and benchmark a grid of options over models, one results table.

    sweep file (YAML or JSON) ─read─▶ models x grid points (+ each model as given, "dense")
        ─one task each, through spa.core.executor (in-process | processes | ray)─▶
        per task: spa.prune(model, **fixed, **point) ─▶ spa.evaluate on data ─▶ spa.bench
    ─▶ {rows: [{model, <grid keys>, status, params, macs, agreement, accuracy, p50_ms@b..., error}], ...}
       written to output= as .csv, .json or .md

The file (paths in it are relative to it)::

    models: [a.onnx, b.onnx]        # required
    calib: calib.npz                # spa.prune's calib= (data criteria, the agreement check)
    data: test.npz                  # spa.evaluate's data; `labels` (default "labels"): accuracy
    steps: [prune, eval, bench]     # default: prune, and eval when data is given
    prune: {criterion: obspa}       # spa.prune options every point shares
    grid: {ratio: [0.1, 0.3, 0.5]}  # spa.prune options crossed (a scalar is one value)
    bench: {batch: [1, 8], duration_s: 1}   # spa.bench options
    dense: true                     # a row per model as given: the baseline of eval and bench

The models and data travel to the workers once (the executor's context): models with external
data as their path (a shared filesystem then), others as bytes. A failed task is retried, then
its row says `error` and the rest goes on. Every column but the timings is the same whichever
executor runs it. Benchmarks of tasks running side by side on one machine disturb each other:
time with --executor in-process, or on Ray with one benchmarking task per node (docs/sweeps.md).
"""

from __future__ import annotations

import csv
import inspect
import io
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from spa.api.bench import bench
from spa.api.common import arrays
from spa.api.measure import evaluate
from spa.api.prune import prune_model
from spa.api.result import Result, as_model, stepper
from spa.core import cost
from spa.core.errors import SpaError, UsageError, clip
from spa.core.executor import Job, opened
from spa.core.model import check_writable, read_json, write_text_atomic

SCHEMA = 1
STEPS = ("prune", "eval", "bench")
KEYS = {"models", "calib", "data", "labels", "steps", "prune", "grid", "bench", "dense"}
NOT_IN_GRID = {"model", "output", "progress", "executor", "calib", "save_plan"}  # the sweep's own or per-run files
FORMATS = (".csv", ".json", ".md")
WARNING_CHARS = 160  # of a row's first warning in the table


def sweep(spec, *, executor=None, retries: int = 1, output=None, progress=None, on_task=None):
    """Run the sweep `spec` (a .yaml/.yml/.json path or the same as a dict) and return a Result
    whose document holds one row per model and grid point. `executor`: spa.executor (a name or an
    Executor; default in-process); `output`: the table as .csv, .json or .md; `on_task(done, total)`
    after each task."""
    plan = _Spec.read(spec)
    target = check_writable(output, reads=plan.files()) if output is not None else None
    if target is not None and target.suffix.lower() not in FORMATS:
        raise UsageError(f"cannot write the table to '{output}': unsupported format", "use .csv, .json or .md")
    with stepper(progress)("reading models and data"):
        context = plan.context()
    items = plan.items()
    with opened(executor) as ex:
        outcomes = ex.map(Job(_task, context), items, retries=retries, progress=on_task)
    rows = [o.value if o.ok else _failed(plan, item, o) for item, o in zip(items, outcomes)]
    doc = {"schema_version": SCHEMA, "spec": plan.name, "executor": ex.describe(), "steps": plan.steps,
           "grid": plan.grid, "tasks": len(items), "failed": sum(not o.ok for o in outcomes),
           "columns": _columns(plan, rows), "rows": rows}
    if target is not None:
        write_text_atomic(target, render(doc, target.suffix.lower()))
    return Result(doc)


@dataclass
class _Spec:
    """A sweep file, checked before any work."""

    name: str | None
    root: Path
    models: list[Path]
    calib: Path | None = None
    data: Path | None = None
    labels: str = "labels"
    steps: list = field(default_factory=list)
    fixed: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    bench: dict = field(default_factory=dict)
    dense: bool = True
    names: list = field(default_factory=list)  # the models as the file names them (the rows' "model")

    @classmethod
    def read(cls, spec) -> _Spec:
        name, root = None, Path.cwd()
        if isinstance(spec, (str, os.PathLike)):
            name, root = str(spec), Path(spec).resolve().parent
            spec = _load(Path(spec))
        if not isinstance(spec, dict):
            raise SpaError(f"invalid sweep '{name}': expected a mapping with 'models' and 'grid'")
        unknown = sorted(set(spec) - KEYS)
        if unknown:
            raise SpaError(f"invalid sweep '{name}': unknown key '{unknown[0]}'", f"the keys are {', '.join(sorted(KEYS))}")
        models = spec.get("models")
        if not models or not isinstance(models, list):
            raise SpaError(f"invalid sweep '{name}': 'models' must list at least one model file")
        if not all(isinstance(m, str) for m in models):
            raise SpaError(f"invalid sweep '{name}': 'models' must list file names")
        calib, data = (spec.get(k) for k in ("calib", "data"))
        plan = cls(name, root, [root / m for m in models], root / calib if calib else None,
                   root / data if data else None, str(spec.get("labels", "labels")), list(spec.get("steps") or []),
                   dict(spec.get("prune") or {}),
                   {k: (v if isinstance(v, list) else [v]) for k, v in (spec.get("grid") or {}).items()},
                   dict(spec.get("bench") or {}), bool(spec.get("dense", True)), list(models))
        plan.check()
        return plan

    def check(self) -> None:
        self.steps = self.steps or (["prune", "eval"] if self.data is not None else ["prune"])
        bad = [s for s in self.steps if s not in STEPS]
        if bad:
            raise SpaError(f"invalid sweep '{self.name}': unknown step '{bad[0]}'", f"the steps are {', '.join(STEPS)}")
        if "eval" in self.steps and self.data is None:
            raise SpaError(f"invalid sweep '{self.name}': the eval step needs 'data'")
        allowed = set(inspect.signature(prune_model).parameters) - NOT_IN_GRID
        for key in [*self.grid, *self.fixed]:
            if key not in allowed:
                raise SpaError(f"invalid sweep '{self.name}': '{key}' is no spa.prune option",
                               "the grid and 'prune' take spa.prune's keyword options (ratio, criterion, ...)")
        if any(not v for v in self.grid.values()):
            raise SpaError(f"invalid sweep '{self.name}': a grid key lists no value")
        for f in self.files():
            if not f.is_file():
                raise SpaError(f"invalid sweep '{self.name}': no such file '{f}'")

    def files(self) -> list[Path]:
        return [*self.models, *(f for f in (self.calib, self.data) if f is not None)]

    def points(self) -> list[dict]:
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]

    def items(self) -> list[tuple]:
        """(model index, grid point or None for the model as given), model by model."""
        out = []
        for m in range(len(self.models)):
            out += ([(m, None)] if self.dense else []) + [(m, p) for p in self.points()]
        return out

    def context(self) -> _Context:
        models = [str(m) if _external(m) else m.read_bytes() for m in self.models]
        return _Context(self.names, models, arrays(self.calib) if self.calib else None,
                        arrays(self.data, "data") if self.data else None, self.labels, self.steps, self.fixed,
                        self.bench)


def _load(path: Path) -> dict:
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SpaError("reading a YAML sweep needs PyYAML", "pip install 'spa[ray]' (or pyyaml), or write the "
                           "sweep as JSON") from None
        try:
            return yaml.safe_load(path.read_text())
        except OSError as exc:
            raise SpaError(f"cannot read sweep '{path}': {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise SpaError(f"cannot read sweep '{path}': not valid YAML ({str(exc).splitlines()[0]})") from None
    return read_json(path, "sweep")


def _external(path: Path) -> bool:
    """Whether the model keeps weights in external files (it then travels as its path)."""
    proto = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


@dataclass
class _Context:
    """What every task reads: moved to the executor's workers once per sweep."""

    names: list
    models: list  # bytes, or a path (external data)
    calib: dict | None
    data: dict | None
    labels: str
    steps: list
    fixed: dict
    bench: dict

    def model(self, i: int) -> onnx.ModelProto:
        m = self.models[i]
        return onnx.load(m) if isinstance(m, str) else onnx.load_from_string(m)


def _task(ctx: _Context, item: tuple) -> dict:
    """One row: the model `item[0]` pruned with the grid point `item[1]` (None: as given), evaluated, timed."""
    m, point = item
    model = ctx.model(m)
    row = {"model": ctx.names[m], **_point_cells(point), "status": "ok"}
    if point is None:
        summary = cost.summary(as_model(model))
        row.update(params=summary["params"], macs=summary["macs"], agreement=1.0)
        result = model
    else:
        pruned = prune_model(model, calib=ctx.calib, **ctx.fixed, **point)
        doc = pruned.to_json()
        row.update(params=doc["after"]["params"], macs=doc["after"]["macs"],
                   agreement=(doc["check"].get("agreement") or {}).get("agreement"))
        if doc.get("warnings"):  # e.g. the result no longer agrees with the model: the row says so
            row.update(status="warning", warning=clip(doc["warnings"][0], WARNING_CHARS))
        result = pruned.model
    if "eval" in ctx.steps:
        labels = ctx.labels if ctx.labels in ctx.data else None
        row["accuracy"] = evaluate(result, ctx.data, labels).to_json().get("accuracy")
    if "bench" in ctx.steps:
        timed = bench([result], **{"duration_s": 1.0, "warmup_ms": 100.0, **ctx.bench}).to_json()
        for r in timed["results"]:
            row[f"p50_ms@b{r['batch']}"] = (r.get("latency_ms") or {}).get("p50")
    return row


def _point_cells(point: dict | None) -> dict:
    return {"dense": point is None, **{k: _cell(v) for k, v in (point or {}).items()}}


def _cell(value):
    return value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)


def _failed(plan: _Spec, item: tuple, outcome) -> dict:
    m, point = item
    return {"model": plan.names[m], **_point_cells(point), "status": "error", "error": outcome.error,
            "attempts": outcome.attempts}


def _columns(plan: _Spec, rows: list[dict]) -> list[str]:
    first = ["model", "dense", *plan.grid, "status"]
    rest = []
    for r in rows:
        rest += [k for k in r if k not in first and k not in rest]
    return first + rest


def render(doc: dict, fmt: str) -> str:
    """The document's table as .csv, .json (the whole document) or .md text."""
    if fmt == ".json":
        return json.dumps(doc, indent=2, default=float) + "\n"
    cols = doc["columns"]
    cells = [[cell_text(r.get(c)) for c in cols] for r in doc["rows"]]
    if fmt == ".csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        w.writerows(cells)
        return buf.getvalue()
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells]) + "\n"


def cell_text(v) -> str:
    """A table cell: floats to 4 significant digits, None empty."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
