"""Depth: the erasable units of a graph (OTOv3's erasing operators, the depth pruning of
ShortGPT and Minitron), found from the graph alone.

    y = Add(x, f(x))  ─erase─▶  y = x        f: every node that only feeds the Add's other input

A unit is a residual Add whose two inputs have the shape of its output, one of them the skip
`x` (no node exists only to compute it) and the other the branch `f(x)`: the nodes, back from
that input, whose outputs nothing outside the branch reads (its "cone"; per-layer mask or
position arithmetic that only this branch uses comes along). The branch must read `x` and hold
a contraction with weights (Conv/Gemm/MatMul): a CNN's bottleneck or basic block, a
transformer's attention or MLP sub-block, a whole layer being two consecutive units. Removing
the branch leaves a valid graph: `y` is `x`, nothing else read the branch's tensors.

Exactness: a unit is `exact` when erasing it equals the original model with its last
contraction zeroed (the output projection, with its bias and the parameters of the
zero-preserving ops between it and the Add: `zero`, as the branch's nodes read them: a tensor
the exporter shared with other nodes, e.g. paddle2onnx's deduplicated BatchNorm offsets, is
zeroed for the branch alone). Ops on that path that do not map zero to zero (a Sigmoid, a
parameter-free normalization) make it not exact, with the reason; it stays erasable. DESIGN.md's erasure oracle checks the claim on every model we have.

Outside every residual branch, a layer that keeps its input's shape (a contraction and the
bias/BatchNorm/activation ops that alone read it) is a "chain" unit: bypassed (its output
becomes its input), never exact.

ONNX Runtime's fused residual norms (SkipSimplifiedLayerNormalization, SkipLayerNormalization:
GenAI exports) are residuals too: their `input` and `skip` are the two sides.

A decoder's attention writes its layer's KV cache (present.N.key/value, read from
past_key_values.N): that pair goes with the unit (`cache`), and the erase pass numbers the
remaining pairs 0..L-2 again, as runtimes expect them (--freeze-io: no such unit).
Candidates that are not units say why: a projection shortcut (neither input is a plain skip),
or a branch that writes another graph output. An Add whose branch holds no weights (a mask's
arithmetic) is no candidate.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from spa.core import kvcache
from spa.core.graph import DEFAULT_DOMAINS
from spa.core.tensors import reads, subgraphs

CONTRACTIONS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulNBits"}
# ops a chain (a layer outside any residual branch) may end with after its contraction: they read
# only constants besides it (a bias, a BatchNorm, an activation)
CHAIN_TAIL = {"BatchNormalization", "Relu", "LeakyRelu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh",
              "Gelu", "Elu", "Selu", "PRelu", "Add", "Sub", "Mul", "Div", "Identity", "Dropout"}
CHAIN_REASON = "a chain is bypassed: its output becomes its input (no zeroing equals that)"
# ONNX Runtime's fused residual + norm (GenAI and onnxruntime.transformers exports): output 3 is
# input + skip, output 0 its normalization; erasing the branch leaves the plain norm of the skip
RESIDUAL_NORMS = {"SkipSimplifiedLayerNormalization": "SimplifiedLayerNormalization",
                  "SkipLayerNormalization": "LayerNormalization"}
# ops that map zero to zero on their data input, the first (the others are shapes, indices or,
# for Mul, any factor)
ZERO_KEEPING = {"Reshape", "Transpose", "Identity", "Dropout", "Cast", "Squeeze", "Unsqueeze", "Flatten", "Relu",
                "LeakyRelu", "Gelu", "Tanh", "Erf", "Neg", "Mul", "Div", "MaxPool", "AveragePool", "Resize",
                "Upsample", "Slice", "Gather", "Split", "Expand"}
# ops whose constant parameters map zero to zero once they are zero: (op, the inputs to zero)
ZEROED_PARAMS = {"Add": (0, 1), "Sub": (0, 1), "BatchNormalization": (1, 2), "LayerNormalization": (1, 2),
                 "InstanceNormalization": (1, 2)}


@dataclass
class Unit:
    """One erasable residual branch: `id` is the Add's output tensor (stable across runs and
    across channel pruning, which keeps names)."""

    id: str
    skip: str  # x
    branch: str  # f(x), the Add's other input
    kind: str  # "attention" | "mlp" | "conv" | "block"
    nodes: list[str] = field(default_factory=list)  # names (or first outputs) of the branch's nodes
    initializers: list[str] = field(default_factory=list)  # the weights erased with it
    params: int = 0
    contraction: str | None = None  # the last contraction's node
    zero: list[str] = field(default_factory=list)  # what to zero (as the branch reads it) for the oracle
    exact: bool = True
    reason: str | None = None  # why it is not exact
    cache: list[str] = field(default_factory=list)  # the KV-cache inputs/outputs erased with it (a decoder's layer)

    def to_json(self) -> dict:
        return {"id": self.id, "kind": self.kind, "skip": self.skip, "branch": self.branch, "params": self.params,
                "exact": self.exact, "reason": self.reason, "contraction": self.contraction, "zero": self.zero,
                "nodes": self.nodes, "initializers": self.initializers, "cache": self.cache}


class _Graph:
    """Producers, consumers (graph outputs and subgraph captures count as outside readers) and
    constants of one graph, by node index."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph, self.nodes = graph, list(graph.node)
        self.producer, self.consumers = {}, {}
        producer, consumers = self.producer, self.consumers
        self.ins = [tuple(n.input) for n in self.nodes]  # read many times by cone(): plain tuples
        self.outs = [tuple(n.output) for n in self.nodes]
        for i, node in enumerate(self.nodes):
            for o in self.outs[i]:
                producer[o] = i
            for name in self.ins[i]:
                if name in consumers:
                    consumers[name].append(i)
                else:
                    consumers[name] = [i]
            for sub in subgraphs(node):  # outer names a subgraph reads: read from outside any cone
                for n in reads(sub):
                    consumers.setdefault(n, []).append(-2)
        producer.pop("", None)
        consumers.pop("", None)
        self.outputs = {o.name for o in graph.output}
        self.inputs = {i.name for i in graph.input}
        self.in_cones: set[int] = set()  # nodes of every residual branch looked at (chains stay out of them)
        for o in self.outputs:
            self.consumers.setdefault(o, []).append(-1)
        self.initializers = {t.name: t for t in graph.initializer}
        self.constants = set(self.initializers) | {n.output[0] for n in self.nodes if n.op_type == "Constant"}
        self.alias = {}  # Identity of a constant (TorchScript's shared equal-valued parameters) -> the constant
        for n in self.nodes:
            if n.op_type == "Identity" and n.input[0] in self.constants:
                self.alias[n.output[0]] = self.alias.get(n.input[0], n.input[0])
                self.constants.add(n.output[0])

    def zero_needed(self, name: str) -> str | None:
        """The initializer to zero for constant `name` (through Identity), None if already zero."""
        name = self.alias.get(name, name)
        t = self.initializers.get(name)
        if t is not None and t.data_location != onnx.TensorProto.EXTERNAL and not np.any(numpy_helper.to_array(t)):
            return None
        return name

    def cone(self, add: int, slot: int) -> list[int]:
        """Node indices that exist only to compute input `slot` of node `add` (descending); a
        graph output among their outputs does not stop them (the caller refuses such a cone)."""
        read = self.ins[add][slot]
        start = self.producer.get(read)
        if start is None:
            return []
        inside, heap, seen, consumers = set(), [-start], {start}, self.consumers
        while heap:
            i = -heapq.heappop(heap)  # highest index first: every consumer is decided before it
            if not all(c in inside or c == -1 or (c == add and o == read)
                       for o in self.outs[i] if o for c in consumers.get(o, ())):
                continue
            inside.add(i)
            for name in self.ins[i]:
                j = self.producer.get(name)
                if j is not None and j not in seen:
                    seen.add(j)
                    heapq.heappush(heap, -j)
        self.in_cones |= inside
        return sorted(inside, reverse=True)

    def label(self, i: int) -> str:
        node = self.nodes[i]
        return node.name or node.output[0]


def find(model, *, freeze_io: bool = False) -> tuple[list[Unit], list[dict]]:
    """(units, rejected candidates [{id, reason}]) of a spa Model (its shapes tell equal-shaped
    Adds). Units come in graph order. `freeze_io`: a decoder's attention, whose KV cache pair
    would go with it, is no unit (spa prune --freeze-io)."""
    g = _Graph(model.graph)
    units, rejected = [], []
    for i, node in enumerate(g.nodes):
        if not residual(node):
            continue
        a, b = node.input[:2]
        shape = model.shapes.get(a)
        if a in g.constants or b in g.constants or a == b or shape is None or model.shapes.get(b) != shape or \
                (node.op_type == "Add" and model.shapes.get(node.output[0]) != shape):
            continue  # a bias, a broadcast or an unknown shape: no residual
        found = _unit(g, i, freeze_io)
        if isinstance(found, Unit):
            units.append(found)
        elif found is not None:
            rejected.append({"id": node.output[0], "reason": found})
    units += _chains(g, model.shapes)
    units.sort(key=lambda u: g.producer[u.id])
    return units, rejected


def _chains(g: _Graph, shapes: dict) -> list[Unit]:
    """Layers outside every residual branch whose output has their input's shape (a plain
    network's Conv-BN-ReLU of as many channels in as out, a depthwise conv, a pooler's dense):
    OTOv3's erasable operators, bypassed rather than zeroed, so never exact."""
    found = []
    for i, node in enumerate(g.nodes):
        if node.op_type not in CONTRACTIONS or i in g.in_cones:
            continue
        chain = _chain(g, i)
        if chain is None or any(j in g.in_cones for j in chain[2]):
            continue
        a, b, nodes = chain
        if shapes.get(a) is None or len(shapes[a]) < 2 or shapes.get(a) != shapes.get(b) or b in g.outputs:
            continue
        if None in shapes[a] and any(v != 1 for a_ in node.attribute if a_.name == "strides" for v in a_.ints):
            continue  # a strided conv of a dynamic axis: its output is shorter at run time
        weights = sorted({n for j in nodes for n in g.nodes[j].input if n in g.initializers})
        found.append(Unit(b, a, b, "chain", [g.label(j) for j in nodes], weights,
                          int(sum(np.prod(g.initializers[w].dims, dtype=np.int64) for w in weights)),
                          g.label(i), [], False, CHAIN_REASON))
    return found


def _chain(g: _Graph, c: int) -> tuple[str, str, list[int]] | None:
    """(input, output, node indices) of the layer contraction `c` starts: `c` and the ops after it
    that alone read its output and read only constants besides (CHAIN_TAIL)."""
    node = g.nodes[c]
    if len(node.input) < 2 or node.input[1] not in g.constants or node.input[0] in g.constants:
        return None
    nodes, out = [c], node.output[0]
    while True:
        readers = g.consumers.get(out, [])
        nxt = g.nodes[readers[0]] if len(readers) == 1 and readers[0] >= 0 else None
        if nxt is None or nxt.op_type not in CHAIN_TAIL or len(nxt.output) != 1 or \
                any(n and n != out and n not in g.constants for n in nxt.input):
            return node.input[0], out, nodes
        nodes.append(readers[0])
        out = nxt.output[0]


def residual(node: onnx.NodeProto) -> bool:
    """An Add of two tensors, or a fused residual norm (RESIDUAL_NORMS, com.microsoft)."""
    if node.op_type == "Add":
        return node.domain in DEFAULT_DOMAINS and len(node.input) == 2
    return node.op_type in RESIDUAL_NORMS and node.domain == "com.microsoft" and len(node.input) >= 3


def _unit(g: _Graph, add: int, freeze_io: bool = False) -> Unit | str | None:
    """The unit of residual Add `add`, else why not (None: not a residual at all)."""
    cones = [g.cone(add, 0), g.cone(add, 1)]
    if all(cones):
        weighted = [any(g.nodes[i].op_type in CONTRACTIONS for i in c) for c in cones]
        return "neither input is a plain skip connection (a projection shortcut?)" if all(weighted) else None
    if not any(cones):
        return None
    slot = 0 if cones[0] else 1
    cone, skip, branch = cones[slot], g.nodes[add].input[1 - slot], g.nodes[add].input[slot]
    written = [o for i in cone for o in g.nodes[i].output if o in g.outputs]
    cache = _cache(g, cone, written)
    if written and not isinstance(cache, list):
        return cache
    if cache and freeze_io:
        return "its branch writes the KV cache, which --freeze-io keeps"
    near = {skip} | set(g.nodes[g.producer[skip]].output if skip in g.producer else ())  # x, or a norm beside it
    if not any(near & set(g.nodes[i].input) for i in cone):
        return None  # a sum of two paths (embeddings plus positions), not y = x + f(x)
    weights = sorted({n for i in cone for n in g.nodes[i].input if n in g.initializers}
                     | {g.nodes[i].output[0] for i in cone if g.nodes[i].op_type == "Constant"})
    if not any(g.nodes[i].op_type in CONTRACTIONS and any(n in weights for n in g.nodes[i].input) for i in cone):
        return None  # no weights: an attention mask's or an activation's arithmetic, not a block
    unit = Unit(g.nodes[add].output[0], skip, branch, _kind(g, cone), [g.label(i) for i in reversed(cone)],
                [w for w in weights if w in g.initializers],
                int(sum(np.prod(g.initializers[w].dims, dtype=np.int64) for w in weights if w in g.initializers)))
    _exactness(g, unit, set(cone))
    unit.cache = cache
    return unit


def _cache(g: _Graph, cone: list[int], written: list[str]) -> list[str] | str:
    """The cache inputs and outputs a branch owns: one decoder layer's whole pair (its
    present.N.key/value outputs, and the past_key_values.N inputs only it reads), or why not."""
    if not written:
        return []
    slots = {kvcache.slot(o, "present") for o in written}
    if None in slots:
        return "its branch writes a graph output"
    layers = {n for n, _ in slots}
    if len(layers) != 1 or {k for _, k in slots} != {"key", "value"}:
        return "its branch writes part of the KV cache"
    layer, inside = layers.pop(), set(cone)
    pasts = sorted(n for n in g.inputs if (kvcache.slot(n, "past") or (None,))[0] == layer)
    for name in pasts:  # read elsewhere only for its length (a mask's arithmetic): another layer's will do
        if any(c not in inside and (c < 0 or g.nodes[c].op_type != "Shape") for c in g.consumers.get(name, ())):
            return f"its layer's cache input '{name}' is read outside the branch"
    return pasts + sorted(written)


def _kind(g: _Graph, cone: list[int]) -> str:
    ops = {g.nodes[i].op_type for i in cone}
    if ops & {"Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention"}:
        return "attention"
    if ops & {"Conv", "ConvTranspose"}:
        return "conv"
    return "mlp" if ops & {"MatMul", "Gemm", "MatMulNBits"} else "block"


def _exactness(g: _Graph, unit: Unit, cone: set) -> None:
    """Walk back from the branch output to the contractions it ends in, collecting what zeroing
    them means (unit.zero); a step that does not keep zero makes the unit not exact."""
    reason = _zero_path(g, unit, unit.branch, cone)
    if reason:
        unit.exact, unit.reason, unit.zero = False, reason, []
    else:
        unit.zero = sorted(set(unit.zero))


def _zero_path(g: _Graph, unit: Unit, name: str, cone: set) -> str | None:
    """Why zeroing the contractions behind `name` would not make it zero (None: it would)."""
    i = g.producer.get(name)
    node = g.nodes[i]
    inside = [k for k, n in enumerate(node.input) if n and n not in g.constants and g.producer.get(n) in cone]
    if node.op_type in CONTRACTIONS:
        if node.op_type == "MatMulNBits":
            return f"its contraction {g.label(i)} holds quantized weights"
        if len(node.input) < 2 or node.input[1] not in g.constants:
            return f"its contraction {g.label(i)} has no constant weight"
        unit.contraction = unit.contraction or g.label(i)
        unit.zero += [z for z in (g.zero_needed(n) for n in node.input[1:] if n in g.constants) if z]
        return None
    if node.op_type in ("Add", "Sub") or node.op_type in ZEROED_PARAMS:
        data = inside if node.op_type in ("Add", "Sub") else [0]
        others = [k for k in range(len(node.input)) if k not in data and node.input[k]]
        if not data or any(node.input[k] not in g.constants for k in others) or any(k not in inside for k in data):
            return f"{node.op_type} {g.label(i)} mixes the branch with other tensors"
        zero = others if node.op_type in ("Add", "Sub") else ZEROED_PARAMS[node.op_type]
        unit.zero += [z for z in (g.zero_needed(node.input[k]) for k in zero if k < len(node.input)
                                  and node.input[k] in g.constants) if z]
        return next(filter(None, (_zero_path(g, unit, node.input[k], cone) for k in data)), None)
    allowed = inside if node.op_type == "Mul" else [0] if 0 in inside else []  # 0 * anything = 0
    if node.op_type not in ZERO_KEEPING or not allowed:
        return f"{node.op_type} {g.label(i)} after the last contraction does not keep zero"
    reasons = []
    for k in allowed:  # a product is zero when one factor is: the first factor that can be
        kept = (len(unit.zero), unit.contraction)
        reasons.append(_zero_path(g, unit, node.input[k], cone))
        if reasons[-1] is None:
            return None
        del unit.zero[kept[0]:]
        unit.contraction = kept[1]
    return reasons[0]


def locate(graph: onnx.GraphProto, uid: str) -> tuple[int, int | None, Unit]:
    """(index of unit `uid`'s Add, the branch's input slot, the unit) in `graph` (a
    channel-pruned copy of the analysed graph too: pruning keeps every name); for a chain, the
    index of its last node and None."""
    g = _Graph(graph)
    add = g.producer.get(uid)
    if add is None:
        raise KeyError(uid)
    found = _unit(g, add) if residual(g.nodes[add]) else None
    if not isinstance(found, Unit):
        return _locate_chain(g, uid)  # a layer ending in a bias Add is a chain, not a residual
    return add, list(g.nodes[add].input).index(found.branch), found


def _locate_chain(g: _Graph, uid: str) -> tuple[int, None, Unit]:
    """The chain whose output is `uid`: back from it over CHAIN_TAIL ops to its contraction."""
    i = g.producer[uid]
    while g.nodes[i].op_type not in CONTRACTIONS:
        data = [n for n in g.nodes[i].input if n and n not in g.constants]
        if g.nodes[i].op_type not in CHAIN_TAIL or len(data) != 1 or data[0] not in g.producer:
            raise KeyError(uid)
        i = g.producer[data[0]]
    chain = _chain(g, i)
    if chain is None or chain[1] != uid:
        raise KeyError(uid)
    return g.producer[uid], None, Unit(uid, chain[0], uid, "chain", exact=False, reason=CHAIN_REASON)
