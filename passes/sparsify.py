"""N:M semi-structured sparsity as a graph pass (2:4 for NVIDIA sparse tensor cores).

    Conv W [Cout, Cin/g, k...]     pattern along Cin/g (axis 1), per output position
    MatMul A @ B, B [..., K, N]    pattern along K (axis -2)
    Gemm, B [K, N] / [N, K]        pattern along K (axis 0, or 1 with transB)

In every run of M consecutive weights along the reduction axis at most N are non-zero;
magnitude keeps the N largest |w|. The weight is found by following Identity, Cast,
DequantizeLinear and Transpose back to its initializer or Constant (a Transpose maps the
axis; a DequantizeLinear's masked values are set to the zero point so they dequantize to 0).

Eligibility (TensorRT picks sparse kernels only for constant weights whose reduction size
is a multiple of M): the reduction size divisible by M, and both the reduction and output
sizes at least `min_size` (default 16, in line with NVIDIA ASP's whitelist of layers whose
sizes are multiples of 16). Every other layer is listed with the reason.

`SparsifyPass` is the pass form (passes/base.Pass): rewrite = the masking, ensures = the base
promises plus the N:M pattern re-read from the written file (or the proto in memory).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import numpy_helper
from spa.backends import ort as ort_backend
from spa.passes import permute as permute_search
from spa.passes import sparsegpt
from spa.passes.base import Pass

from spa.core.checks import compare_outputs
from spa.core.errors import SpaError, UsageError, VerificationError
from spa.core.model import Model, load
from spa.core.pattern import holds
from spa.core.pattern import runs as _groups

CHAIN = ("Identity", "Cast", "DequantizeLinear", "Transpose")


@dataclass
class Layer:
    node: str
    op: str
    weight: str | None  # the initializer / Constant output holding the values
    shape: list | None
    axis: int | None  # reduction axis in the stored weight
    reduction: int | None
    eligible: bool
    reason: str | None = None
    retained: float | None = None  # sum |kept| / sum |w| (after sparsify)
    holds: bool | None = None  # the stored weight holds the pattern
    method: str | None = None  # how the kept weights were chosen: "magnitude" or "obs"
    note: str | None = None  # why a calibrated layer fell back to magnitude

    def to_json(self) -> dict:
        return asdict(self)


def parse_pattern(text: str, name: str = "pattern") -> tuple[int, int]:
    """(N, M) of "N:M"; UsageError naming the parameter `name` otherwise."""
    try:
        n, m = (int(v) for v in str(text).split(":"))
    except ValueError:
        raise UsageError(f"invalid {name}={str(text)!r}", "write N:M, e.g. 2:4") from None
    if not 0 < n < m:
        raise UsageError(f"invalid {name}={str(text)!r}: it needs 0 < N < M")
    return n, m


class _Weights:
    """Constant tensors of a model by name (initializers and Constant nodes), and producers."""

    def __init__(self, proto: onnx.ModelProto, base: str = ""):
        self.proto, self.base = proto, base  # base: the folder of weights still in external data
        self.inits = {t.name: t for t in proto.graph.initializer}
        self.producer = {o: n for n in proto.graph.node for o in n.output}
        self.constants = {n.output[0]: n for n in proto.graph.node if n.op_type == "Constant"}

    def value(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name], base_dir=self.base)
        node = self.constants.get(name)
        if node is not None:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def set(self, name: str, value: np.ndarray) -> None:
        if name in self.inits:
            self.inits[name].CopyFrom(numpy_helper.from_array(value, name))
            return
        for a in self.constants[name].attribute:
            if a.name == "value":
                a.t.CopyFrom(numpy_helper.from_array(value))

    def chain(self, name: str) -> tuple[list, str | None]:
        """(the Identity/Cast/DequantizeLinear/Transpose nodes from the consumer back, the stored
        tensor they lead to, or None when the chain ends elsewhere or is too long)."""
        nodes = []
        for _ in range(16):
            if name in self.inits or name in self.constants:
                return nodes, name
            node = self.producer.get(name)
            if node is None or node.op_type not in CHAIN:
                return nodes, None
            nodes.append(node)
            name = node.input[0]
        return nodes, None

    def trace(self, name: str, axis: int, rank: int):
        """(stored name, axis there, zero point or None) of the weight `name` seen with
        reduction `axis`; or (None, reason, None)."""
        zero_point = None
        for _ in range(16):
            if name in self.inits or name in self.constants:
                return name, axis, zero_point
            node = self.producer.get(name)
            if node is None:
                return None, "the weight is not a constant (a graph input or computed)", None
            if node.op_type not in CHAIN:
                return None, f"the weight is computed ({node.op_type} '{node.name}')", None
            if node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(rank))[::-1])
                axis = perm[axis % rank]
            if node.op_type == "DequantizeLinear":
                per_axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                scale = self.value(node.input[1])
                if scale is not None and scale.size > 1 and per_axis % rank == axis % rank:
                    return None, "quantized per channel along the reduction axis", None
                zp = self.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
                if zp is not None and zp.size > 1 and not (zp == zp.reshape(-1)[0]).all():
                    return None, "per-channel zero points that differ", None
                zero_point = None if zp is None else zp.reshape(-1)[:1].reshape(())  # symmetric: all 0
            name = node.input[0]
        return None, "the weight chain is too long", None


def _reduction(node, weights: _Weights):
    """(weight input name, reduction axis as consumed, output size) of a layer, or a reason."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type in ("Conv", "ConvTranspose"):
        if node.op_type == "ConvTranspose":
            return None, "ConvTranspose (TensorRT's sparse kernels are for Conv, Gemm and MatMul)", None
        return node.input[1], 1, None
    if node.op_type == "Gemm":
        return node.input[1], 1 if attrs.get("transB", 0) else 0, None
    if node.op_type == "MatMul":
        return node.input[1], -2, None
    return None, None, None


def layers(proto: onnx.ModelProto, n: int, m: int, *, min_size: int = 16, weights: _Weights | None = None) -> list:
    """Every Conv/Gemm/MatMul with its stored weight, reduction axis and eligibility."""
    weights = weights or _Weights(proto)
    out = []
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
            continue
        label = node.name or node.output[0]
        name, axis, _ = _reduction(node, weights)
        if name is None:
            out.append(Layer(label, node.op_type, None, None, None, None, False, axis))
            continue
        first = weights.trace(node.input[0], -1, 2)[0] if node.op_type == "MatMul" else None
        stored, where, zp = weights.trace(name, axis, _rank(weights, name))
        if stored is None:
            reason = where if first is None else "the constant is the first operand"
            out.append(Layer(label, node.op_type, None, None, None, None, False, reason))
            continue
        w = weights.value(stored)
        rank = w.ndim
        where %= rank
        red = w.shape[where]
        outs = int(np.prod(w.shape)) // max(red, 1)
        if w.dtype.kind not in "fiu":
            reason = f"weight dtype {w.dtype} is not numeric"
        elif red % m:
            reason = f"reduction size {red} is not a multiple of {m}"
        elif min(red, outs) < min_size:
            reason = f"too small for sparse kernels (reduction {red}, outputs {outs}; min_size={min_size})"
        else:
            reason = None
        layer = Layer(label, node.op_type, stored, list(w.shape), where, red, reason is None, reason)
        layer.holds = reason is None and holds(w, where, n, m=m, zero_point=zp)
        out.append(layer)
    return out


def _rank(weights: _Weights, name: str) -> int:
    """Rank of the weight as its consumer sees it (followed to the stored tensor)."""
    stored = weights.chain(name)[1]
    return 2 if stored is None else weights.value(stored).ndim


def mask(w: np.ndarray, axis: int, n: int, *, m: int, zero_point=None, scores: np.ndarray | None = None):
    """(masked copy, retained magnitude): keep the N largest `scores` (default |w|) of each run."""
    zero = 0 if zero_point is None else np.asarray(zero_point).reshape(()).item()
    mag = np.abs(w.astype(np.float64) - zero) if scores is None else np.abs(scores)
    runs = _groups(mag, axis, m)
    drop = np.argsort(runs, axis=1, kind="stable")[:, : m - n]
    keep = np.ones_like(runs, dtype=bool)
    np.put_along_axis(keep, drop, False, axis=1)
    moved = np.moveaxis(w, axis, -1)
    kept = np.where(keep.reshape(moved.shape), moved, np.asarray(zero, dtype=w.dtype))
    total = float(mag.sum())
    retained = float((runs * keep).sum()) / total if total > 0 else 1.0
    return np.moveaxis(kept, -1, axis).astype(w.dtype), retained


def sparsify(proto: onnx.ModelProto, n: int = 2, m: int = 4, *, min_size: int = 16, method: str = "magnitude",
             data=None, dtypes: dict | None = None, max_samples: int = 256, permute=None,
             budget_s: float = 2.0) -> tuple[onnx.ModelProto, list, list]:
    """A copy of `proto` with every eligible weight masked to N:M, and the layers.

    method "magnitude": keep the N largest |w| of each run. "obs": calibrated (`data`: arrays
    keyed by input name; `dtypes`: tensor element types, from spa.model.load) second-order
    selection with compensation (passes/sparsegpt.py); layers it cannot see directly keep
    magnitude, with the reason in `Layer.note`.

    permute: an Analysis of `proto` to search channel permutations first (passes/permute.py,
    `budget_s` per group); the permuted model is checked to compute what the input does, or the
    permutations are dropped. Returns (model, layers, permutation report rows)."""
    if method not in METHODS:
        raise SpaError(f"unknown selection method '{method}'", f"use one of {', '.join(METHODS)}")
    if method == "obs" and data is None:
        raise SpaError("calibrated 2:4 selection needs calibration data", "pass calib=DATA.npz")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    weights = _Weights(out)
    found = layers(out, n, m, min_size=min_size, weights=weights)
    permuted = _permute(proto, out, permute, found, n, m, weights, budget_s) if permute is not None else []
    hs = _hessians(out, found, weights, data, dtypes or {}, max_samples) if method == "obs" else {}
    done: dict[tuple, float] = {}
    for layer in found:
        if not layer.eligible:
            continue
        key = (layer.weight, layer.axis)
        if key not in done:
            w = weights.value(layer.weight)
            zp = _zero_point(out, weights, layer.weight)
            if key in hs:
                new = sparsegpt.reconstruct(w, layer.axis, hs[key], n=n, m=m)
                mag = np.abs(w.astype(np.float64))
                done[key] = float(mag[new != 0].sum() / mag.sum()) if mag.sum() > 0 else 1.0
            else:
                new, done[key] = mask(w, layer.axis, n, m=m, zero_point=zp)
            weights.set(layer.weight, new)
        layer.retained = done[key]
        layer.holds = True
        layer.method = "obs" if key in hs else "magnitude"
    return out, found, permuted


# A permutation is exact up to float summation order; deep detection heads amplify that reordering
# noise to ~1e-3 relative (picodet in the corpus), while a wrong permutation moves whole channels
# (errors of order 1).
PERMUTE_TOL = 5e-3


def _permute(proto, out, analysis, found, n, m, weights: _Weights, budget_s: float) -> list:
    """Permute the groups worth it in `out` (in place); undone when the outputs change."""
    orders, rows = permute_search.plan(analysis, found, n, m=m, weights=weights, budget_s=budget_s)
    if not orders:
        return rows
    saved = {t: weights.value(t) for gid in orders for (t, _) in analysis.group(gid).positions
             if analysis.index.is_const(t) and weights.value(t) is not None}
    permute_search.apply(analysis, orders, weights)
    try:
        feeds = ort_backend.random_feeds(proto, seed=0)
        rep = compare_outputs(ort_backend.run(proto, feeds, light=True), out, feeds, light=True)
        worst = max((o.get("rel_err", 0.0) for o in rep["outputs"].values()), default=0.0)
        why = None if rep["ok"] and worst <= PERMUTE_TOL else f"they changed the outputs (rel. error {worst:.2g})"
    except Exception as exc:  # noqa: BLE001 - a model that does not run on random inputs: keep it unpermuted
        why = f"they could not be checked ({type(exc).__name__})"
    if why is not None:
        for t, w in saved.items():
            weights.set(t, w)
        for row in rows:
            row["permuted"], row["note"] = False, f"permutations undone: {why}"
    return rows


METHODS = ("magnitude", "obs")


def _hessians(proto, found: list, weights: _Weights, data, dtypes: dict, max_samples: int) -> dict:
    """{(stored weight, axis): [H per conv group]} for the eligible layers OBS can compensate;
    the others get a note. A weight read by several layers sums their statistics."""
    nodes = {(x.name or x.output[0]): x for x in proto.graph.node}
    targets, keys = {}, {}
    for layer in found:
        if not layer.eligible:
            continue
        node = nodes[layer.node]
        w = weights.value(layer.weight)
        columns = w.size // w.shape[0] if node.op_type == "Conv" else layer.reduction
        chain = [x.op_type for x in weights.chain(node.input[1])[0]]
        if "DequantizeLinear" in chain:
            layer.note = "the weight is quantized (DequantizeLinear): magnitude"
        elif node.op_type == "Conv" and not set(chain) <= {"Identity", "Cast"}:
            layer.note = "the conv weight is transposed on its way to the layer: magnitude"
        elif node.op_type != "Conv" and w.ndim != 2:
            layer.note = f"a batched weight (rank {w.ndim}): magnitude"
        elif columns > sparsegpt.MAX_COLUMNS:
            layer.note = f"{columns} columns (more than {sparsegpt.MAX_COLUMNS}): magnitude"
        elif dtypes.get(node.input[0]) not in (1, 10, 11, 16):
            layer.note = "the layer input is not a float tensor: magnitude"
        else:
            targets[layer.node] = (node, w.shape)
            keys[layer.node] = (layer.weight, layer.axis)
    if not targets:
        return {}
    per_layer = sparsegpt.hessians(proto, targets, dtypes, data=data, max_samples=max_samples)
    out: dict = {}
    for label, hs in per_layer.items():
        key = keys[label]
        if key in out and [h.shape for h in out[key]] == [h.shape for h in hs]:
            out[key] = [a + b for a, b in zip(out[key], hs)]
        else:
            out.setdefault(key, hs)
    return out


def _zero_point(proto, weights: _Weights, stored: str):
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] == stored and len(node.input) > 2 and node.input[2]:
            zp = weights.value(node.input[2])
            return None if zp is None else zp.reshape(-1)[:1].reshape(())  # uniform (checked by trace)
    return None


def report(proto: onnx.ModelProto, n: int = 2, m: int = 4, *, min_size: int = 16, base: str = "") -> dict:
    """Existing N:M sparsity: eligible layers and how many of them hold the pattern (`base`: the
    folder of weights still in external data, a lazily loaded model's)."""
    found = layers(proto, n, m, min_size=min_size, weights=_Weights(proto, base))
    eligible = [x for x in found if x.eligible]
    return {"pattern": f"{n}:{m}", "min_size": min_size, "layers": len(found), "eligible": len(eligible),
            "holding": sum(1 for x in eligible if x.holds),
            "fraction_holding": (sum(1 for x in eligible if x.holds) / len(eligible)) if eligible else None}


class SparsifyPass(Pass):
    """Model -> the same model with every eligible Conv/Gemm/MatMul weight masked to N:M.

    stats: {"layers": [Layer], "permutation": [rows]}; ensures: the base promises, then every
    eligible layer holds the pattern when re-read from the written file (or the proto)."""

    name = "sparsify"

    def __init__(self, n: int = 2, m: int = 4, min_size: int = 16, method: str = "magnitude", data=None,
                 max_samples: int = 256, permute=None, budget_s: float = 2.0):
        self.n, self.m, self.min_size, self.method = n, m, min_size, method
        self.data, self.max_samples, self.permute, self.budget_s = data, max_samples, permute, budget_s

    def requires(self, model: Model) -> None:
        found = layers(model.proto, self.n, self.m, min_size=self.min_size)
        if not any(x.eligible for x in found):
            why = "; ".join(f"{x.weight}: {x.reason}" for x in found[:3]) + ("; ..." if len(found) > 3 else "")
            small = any("min_size" in (x.reason or "") for x in found)
            raise SpaError(f"sparsify: nothing to sparsify: no layer is eligible for {self.n}:{self.m} "
                           + (f"({why})" if found else "(the model has no Conv, Gemm or MatMul with a stored weight)"),
                           f"a smaller min_size=N lets small layers in (it is {self.min_size})" if small else
                           f"N:M needs Conv/Gemm/MatMul weights whose reduction is a multiple of {self.m}")

    def rewrite(self, model: Model) -> tuple[onnx.ModelProto, dict]:
        proto, found, permuted = sparsify(model.proto, self.n, self.m, min_size=self.min_size, method=self.method,
                                          data=self.data, dtypes=model.dtypes, max_samples=self.max_samples,
                                          permute=self.permute, budget_s=self.budget_s)
        return proto, {"layers": found, "permutation": permuted}

    def ensures(self, model: Model, proto: onnx.ModelProto, file=None) -> dict | None:
        check = super().ensures(model, proto, file)
        written = load(file, infer=False).proto if file is not None else proto
        if not all(x.holds for x in layers(written, self.n, self.m, min_size=self.min_size) if x.eligible):
            raise VerificationError(f"the {self.n}:{self.m} pattern does not hold on the written weights; "
                                    "nothing written")
        return check
