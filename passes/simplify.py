"""Simplify before analysis, with onnxslim: shape arithmetic folded where the sizes are static.

    Model ─onnxslim (constant folding, dead nodes, common subexpressions)─▶ Model'

A dynamic-axes export computes many sizes at run time (TorchScript's rotary
`x[..., : x.shape[-1] // 2]`, repeat_kv's Expand shapes): those axes look unprunable
until the arithmetic over their static sizes is folded into constants. onnxslim does
that folding (a well-kept library; we do not hand-write it) while dynamic axes stay
dynamic.

What we ask of onnxslim and why:
- shared weights stay shared: folding `Identity(W)` (TorchScript's way to reuse ALBERT's
  layers) gives each use its own copy, so a folded tensor equal to one of the input's
  initializers reads that initializer again (spa then prunes it alike for every use);
- no numeric fusions (Conv+BN, Conv+Add/Mul, MatMul+Add -> Gemm, Pad+Conv): they change
  the weights the criteria score and the layers a user recognises, and round differently;
  the pass stays a pure simplification of the graph.

Ensures: the graph's inputs and outputs (names, element types, static and symbolic dims,
weights listed as inputs) are those of the input, the result passes the ONNX checker and
gives the input's outputs (ONNX Runtime, random inputs, dynamic dims at 3); else the
input model is used unchanged and the stats say why.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import numpy_helper
from spa.backends import ort as ort_backend
from spa.passes.base import Pass, PassResult

from spa.core.checks import check_shapes
from spa.core.errors import SpaError, first_line
from spa.core.model import TWO_GB, Model, check_model, infer_shapes, quiet_stdout, weight_bytes
from spa.core.runtime import ort_reason

NAME = "simplify"
RTOL = 1e-4  # outputs of the simplified model vs the input, relative to the largest |output|
NUMERIC_FUSIONS = ["FusionConvAdd", "FusionConvTransposeAdd", "FusionConvBN", "FusionConvTransposeBN", "FusionConvMul",
                   "FusionConvTransposeMul", "FusionGemm", "FusionGemmMul", "FusionGemmAdd", "FusionPadConv"]


def _io(proto: onnx.ModelProto) -> list:
    """(name, element type, dims) of every graph input and output."""
    def sig(v):
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
        return v.name, t.elem_type, dims if t.HasField("shape") else None
    init = {t.name for t in proto.graph.initializer}
    return [sig(v) for v in proto.graph.input if v.name not in init] + [sig(v) for v in proto.graph.output]


def _key(t: onnx.TensorProto):
    value = numpy_helper.to_array(t)
    return t.data_type, tuple(t.dims), hashlib.sha256(value.tobytes()).hexdigest()


def _reshare(slim: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Initializers the pre-pass created that equal one of the input's: read the input's."""
    known = {t.name for t in original.graph.initializer} | {o.name for o in slim.graph.output}
    inline = [t for t in slim.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    new = [t for t in inline if t.name not in known]
    kinds = {(t.data_type, tuple(t.dims)) for t in new}  # only tensors of those kinds can match: hash just them
    by_key = {_key(t): t.name for t in inline if t.name in known and (t.data_type, tuple(t.dims)) in kinds}
    rename = {t.name: by_key.get(_key(t), t.name) for t in new}
    for node in slim.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    kept = [t for t in slim.graph.initializer if rename.get(t.name, t.name) == t.name]
    del slim.graph.initializer[:]
    slim.graph.initializer.extend(kept)


def _restore_weight_inputs(slim: onnx.ModelProto, original: onnx.ModelProto) -> str | None:
    """Initializers the input also lists as graph inputs (overridable weights; every one
    before IR 4) stay listed; None, or why that cannot be."""
    weights = {t.name for t in original.graph.initializer}
    have = {t.name: t for t in slim.graph.initializer}
    listed = []
    for v in original.graph.input:
        if v.name in weights and v.name not in have:
            return f"onnxslim folds away the weight input '{v.name}'"
        listed.append(v)
    if original.ir_version < 4:
        names = {v.name for v in listed}
        listed += [onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                   for t in slim.graph.initializer if t.name not in names]
    del slim.graph.input[:]
    slim.graph.input.extend(listed)
    return None


def _differs(slim: onnx.ModelProto, original: onnx.ModelProto, shapes: dict | None = None) -> tuple[str | None, bool]:
    """(Why the simplified model is not a drop-in for the input, or None; whether outputs were
    compared): the checker, ONNX Runtime, outputs on random inputs with dynamic dims at 3, or at
    `shapes` (a KV-cache decoder's consistent lengths, where dims of 3 would not run). An input
    that does not run on them is only required to load."""
    try:
        check_model(slim)
    except Exception as exc:  # noqa: BLE001
        return f"onnxslim's result fails the ONNX checker: {first_line(exc, default=type(exc).__name__)}", False
    feeds = ort_backend.random_feeds(original, dynamic=3, shapes=shapes)
    try:
        want = ort_backend.run(original, feeds, light=True)
    except Exception:  # noqa: BLE001 - the input does not run on random inputs: loading must do
        want = None
    try:
        got = ort_backend.run(slim, feeds, light=True) if want is not None else ort_backend.session(slim, light=True)
    except Exception as exc:  # noqa: BLE001
        return f"onnxslim's result fails in ONNX Runtime: {ort_reason(exc, default=type(exc).__name__)}", False
    return (_changed(want, got), True) if want is not None else (None, False)


def _changed(want: dict, got: dict) -> str | None:
    """Which output of the simplified model differs from the input's, and how, or None."""
    for name, ref in want.items():
        ref, out = np.asarray(ref), np.asarray(got[name])
        if ref.shape != out.shape or ref.dtype != out.dtype:
            return f"onnxslim's result changes output '{name}'"
        if ref.dtype.kind == "f" and ref.size:
            scale = float(np.abs(ref).max()) or 1.0
            if not float(np.abs(ref.astype(np.float64) - out).max()) <= RTOL * scale:
                return f"onnxslim's result changes output '{name}' beyond {RTOL:g}"
        elif not np.array_equal(ref, out):
            return f"onnxslim's result changes output '{name}'"
    return None


class SimplifyPass(Pass):
    """onnxslim's folding as a pass (module docstring). A pre-pass: when a promise breaks (or
    onnxslim fails, or the model is over 2 GB) the input comes back unchanged and the stats say why."""

    name = "simplify"
    compared = False  # whether ensures compared outputs (an input that does not run is only loaded)

    def requires(self, model: Model) -> None:
        if weight_bytes(model.proto) >= TWO_GB:
            raise _Skip("over 2 GB of weights (onnxslim works in memory)")
        try:
            import onnxslim  # noqa: F401 - the optional extra, loaded when asked for
        except ImportError:
            raise SpaError("simplify=True needs onnxslim, which is not installed", "pip install 'spa[simplify]'") from None

    def rewrite(self, model: Model) -> tuple[onnx.ModelProto, dict]:
        import onnxslim

        source = onnx.ModelProto()
        source.CopyFrom(model.proto)
        try:
            with quiet_stdout():
                slim = onnxslim.slim(source, skip_fusion_patterns=NUMERIC_FUSIONS)
        except Exception as exc:
            raise _Skip(f"onnxslim failed: {first_line(exc, default=type(exc).__name__)}") from exc
        if slim is None or _io(slim) != _io(model.proto):
            raise _Skip("onnxslim would change the graph inputs/outputs")
        _reshare(slim, model.proto)
        return slim, {"nodes_after": len(slim.graph.node)}

    def ensures(self, model: Model, proto: onnx.ModelProto, file=None) -> None:
        """Interface and weight inputs as the input's, the checker, the same outputs (_differs)."""
        why = _restore_weight_inputs(proto, model.proto)
        if not why:
            why, self.compared = _differs(proto, model.proto, check_shapes(model))
        if why:
            raise _Skip(why)

    def run(self, model: Model, output=None) -> PassResult:
        """The simplified graph and its stats; the input's graph, with the reason, when a promise
        breaks. In memory only: simplify feeds the analysis, it writes no file."""
        stats = {"nodes_before": len(model.graph.node), "nodes_after": len(model.graph.node)}
        try:
            self.requires(model)
            proto, found = self.rewrite(model)
            self.ensures(model, proto)
        except _Skip as skip:
            return PassResult(model.proto, {**stats, "status": "skipped", "reason": str(skip)})
        return PassResult(proto, {**stats, **found, "status": "ok", "outputs_compared": self.compared})


class _Skip(Exception):
    """Why the simplified graph is not used (the input is, unchanged)."""


def simplify(model: Model) -> tuple[Model, dict]:
    """(simplified model, stats); the model itself when onnxslim fails or would change the interface."""
    done = SimplifyPass().run(model)
    if done.stats["status"] != "ok":
        return model, done.stats
    new = Model(done.model, model.path, external_files=set(model.external_files))
    infer_shapes(new)
    return new, done.stats


def simplify_model(model: Model, wanted: bool, step) -> tuple[Model, dict | None]:
    """The simplified model and the pass's stats when `wanted` (else the model and None);
    `step(what)`: the caller's progress context."""
    if not wanted:
        return model, None
    with step("simplify (onnxslim)"):
        model.materialize()  # onnxslim folds with the weights in hand
        return simplify(model)
