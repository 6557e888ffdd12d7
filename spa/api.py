"""The public pipeline: plan, prune, verify. The CLI calls exactly these."""

from __future__ import annotations

import numpy as np
import onnx

from . import importance, planner
from .analysis import Analysis
from .errors import SpaError, VerificationError, first_line
from .model import CONSTANT_OPS, TWO_GB, Model, check_model, infer_shapes, weight_bytes

QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
             "MatMulInteger", "DynamicQuantizeLinear", "QGemm", "QLinearAdd"}


def refuse_quantized(model: Model, action: str = "prune") -> None:
    for node in model.graph.node:
        if node.op_type in QUANT_OPS:
            if action == "quantize":
                raise SpaError(f"cannot quantize an already quantized model: found {node.op_type} "
                               f"'{node.name or '#'}'", "quantize the float model")
            raise SpaError(
                f"cannot prune quantized model: found {node.op_type} '{node.name or '#'}' "
                "(pruning QDQ graphs is not supported yet)",
                "prune the float model first, then quantize it",
            )


def statistics(analysis: Analysis, calib=None, max_samples: int = 512, batch_size: int = 64, progress=None):
    """Activation statistics of what the prunable groups' consumers read: measured on `calib`
    (arrays keyed by input name, or an iterable of feed dicts), or without it derived from the
    graph alone (data-free: spa.moments)."""
    from . import stats

    if calib is None:
        return stats.data_free(analysis)
    return stats.calibrate(analysis, calib, max_samples=max_samples, batch_size=batch_size, progress=progress)


def saliency(analysis: Analysis, criterion: str, data, labels=None, max_samples: int = 512, batch_size: int = 64,
             output: str | None = None, device: str = "cpu", progress=None):
    """Per-weight saliency of a gradient criterion (taylor, snip, grasp, crop) on `data`
    ({input: array}), with `labels` or, without them, the model's own predictions as targets."""
    from . import gradients

    return gradients.measure(analysis, data, criterion, labels, output, max_samples, batch_size, device, progress)


def _scores(analysis: Analysis, criterion: str, seed: int, stats) -> dict:
    importance.get(criterion)
    need = importance.NEEDS.get(criterion)
    if need == "gradients" and (stats is None or getattr(stats, "kind", None) != criterion):
        raise SpaError(f"criterion '{criterion}' needs data for its gradients",
                       "pass --calib DATA.npz (with --labels KEY if it holds labels; without, the model's own "
                       "predictions are the targets)")
    if need == "calibration" and (stats is None or stats.source != "calibration"):
        raise SpaError(f"criterion '{criterion}' needs calibration data",
                       "pass --calib DATA.npz (arrays keyed by input name)")
    if need and stats is None:
        stats = statistics(analysis)
    return importance.score(analysis, criterion, seed=seed, data=stats)


def _candidates(analysis: Analysis, prune_hidden: bool) -> list:
    """The groups a plan may prune: the hidden size (stats_only) only on request."""
    return [g for g in analysis.groups if prune_hidden or not g.stats_only]


def make_plan(analysis: Analysis, ratio: float, criterion: str = "l1", global_rank: bool = False,
              round_to: int = 1, max_group_ratio: float = 0.9, seed: int = 0,
              prune_hidden: bool = False, stats=None) -> dict:
    """{group id: [channels to drop]} for every prunable group. Groups that are not exact only
    through normalization statistics (a transformer's hidden size) need `prune_hidden`.
    `stats` (from `statistics`) feed the data criteria; `obspa` derives them itself if absent."""
    planner.check_ratio(ratio)
    if round_to < 1:
        raise SpaError(f"invalid --round-to {round_to}: it must be a positive integer")
    if ratio == 0:
        return {}
    scores = _scores(analysis, criterion, seed, stats)
    groups = _candidates(analysis, prune_hidden)
    if global_rank:
        return planner.global_(groups, scores, ratio, round_to, max_group_ratio)
    return planner.uniform(groups, scores, ratio, round_to)


def plan_for_target(analysis: Analysis, kind: str, keep: float, criterion: str = "l1", round_to: int = 1,
                    max_group_ratio: float = 0.9, seed: int = 0, prune_hidden: bool = False, stats=None) -> dict:
    """The plan that keeps at most `keep` of the model's params or MACs (`kind`), channels
    ranked globally (scores normalised per group, each group capped at `max_group_ratio`): the
    smallest global ratio that meets the budget, found by bisection on spa.cost.estimate."""
    from . import cost

    if kind not in ("params", "macs"):
        raise SpaError(f"unknown target '{kind}'", "choose params or macs")
    if not (isinstance(keep, (int, float)) and 0 < keep <= 1):
        raise SpaError(f"invalid --target-{kind} {keep}: it must be in (0, 1], the fraction of {kind} to keep")
    scores = _scores(analysis, criterion, seed, stats)
    groups = _candidates(analysis, prune_hidden)
    full = cost.estimate(analysis, {})[kind]
    fraction = lambda plan: cost.estimate(analysis, plan)[kind] / max(full, 1)
    plan_at = lambda r: planner.global_(groups, scores, r, round_to, max_group_ratio)
    best = plan_at(0.999)
    if fraction(best) > keep:
        raise SpaError(f"cannot keep only {keep:g} of the {kind}: pruning every prunable group as far as allowed "
                       f"keeps {fraction(best):.3f}", "raise --max-group-ratio, add --prune-hidden, or aim higher")
    lo, hi = 0.0, 0.999
    for _ in range(30):
        mid = (lo + hi) / 2
        plan = plan_at(mid)
        if fraction(plan) <= keep:
            hi, best = mid, plan
        else:
            lo = mid
        if hi - lo < 1e-4:
            break
    return best


def compensation(analysis: Analysis, plan: dict, calib=None, stats=None, max_samples: int = 512,
                 batch_size: int = 64, progress=None) -> tuple[dict, list[str]]:
    """({tensor: updated weights}, notes): the OBS update of the consumers of the planned
    channels (spa.obspa). With `calib`: group by group in graph order, each measured on the
    model with the earlier groups already removed and compensated. Without: one shot, from
    `stats` or the graph's own moments (data-free)."""
    from . import obspa

    if calib is not None:
        return obspa.sequential(analysis, plan, calib, max_samples, batch_size, progress)
    stats = statistics(analysis) if stats is None else stats
    values = obspa.compensate(analysis, plan, stats)
    return values, list(stats.notes)


def prune(analysis: Analysis, plan: dict, check: bool = True, compensate=None) -> onnx.ModelProto:
    """Apply `plan`; with `check`, the result passes onnx.checker with full_check (else
    VerificationError). Over 2 GB a model can only be checked from its file: save it, then
    `check_against(path, original)` (the CLI does this on the temp file before renaming).
    `compensate`: updated weights from `compensation` (or Stats, compensated in one shot), so
    the remaining channels take over what the removed ones carried."""
    from .passes import prune as prune_pass

    if compensate is not None and not isinstance(compensate, dict):
        compensate = compensation(analysis, plan, stats=compensate)[0]
    proto = prune_pass.apply(analysis, plan, compensate)
    if check and weight_bytes(proto) < TWO_GB:
        check_against(proto, analysis.model.proto)
    return proto


def check_against(candidate, original) -> None:
    """Raise VerificationError unless `candidate` passes the full ONNX check.

    A model whose input already fails the full check (some exporters declare wrong output
    ranks) is held to the plain check plus the same full-check complaint as its input.
    Both arguments may be ModelProtos or file paths (files avoid a serialised copy)."""
    after = checker_message(candidate)
    if after is not None:
        before = checker_message(original)
        if after != before or checker_message(candidate, full=False) is not None:
            raise VerificationError(f"pruned model fails the ONNX checker: {after}")


def checker_message(model, full: bool = True) -> str | None:
    """First line of the ONNX checker's complaint about a ModelProto or a file, or None."""
    try:
        check_model(model if isinstance(model, onnx.ModelProto) else str(model), full=full)
    except Exception as exc:  # noqa: BLE001
        return first_line(exc, default=type(exc).__name__)
    return None


def zeroed(analysis: Analysis, plan: dict, values: dict | None = None) -> onnx.ModelProto:
    """The original model with every member slice of the planned channels set to zero
    (`values`: arrays that replace some parameters first, e.g. compensated weights)."""
    return with_values(analysis.model.proto, zeroed_values(analysis, plan, values))


def zeroed_values(analysis: Analysis, plan: dict, values: dict | None = None) -> dict:
    """{member tensor: its value (or `values`' array) with the planned channels' slices zeroed}."""
    values = {k: np.array(v) for k, v in (values or {}).items()}
    for gid, channels in plan.items():
        for m in analysis.group(gid).members:
            arr = values.setdefault(m.tensor, np.array(analysis.index.value(m.tensor)))
            for c in channels:
                idx = [slice(None)] * arr.ndim
                idx[m.axis] = np.asarray(m.positions[c])
                arr[tuple(idx)] = 0
    return values


def with_values(source: onnx.ModelProto, values: dict) -> onnx.ModelProto:
    """A copy of `source` whose initializers/Constant nodes named in `values` hold those arrays."""
    from onnx import numpy_helper

    proto = onnx.ModelProto()
    proto.CopyFrom(source)
    for t in proto.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(values[t.name], t.name))
    for node in proto.graph.node:
        if node.op_type in CONSTANT_OPS and node.output[0] in values:
            node.op_type = "Constant"
            del node.input[:]
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(values[node.output[0]])))
    return proto


def compare(reference, candidate, feeds: dict, light: bool = False) -> dict:
    """Run both in ONNX Runtime on `feeds`; per-output shapes and errors.

    `reference` may also be its outputs already computed ({name: array})."""
    from .backends import ort as ort_backend

    ref = reference if isinstance(reference, dict) else ort_backend.run(reference, feeds, light)
    out = ort_backend.run(candidate, feeds, light)
    report = {"outputs": {}, "ok": set(ref) == set(out)}
    for name, r in ref.items():
        o = out.get(name)
        if not isinstance(r, np.ndarray):  # sequences/maps (ZipMap): same kind and length
            same = type(o) is type(r) and len(o) == len(r)
            report["outputs"][name] = {"kind": type(r).__name__, "same_shape": same}
            report["ok"] &= same
            continue
        entry = {"shape": list(r.shape), "same_shape": o is not None and o.shape == r.shape}
        if entry["same_shape"] and np.issubdtype(r.dtype, np.floating):
            r64, o64 = r.astype(np.float64), o.astype(np.float64)
            entry["max_abs"] = float(np.max(np.abs(r64 - o64))) if r.size else 0.0
            entry["rel_err"] = float(np.linalg.norm(r64 - o64) / max(np.linalg.norm(r64), 1e-12))
            entry["finite"] = bool(np.isfinite(o64).all())
        report["ok"] &= entry["same_shape"] and (o is None or o.dtype == r.dtype)
        report["outputs"][name] = entry
    return report


def reinfer(proto: onnx.ModelProto) -> Model:
    model = Model(proto)
    infer_shapes(model)
    return model
