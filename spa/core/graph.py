"""Read-only index over a model's main graph: producers, consumers, constants, shapes.

Also a tiny symbolic evaluator for shape tensors: `Shape(x) -> Gather -> Concat -> Reshape`
chains evaluate to entries that are ints or `DimRef(tensor, axis)` ("the run-time size of
that axis"), so rules can tell which output sizes follow a pruned axis by themselves.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from spa.core.model import SMALL, Model, constant_node_value
from spa.core.tensors import read_array

DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class DimRef:
    """The run-time size of `axis` of `tensor`."""

    tensor: str
    axis: int


@dataclass(frozen=True)
class DimProd:
    """The run-time size of `ref` times a constant `factor` (repeat_kv's kv_heads * n_rep)."""

    ref: DimRef
    factor: int


class GraphIndex:
    def __init__(self, model: Model):
        self.model = model
        self.graph = model.graph
        self.shapes = model.shapes
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        producer, consumers, by_type = self.producer, self.consumers, defaultdict(list)
        for node in self.graph.node:
            for o in node.output:
                producer[o] = node
            for i in node.input:
                consumers[i].append(node)
            if node.domain in DEFAULT_DOMAINS:
                by_type[node.op_type].append(node)
        producer.pop("", None)
        consumers.pop("", None)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.aliases: dict[str, onnx.NodeProto] = {}  # filled below, once values can be read
        self.constant_nodes = {n.output[0]: n for n in by_type["Constant"]}
        # ConstantOfShape with a constant shape: weights stored as "fill" (onnx/onnx light models)
        self.filled = {n.output[0]: n for n in by_type["ConstantOfShape"] if n.input and self.is_const(n.input[0])}
        # channel spaces that are no tensor: the parts of a fused op's packed axis (spa.core.rules.virtual)
        self.virtual: dict[str, tuple] = {}
        self.graph_inputs = [i.name for i in self.graph.input if i.name not in self.initializers]
        self.graph_outputs = [o.name for o in self.graph.output]
        self.opset = next((o.version for o in model.proto.opset_import if o.domain in DEFAULT_DOMAINS), 1)
        self._values: dict[str, np.ndarray | None] = {}
        self._labels = {id(n): (f"'{n.name}'" if n.name else f"#{i}") for i, n in enumerate(self.graph.node)}
        # Identity of a shared uniform constant: a copy (TorchScript aliases equal-valued
        # parameters this way, e.g. every zero bias of a fresh model); see analysis.untie_uniform
        for n in by_type["Identity"]:
            if self.is_const(n.input[0]) and len(self.consumers[n.input[0]]) > 1 and uniform(self.value(n.input[0])):
                self.aliases[n.output[0]] = n

    def label(self, node: onnx.NodeProto) -> str:
        """How messages name a node: its quoted name, or #index when it has none."""
        return self._labels.get(id(node), f"'{node.name}'")

    def is_const(self, name: str) -> bool:
        return name in self.initializers or name in self.constant_nodes or name in self.aliases

    def value(self, name: str) -> np.ndarray | None:
        """Value of a constant tensor, looking through Identity/Cast/Constant; else None."""
        if not name:
            return None
        if name in self._values:
            return self._values[name]
        value = self._compute_value(name)
        if value is None or value.size <= SMALL:  # shape constants; weights are not kept
            self._values[name] = value
        return value

    def _compute_value(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            ext = self.model.weights_at.get(name)  # a lazily loaded weight: read from its file
            return read_array(ext) if ext is not None else numpy_helper.to_array(self.initializers[name])
        if name in self.constant_nodes:
            return constant_node_value(self.constant_nodes[name])
        if name in self.filled:
            return _fill(self.filled[name], self.value(self.filled[name].input[0]))
        node = self.producer.get(name)
        if node is not None and node.op_type == "Identity":
            return self.value(node.input[0])
        return None

    def shape(self, name: str):
        s = self.shapes.get(name)
        return self.virtual.get(name) if s is None else s

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return None if s is None else len(s)

    def shape_value(self, name: str, depth: int = 0) -> list | None:
        """Entries of a 1-D int shape tensor: int, DimRef or None (unknown)."""
        const = self.value(name)
        if const is not None:
            return [int(v) for v in np.asarray(const).reshape(-1)]
        node = self.producer.get(name)
        if node is None or depth > 32:
            return None
        handler = _SHAPE_OPS.get(node.op_type)
        return handler(self, node, depth + 1) if handler else None


def literal_sources(g: GraphIndex, name: str, depth: int = 0) -> list | None:
    """Where each entry of a computed shape tensor comes from, parallel to `shape_value`:
    `(node, input slot, element)` when the entry is element `element` of a constant read by
    `node` (a Concat part, an Unsqueezed scalar), else None. A pruned size is rewritten there."""
    node = g.producer.get(name)
    if node is None or depth > 32:
        return None
    if node.op_type == "Concat":
        parts = []
        for slot, part in enumerate(node.input):
            const = g.value(part)
            if const is not None:
                parts += [(node, slot, k) for k in range(const.size)]
                continue
            sub = literal_sources(g, part, depth + 1) or _no_sources(g, part)
            if sub is None:
                return None
            parts += sub
        return parts
    if node.op_type in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape"):
        const = g.value(node.input[0])
        if const is not None:
            return [(node, 0, k) for k in range(const.size)]
        return literal_sources(g, node.input[0], depth + 1)
    if node.op_type == "Mul":  # Shape(t)[a] * n (BLOOM's batch * heads): n is where the size is stored
        for slot in (0, 1):
            const = g.value(node.input[slot])
            if const is not None and const.size == 1 and g.value(node.input[1 - slot]) is None:
                return [(node, slot, 0)] * len(g.shape_value(name) or [])
    if node.op_type == "Where":  # TorchScript's Expand: Where(Equal(shape, -1), ones, shape), entry by entry
        cond, n = g.shape_value(node.input[0], depth + 1), len(g.shape_value(name) or [])
        branches = [literal_sources(g, x, depth + 1) or _no_sources(g, x) for x in node.input[1:3]]
        if cond is not None and all(c is not None for c in cond) and all(b is not None for b in branches):
            pick = lambda v, k: v[0] if len(v) == 1 else v[k]
            return [pick(branches[0], k) if pick(cond, k) else pick(branches[1], k) for k in range(n)]
    values = g.shape_value(name)
    return None if values is None else [None] * len(values)


def _no_sources(g: GraphIndex, name: str) -> list | None:
    """No literal for any entry of `name` (None if even its length is unknown)."""
    values = g.shape_value(name)
    n = len(values) if values is not None else _static_length(g, name)
    return None if n is None else [None] * n


def _static_length(g: GraphIndex, name: str) -> int | None:
    """Length of a 1-D tensor whose one dim is static, else None."""
    shape = g.shape(name)
    return shape[0] if shape is not None and len(shape) == 1 and isinstance(shape[0], int) else None


def uniform(value) -> bool:
    """A float array of more than one element, all equal (a zero bias, a unit scale)."""
    return value is not None and value.size > 1 and np.issubdtype(value.dtype, np.floating) \
        and bool((value == value.reshape(-1)[0]).all())


def _fill(node, shape) -> np.ndarray:
    value = _attr(node, "value", None)
    fill = numpy_helper.to_array(value).reshape(-1)[0] if value is not None else np.float32(0)
    return np.full([int(d) for d in shape], fill, dtype=np.asarray(fill).dtype)


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _sv_shape(g: GraphIndex, node, depth):
    rank = g.rank(node.input[0])
    if rank is None:
        return None
    start, end = _attr(node, "start", 0), _attr(node, "end", rank)
    axes = range(rank)[slice(start, end)]
    return [DimRef(node.input[0], a) for a in axes]


def _sv_gather(g: GraphIndex, node, depth):
    data, idx = g.shape_value(node.input[0], depth), g.value(node.input[1])
    if data is None or idx is None or _attr(node, "axis", 0) != 0:
        return None
    picked = [data[int(i)] for i in np.asarray(idx).reshape(-1)]
    return picked


def _sv_concat(g: GraphIndex, node, depth):
    """Entries of each part; a part that cannot be followed but has a static length gives
    unknown (None) entries, so the others are still followed (wav2vec2's sequence length,
    computed by the feature extractor's arithmetic, beside the head sizes)."""
    parts = []
    for i in node.input:
        p = g.shape_value(i, depth)
        if p is None:
            n = _static_length(g, i)
            if n is None:
                return None
            p = [None] * n
        parts.append(p)
    return [e for p in parts for e in p]


def _sv_passthrough(g: GraphIndex, node, depth):
    return g.shape_value(node.input[0], depth)


def _sv_slice(g: GraphIndex, node, depth):
    data = g.shape_value(node.input[0], depth)
    if data is None:
        return None
    if len(node.input) > 1:
        starts, ends = g.value(node.input[1]), g.value(node.input[2])
        steps = g.value(node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
        if starts is None or ends is None or steps is None:
            return None
        s, e, st = int(np.ravel(starts)[0]), int(np.ravel(ends)[0]), int(np.ravel(steps)[0])
    else:
        s, e, st = _attr(node, "starts")[0], _attr(node, "ends")[0], 1
    return data[slice(s, e, st)]


def _sv_fill(g: GraphIndex, node, depth):
    shape = g.value(node.input[0])
    value = _attr(node, "value", None)
    if shape is None or shape.size != 1:
        return None
    fill = int(numpy_helper.to_array(value).reshape(-1)[0]) if value is not None else 0
    return [fill] * int(shape.reshape(-1)[0])


def _broadcast_inputs(g: GraphIndex, node, depth, count: int):
    """The first `count` inputs as entry lists of one length (length-1 lists repeated), or None."""
    vals = [g.shape_value(i, depth) for i in node.input[:count]]
    if any(v is None for v in vals):
        return None
    n = max(len(v) for v in vals)
    vals = [v * n if len(v) == 1 else v for v in vals]
    return vals if all(len(v) == n for v in vals) else None


def _entrywise(fn):
    """A shape-op handler applying `fn(x, y)` to the broadcast entries of its two inputs."""
    def handler(g: GraphIndex, node, depth):
        vals = _broadcast_inputs(g, node, depth, 2)
        return None if vals is None else [fn(x, y) for x, y in zip(*vals)]
    return handler


def _mul_entry(x, y):
    if isinstance(x, int) and isinstance(y, int):
        return x * y
    if isinstance(x, DimRef) and isinstance(y, int):
        return DimProd(x, y)
    if isinstance(y, DimRef) and isinstance(x, int):
        return DimProd(y, x)
    return None


def _equal_entry(x, y):
    """==, decided where it can be: a run-time size is never negative."""
    if isinstance(x, int) and isinstance(y, int):
        return int(x == y)
    if isinstance(y, int) and y < 0 and isinstance(x, (DimRef, DimProd)):
        return 0
    return None


def _sv_where(g: GraphIndex, node, depth):
    """TorchScript's Expand: Where(Equal(shape, -1), ones, shape)."""
    vals = _broadcast_inputs(g, node, depth, 3)
    if vals is None or any(c is None for c in vals[0]):
        return None
    cond, a, b = vals
    return [x if c else y for c, x, y in zip(cond, a, b)]


_SHAPE_OPS = {
    "Equal": _entrywise(_equal_entry),
    "Where": _sv_where,
    "ConstantOfShape": _sv_fill,
    "Mul": _entrywise(_mul_entry),
    "Shape": _sv_shape,
    "Gather": _sv_gather,
    "Concat": _sv_concat,
    "Unsqueeze": _sv_passthrough,
    "Squeeze": _sv_passthrough,
    "Cast": _sv_passthrough,
    "Identity": _sv_passthrough,
    "Reshape": lambda g, node, depth: _sv_passthrough(g, node, depth) if g.rank(node.output[0]) == 1 else None,
    "Slice": _sv_slice,
}

attr = _attr
