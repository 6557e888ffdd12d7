"""The public pipeline: plan, prune, verify. The CLI calls exactly these."""

from __future__ import annotations

import numpy as np
import onnx

from . import importance, planner
from .analysis import Analysis
from .errors import SpaError, VerificationError, first_line
from .model import TWO_GB, Model, check_model, infer_shapes, weight_bytes

QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
             "MatMulInteger", "DynamicQuantizeLinear", "QGemm", "QLinearAdd"}


def refuse_quantized(model: Model) -> None:
    for node in model.graph.node:
        if node.op_type in QUANT_OPS:
            raise SpaError(
                f"cannot prune quantized model: found {node.op_type} '{node.name or '#'}' "
                "(pruning QDQ graphs is not supported yet)",
                "prune the float model first, then quantize it",
            )


def make_plan(analysis: Analysis, ratio: float, criterion: str = "l1", global_rank: bool = False,
              round_to: int = 1, max_group_ratio: float = 0.9, seed: int = 0,
              prune_hidden: bool = False) -> dict:
    """{group id: [channels to drop]} for every prunable group. Groups that are not exact only
    through normalization statistics (a transformer's hidden size) need `prune_hidden`."""
    planner.check_ratio(ratio)
    if round_to < 1:
        raise SpaError(f"invalid --round-to {round_to}: it must be a positive integer")
    if ratio == 0:
        return {}
    scores = importance.score(analysis, criterion, seed=seed)
    groups = [g for g in analysis.groups if prune_hidden or not g.stats_only]
    if global_rank:
        return planner.global_(groups, scores, ratio, round_to, max_group_ratio)
    return planner.uniform(groups, scores, ratio, round_to)


def prune(analysis: Analysis, plan: dict, check: bool = True) -> onnx.ModelProto:
    """Apply `plan`; with `check`, the result passes onnx.checker with full_check (else
    VerificationError). Over 2 GB a model can only be checked from its file: save it, then
    `check_against(path, original)` (the CLI does this on the temp file before renaming)."""
    from .passes import prune as prune_pass

    proto = prune_pass.apply(analysis, plan)
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


def zeroed(analysis: Analysis, plan: dict) -> onnx.ModelProto:
    """The original model with every member slice of the planned channels set to zero."""
    from onnx import numpy_helper

    proto = onnx.ModelProto()
    proto.CopyFrom(analysis.model.proto)
    values = {}
    for gid, channels in plan.items():
        for m in analysis.group(gid).members:
            arr = values.setdefault(m.tensor, np.array(analysis.index.value(m.tensor)))
            for c in channels:
                idx = [slice(None)] * arr.ndim
                idx[m.axis] = np.asarray(m.positions[c])
                arr[tuple(idx)] = 0
    for t in proto.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(values[t.name], t.name))
    for node in proto.graph.node:
        if node.op_type in ("Constant", "ConstantOfShape", "Identity") and node.output[0] in values:
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
