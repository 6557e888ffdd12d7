"""Layer-wise sensitivity: the fidelity lost when one group alone is pruned, per ratio.

    data ─as_batches, ≤ max_samples─▶ feeds ─probe model─▶ dense outputs (once)
                                     feeds ─stats.calibrate─▶ activation statistics (data criteria only)
    per group: score once ─▶ per ratio: planner.uniform([g]) ─▶ plan ─▶ one trial (a task of
        spa.core.executor: in-process, local processes or Ray; analysis, data and dense outputs
        go to the workers once)
        zero-invariant: plan ─zeroed member slices, fed as overridable initializers─▶ outputs
        otherwise:      plan ─prune (physically)─▶ model ─▶ outputs
    outputs vs dense ─▶ loss = 1 - cosine, rel_err ─▶ {"groups": [{"id", "loss": [per ratio], ...}]}
    sens ─protect(ratio, max_loss)─▶ {group id: ratio} ─plan_with_ratios─▶ plan
    sens ─table_rows / plot─▶ what the CLI shows;  file ─read─▶ sens

For a zero-invariant group, zeroing the dropped channels' member slices gives exactly the
pruned model's outputs (DESIGN.md oracle 1), so one ONNX Runtime session serves every such
trial: the member tensors become overridable initializers (graph inputs with defaults) and
each trial feeds the zeroed copies. Fidelity is measured over all float outputs together
(or `output`): cosine similarity and relative error ||a - b|| / ||b|| of the flattened values.
A trial whose outputs are not finite (where the dense outputs are) gets the worst loss, 2.0,
and rel_err None.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from spa.core.checks import Fidelity
from spa.core.data import as_batches, fixed_batch_size, model_batches, split_labels, trim
from spa.core.errors import SpaError, UsageError
from spa.core.executor import Job, opened
from spa.core.model import CONSTANT_OPS, read_json
from spa.core.runtime import checked_session, ort_reason
from spa.core.values import zeroed_values
from spa.passes import prune as prune_pass
from spa.planning import planner
from spa.scoring import criteria, gradients
from spa.scoring import stats as activation_stats

SCHEMA = 1
RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)
WORST = 2.0  # 1 - cosine is at most 2
PLOT_FORMATS = (".png", ".svg")
FLOAT_OUTPUTS = {"tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"}
LEGEND_TOP = 10


# ---------------------------------------------------------------- measuring


def sensitivity(analysis, data, ratios=RATIOS, *, criterion: str = "l1", groups=None, batch_size: int = 64,
                progress=None, seed: int = 0, max_samples: int = 256, output: str | None = None,
                stats=None, executor=None, retries: int = 1) -> dict:
    """Fidelity loss of each group pruned alone at each ratio (see the module docstring).

    `groups`: Group objects or ids (default: prunable groups but the hidden size, as make_plan).
    `data`: arrays keyed by input name (other keys ignored) or an iterable of feed dicts.
    `progress(done, total)` is called after each trial (total: the trials that drop channels).
    `stats`: activation statistics (spa.scoring.measure.statistics) for the criteria that need them;
    measured on the same samples of `data` when such a criterion gets none.
    `executor` (spa.core.executor: a name or an Executor; default in-process) runs the trials,
    one task per group and ratio; the model, data and dense outputs move to its workers once.
    A trial that still fails after `retries` more tries counts as the worst loss, listed in "failed"."""
    ratios = _check_ratios(ratios)
    criteria.get(criterion)  # an unknown criterion fails before any work
    groups = _pick_groups(analysis, groups)
    probe = _Probe(analysis, groups, output)
    feeds = _calibration(data, probe.inputs, batch_size, max_samples,
                         fixed=fixed_batch_size(analysis.model.proto))
    stats = _statistics(analysis, criterion, groups, feeds, stats)
    dense = probe.dense(feeds)
    if any(np.isnan(v).any() for d in dense for v in d.values()):
        raise SpaError("the model gives NaN outputs on the calibration data", "check the data (values, scale)")
    rows, trials = [], []
    for g in groups:
        scores = criteria.score(analysis, criterion, groups=[g], seed=seed, data=stats)
        plans = [planner.uniform([g], scores, r) for r in ratios]
        rows.append({"id": g.id, "size": g.size, "zero_invariant": bool(g.zero_invariant),
                     "loss": [0.0] * len(ratios), "rel_err": [0.0] * len(ratios),
                     "channels_dropped": [len(p.get(g.id, [])) for p in plans]})
        trials += [(len(rows) - 1, k, g.id, p) for k, p in enumerate(plans) if p]
    context = _Trials(analysis, [g.id for g in groups], output, feeds, dense, probe)
    with opened(executor) as ex:
        outcomes = ex.map(Job(_trial, context, _trial_setup), [t[2:] for t in trials], retries=retries,
                          progress=progress)
    failed = []
    for (row, k, gid, _), got in zip(trials, outcomes):
        rows[row]["loss"][k], rows[row]["rel_err"][k] = got.value if got.ok else (WORST, None)
        if not got.ok:
            failed.append({"id": gid, "ratio": ratios[k], "error": got.error, "attempts": got.attempts})
    return {"schema_version": SCHEMA, "criterion": criterion, "ratios": ratios,
            "samples": sum(_count(f) for f in feeds), "output": output,
            "notes": list(getattr(stats, "notes", [])), "groups": rows, "failed": failed}


@dataclass
class _Trials:
    """What every trial needs: moved to an executor's workers once per sweep. On a worker the
    analysis is rebuilt (Analysis pickles as its model) and the probe opened again; in-process
    both are the driver's own."""

    analysis: object
    ids: list
    output: str | None
    feeds: list
    dense: list
    probe: object = None

    def __getstate__(self) -> dict:
        return {**vars(self), "probe": None}  # an ONNX Runtime session does not travel


def _trial_setup(ctx: _Trials) -> _Trials:
    if ctx.probe is None:
        ctx.probe = _Probe(ctx.analysis, [ctx.analysis.group(i) for i in ctx.ids], ctx.output)
    return ctx


def _trial(ctx: _Trials, item: tuple) -> tuple:
    """One trial: (loss, rel_err) of group `gid` with `plan` applied."""
    gid, plan = item
    return ctx.probe.trial(ctx.analysis, ctx.analysis.group(gid), plan, feeds=ctx.feeds, dense=ctx.dense)


def _check_ratios(ratios) -> list[float]:
    ratios = sorted({float(r) for r in ratios})
    if not ratios:
        raise UsageError("no ratios to measure", "e.g. ratios=0.1,0.3,0.5,0.7,0.9")
    for r in ratios:
        planner.check_ratio(r, "ratios")
    return ratios


def _statistics(analysis, criterion: str, groups: list, feeds: list[dict], stats):
    """`stats`, or for a criterion that needs activation statistics, those of `feeds`."""
    if stats is not None or criterion not in criteria.NEEDS:
        return stats
    if criteria.NEEDS[criterion] == "gradients":  # the model's own predictions are the targets
        merged = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
        return gradients.measure(analysis, merged, criterion, max_samples=_count(merged))

    spaces = activation_stats.read_spaces(analysis, groups)
    return activation_stats.calibrate(analysis, feeds, spaces, max_samples=sum(_count(f) for f in feeds))


def _pick_groups(analysis, groups) -> list:
    if groups is None:
        return [g for g in analysis.groups if g.prunable and not g.hidden]
    picked = []
    for g in groups:
        if isinstance(g, str):
            try:
                g = analysis.group(g)
            except KeyError:
                raise SpaError(f"no channel group '{g}'", "list the group ids with: spa analyze MODEL") from None
        if not g.prunable:
            raise SpaError(f"cannot measure the sensitivity of group '{g.id}': it is not prunable ({g.reason})")
        picked.append(g)
    order = {g.id: i for i, g in enumerate(analysis.groups)}
    return sorted({g.id: g for g in picked}.values(), key=lambda g: order[g.id])


def _count(feeds: dict) -> int:
    """Samples in a batch: the first axis of its first input (1 for a scalar)."""
    first = np.asarray(next(iter(feeds.values()))) if feeds else np.zeros(0)
    return len(first) if first.ndim else 1


def _calibration(data, inputs: list[str], batch_size: int, max_samples: int, *,
                 fixed: int | None = None) -> list[dict]:
    """The model's inputs from `data`, as cached batches: arrays are cut to `max_samples` and
    batched as the model takes them (`fixed`: its batch size, the last batch padded); feed dicts
    are used whole (their first axes need not be samples) until that many are seen."""
    if batch_size < 1 or max_samples < 1:
        raise SpaError(f"invalid batch size {batch_size} / max samples {max_samples}: both must be positive")
    if isinstance(data, dict):
        data, _ = split_labels(data, inputs, None)
        data = model_batches(data, batch_size, fixed=fixed, max_samples=max_samples)
        if not data:
            raise SpaError("no samples in the calibration data")
        return data
    out, seen = [], 0
    for feeds in as_batches(data, batch_size):
        missing = [n for n in inputs if n not in feeds]
        if missing:
            raise SpaError(f"calibration feeds lack model input(s) {missing} (they have {sorted(feeds)})")
        out.append({n: np.asarray(feeds[n]) for n in inputs})
        seen += _count(out[-1])
        if seen >= max_samples:
            break
    if seen == 0:
        raise SpaError("no samples in the calibration data")
    return out


def _fidelity(got: list[dict], dense: list[dict]) -> tuple[float, float | None]:
    """(1 - cosine, relative error) over every output of every batch, flattened together.
    Positions where the dense output is infinite (masks) count only if the trial differs there."""
    fid = Fidelity()
    for g, d in zip(got, dense):
        for name, ref in d.items():
            fin = np.isfinite(ref)
            if not (np.isfinite(g[name][fin]).all() and np.array_equal(g[name][~fin], ref[~fin])):
                return WORST, None
            fid.add(g[name][fin], ref[fin])
    res = fid.result()
    return float(min(max(0.0, 1.0 - res["cosine"]), WORST)), float(res["rel_err"])


class _Probe:
    """One ONNX Runtime session whose member tensors (of zero-invariant groups) can be overridden."""

    def __init__(self, analysis, groups, output: str | None):
        proto = analysis.model.proto
        inits = {t.name for t in proto.graph.initializer}
        self.inputs = [i.name for i in proto.graph.input if i.name not in inits]
        wanted = {m.tensor for g in groups if g.zero_invariant for m in g.members}
        self.name = analysis.model.path or "(in memory)"
        self.session = checked_session(_overridable(proto, wanted, analysis.index.value), name=self.name)
        self.overridable = {i.name for i in self.session.get_overridable_initializers()}
        self.names = self._output_names(output)

    def _output_names(self, output: str | None) -> list[str]:
        floats = [o.name for o in self.session.get_outputs() if o.type in FLOAT_OUTPUTS]
        if output is None:
            if not floats:
                raise SpaError("the model has no float tensor output to measure fidelity on",
                               "sensitivity compares float outputs (label-only or ZipMap outputs cannot be compared)")
            return floats
        if output not in floats:
            raise SpaError(f"model has no float output '{output}' (float outputs: {floats})")
        return [output]

    def dense(self, feeds: list[dict]) -> list[dict]:
        """The model's own outputs on the calibration data; a run ONNX Runtime refuses as one line."""
        try:
            return self.outputs(feeds, {})
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's run errors, as one line
            raise SpaError(f"model '{self.name}' does not run on the calibration data: {ort_reason(exc)}") from None

    def outputs(self, feeds: list[dict], overrides: dict, session=None) -> list[dict]:
        sess = session or self.session
        return [trim(dict(zip(self.names, sess.run(self.names, {**f, **overrides}))), f) for f in feeds]

    def trial(self, analysis, group, plan: dict, *, feeds: list[dict], dense: list[dict]):
        if group.zero_invariant and all(m.tensor in self.overridable for m in group.members):
            got = self.outputs(feeds, zeroed_values(analysis, plan))
        else:  # not exact by zeroing: prune for real (shapes inside change, outputs do not)
            got = self.outputs(feeds, {}, checked_session(prune_pass.apply(analysis, plan, None)))
        return _fidelity(got, dense)


def _overridable(proto: onnx.ModelProto, tensors: set[str], value) -> onnx.ModelProto:
    """A copy of `proto` where `tensors` (initializers, or outputs of Constant/ConstantOfShape/
    Identity nodes of constants, as `value(name)` gives them) are initializers listed as graph
    inputs, so a run may feed other values (ONNX Runtime allows that from IR version 4; before
    it, initializers in the inputs are constants)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.ir_version = max(probe.ir_version, 4)
    graph = probe.graph
    inits = {t.name: t for t in graph.initializer}
    for node in [n for n in graph.node if n.op_type in CONSTANT_OPS and n.output[0] in tensors]:
        arr = value(node.output[0]) if node.output[0] not in inits else None
        if arr is not None:
            graph.node.remove(node)
            inits[node.output[0]] = numpy_helper.from_array(np.asarray(arr), node.output[0])
            graph.initializer.append(inits[node.output[0]])
    for i in [i for i in graph.input if i.name in inits and i.name not in tensors]:
        graph.input.remove(i)  # other initializers listed as inputs (IR < 4): constants, foldable
    listed = {i.name for i in graph.input}
    for name in sorted(tensors & set(inits) - listed):
        t = inits[name]
        graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    return probe


# ---------------------------------------------------------------- using the result


def protect(sens: dict, ratio: float, max_loss: float) -> dict[str, float]:
    """{group id: the largest measured ratio <= `ratio` whose loss <= `max_loss`, else 0.0}."""
    planner.check_ratio(ratio)
    if not max_loss >= 0:
        raise SpaError(f"invalid max loss {max_loss}: it must be >= 0")
    out = {}
    for g in sens["groups"]:
        ok = [r for r, loss in zip(sens["ratios"], g["loss"]) if r <= ratio and loss <= max_loss]
        out[g["id"]] = max(ok, default=0.0)
    return out


def plan_with_ratios(analysis, scores: dict, ratios_by_group: dict[str, float], *, round_to: int = 1) -> dict:
    """A plan dropping `ratios_by_group[id]` of each named group (lowest scores first)."""
    plan = {}
    for gid, ratio in ratios_by_group.items():
        try:
            group = analysis.group(gid)
        except KeyError:
            raise SpaError(f"no channel group '{gid}'", "was the sensitivity measured on another model?") from None
        if ratio > 0:
            plan.update(planner.uniform([group], scores, ratio, round_to=round_to))
    return plan


def _by_sensitivity(sens: dict) -> list[dict]:
    """Groups, highest loss at the largest ratio first (ties: the next ratio down, ...)."""
    return sorted(sens["groups"], key=lambda g: [-v for v in reversed(g["loss"])])


def table_columns(sens: dict) -> list[str]:
    return ["group", "channels", "ZI", *(f"loss @{r:g}" for r in sens["ratios"])]


def table_rows(sens: dict) -> list[list[str]]:
    """Rows for a table under `table_columns`: most sensitive group first."""
    return [[g["id"], str(g["size"]), "yes" if g["zero_invariant"] else "no", *(f"{v:.3g}" for v in g["loss"])]
            for g in _by_sensitivity(sens)]


def plot(sens: dict, path) -> Path:
    """Loss vs ratio per group (PNG or SVG by extension); the 10 most sensitive in colour."""
    path = check_plot(path)
    from matplotlib.figure import Figure  # no pyplot: no global backend state, headless (Agg)

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    ranked = _by_sensitivity(sens)
    for i, g in reversed(list(enumerate(ranked))):  # the most sensitive drawn last (on top)
        style = {"label": g["id"], "marker": "o", "lw": 1.5} if i < LEGEND_TOP else {"color": "0.75", "lw": 0.8}
        ax.plot(sens["ratios"], g["loss"], **style)
    _log_scale(ax, [v for g in ranked for v in g["loss"]])
    ax.set(xlabel="ratio of the group's channels removed", ylabel="fidelity loss (1 - cosine)",
           title=f"sensitivity per group ({sens['criterion']}, {sens['samples']} samples)")
    if ranked:
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles[::-1], labels[::-1], fontsize="small", title="most sensitive first")
    try:
        fig.savefig(path)
    except OSError as exc:
        raise SpaError(f"cannot write '{path}': {exc.strerror or exc}") from exc
    return path


def check_plot(path) -> Path:
    """Fail early (before measuring) when `path` is not .png/.svg or matplotlib is missing."""
    path = Path(path)
    if path.suffix.lower() not in PLOT_FORMATS:
        raise SpaError(f"cannot plot to '{path}': unsupported format", "use a .png or .svg file name")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SpaError("matplotlib is needed for plot=", "pip install 'spa[plot]'") from None
    return path


def read(path) -> dict:
    """A sensitivity document written as JSON (by `spa sensitivity --json` or a Python user)."""
    doc = read_json(path, "sensitivity")
    ok = isinstance(doc, dict) and doc.get("schema_version") == SCHEMA and isinstance(doc.get("ratios"), list)
    if not ok or not isinstance(doc.get("groups"), list) or not all(
            isinstance(g, dict) and "id" in g and len(g.get("loss") or ()) == len(doc["ratios"]) for g in doc["groups"]):
        raise SpaError(f"not a spa sensitivity file: '{path}' (expected schema_version {SCHEMA}, ratios and "
                       "groups with one loss per ratio)", "write one with: spa sensitivity MODEL --calib DATA --json")
    return doc


def _log_scale(ax, losses: list[float]) -> None:
    """Symmetric-log y when the positive losses span more than two decades (zeros stay visible)."""
    positive = [v for v in losses if v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("symlog", linthresh=min(positive))
