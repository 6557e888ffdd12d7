"""Channel dependency analysis: coupled channels become groups.

    Model ─rules─▶ couplings between channel positions ─components─▶ channels ─signature─▶ groups

Every static axis of every tensor is a channel space; each position along it is a node
(size-1 axes too: broadcasting rules skip them, but a channel coupled to one must stay).
Rules (spa.rules) couple positions of different spaces; connected components are the
channels that must be removed together. Channels that touch exactly the same
spaces form one group (a Conv's output channels, with the BatchNorm after it and the
weight columns of every consumer). A group needs at least one constant member (a
parameter slice to remove) and one activation space.

Pins (model inputs/outputs, barriers, shape-fixed axes) lock every channel they touch,
with the reason (and, via a shortest path over the spaces, the route to it).
Reshape/Flatten pick which factor of a merged axis carries the channels in a second
pass, preferring factors that are not locked otherwise.
"""

from __future__ import annotations

import collections
import fnmatch
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from spa.core import kvcache
from spa.core.cost import dropped_positions  # noqa: F401 - re-exported
from spa.core.errors import SpaError
from spa.core.graph import DEFAULT_DOMAINS, GraphIndex, attr, literal_sources, uniform
from spa.core.model import COPY, Model
from spa.core.rules import RULES, VIRTUAL, Result, identity
from spa.core.rules import key as rule_key
from spa.core.rules.elementwise import broadcast, unary
from spa.core.rules.shape import SHAPE_SINKS, _digits, concat, gather, squeeze
from spa.core.shapefold import OPS as SHAPE_OPS
from spa.core.sizes import FLOAT_TYPES
from spa.core.tensors import subgraphs
from spa.core.unionfind import components, distinct


@dataclass
class Member:
    """One parameter slice set of a group: `positions[i]` = positions of channel i on `axis`
    (a 2-D array when every channel has as many positions, else a list of arrays)."""

    tensor: str
    axis: int
    positions: object = field(repr=False)
    # what the slices do, from the rules: "in" (a weight consuming the channels in a contraction;
    # `reads` = the activation space it reads), "scale" (a norm's per-channel gamma), or None
    role: str | None = None
    reads: tuple | None = None

    @property
    def indices(self) -> list:
        """JSON form: entry i is an int (one position) or a list of ints."""
        return [int(p[0]) if len(p) == 1 else [int(v) for v in p] for p in self.positions]

    def to_json(self) -> dict:
        doc = {"tensor": self.tensor, "axis": self.axis, "indices": self.indices}
        if self.role:
            doc["role"] = self.role
        return doc


@dataclass
class Group:
    id: str
    size: int
    prunable: bool
    reason: str | None
    zero_invariant: bool
    zi_reason: str | None
    members: list[Member]
    positions: dict = field(repr=False, default_factory=dict)  # space -> per-channel positions (as Member)
    locked: list[int] = field(default_factory=list)  # channels that must stay
    # not zero-invariant only through normalization statistics: the hidden size of a
    # transformer (LayerNorm/RMSNorm), pruned only on request (--prune-hidden)
    hidden: bool = False
    multiple: int = 1  # the channels kept must be a multiple of this (an op's size constraint)

    def to_json(self) -> dict:
        return {
            "id": self.id, "size": self.size, "prunable": self.prunable, "reason": self.reason,
            "zero_invariant": self.zero_invariant, "zi_reason": self.zi_reason, "hidden": self.hidden,
            "locked": self.locked, **({"multiple": self.multiple} if self.multiple > 1 else {}),
            "members": [m.to_json() for m in self.members],
        }


@dataclass
class Analysis:
    model: Model
    index: GraphIndex
    groups: list[Group]
    sizes: dict  # space -> size
    barriers: list[str]
    options: dict = field(default_factory=dict)  # analyze()'s own: exclude, freeze_io

    def __reduce__(self):
        """Pickled as its model and options, analysed again when unpickled (a sweep's worker,
        spa.core.executor): the index and groups would carry every weight three times."""
        return _reanalyzed, (self.model, self.options, [g.id for g in self.groups])

    def to_json(self) -> dict:
        """The groups and barriers (spa.analyze's result adds params, MACs, coverage and blocks)."""
        return {"groups": [g.to_json() for g in self.groups], "barriers": self.barriers}

    def group(self, gid: str) -> Group:
        """The group with id `gid` (KeyError if none)."""
        if getattr(self, "_by_id", None) is None or len(self._by_id) != len(self.groups):
            self._by_id = {g.id: g for g in self.groups}
        return self._by_id[gid]


MAX_AXIS = 2**24  # positions: no real channel axis is longer; longer ones read as unknown


class Ctx:
    """What a rule may ask about the graph."""

    def __init__(self, index: GraphIndex):
        self.g = index
        self.opset = index.opset
        self.graph_outputs = set(index.graph_outputs)
        self._shapes = {}  # name -> shape as rules see it (asked ~3 times per node)

    def shape(self, name):
        """The tensor's shape; an axis longer than MAX_AXIS reads as unknown (None)."""
        s = self._shapes.get(name)
        if s is None:
            s = self.g.shape(name)
            if s is not None:
                s = self._shapes[name] = tuple(None if d is not None and d > MAX_AXIS else d for d in s)
        return s

    def label(self, node):
        return self.g.label(node)

    def rank(self, name):
        return self.g.rank(name) if name else None

    def size(self, space):
        s = self.shape(space[0])
        return None if s is None or not 0 <= space[1] < len(s) else s[space[1]]

    def attr(self, node, name, default=None):
        return attr(node, name, default)

    def value(self, name):
        return self.g.value(name)

    def shape_value(self, name):
        return self.g.shape_value(name)

    def literal_sources(self, name):
        return literal_sources(self.g, name)

    def is_alias(self, name):
        return name in self.g.aliases

    def consumers(self, name):
        return self.g.consumers.get(name, [])



class _Spaces:
    """Global position numbering for every static space (size-1 axes too: a channel coupled
    to one, e.g. a one-channel Slice or Split output, must stay; broadcasting rules skip them).
    An axis longer than MAX_AXIS (a dim of 2**40 in a broken export) is left unnumbered, as an
    axis of unknown size is: what it couples with stays as it is."""

    def __init__(self, shapes: dict):
        self.offset, self.sizes, self.names, self.sid = {}, {}, [], {}
        total = 0
        for tensor, shape in shapes.items():
            for axis, size in enumerate(shape):
                if size is not None and 0 < size <= MAX_AXIS:
                    self.offset[(tensor, axis)] = total
                    self.sizes[(tensor, axis)] = size
                    self.sid[(tensor, axis)] = len(self.names)
                    self.names.append((tensor, axis))
                    total += size
        self.total = total
        self.offsets = np.array([self.offset[name] for name in self.names], dtype=np.int64)  # by space id
        self.axes: dict[str, list[int]] = {}
        for tensor, axis in self.names:
            self.axes.setdefault(tensor, []).append(axis)
        self.space_of = np.repeat(np.arange(len(self.names), dtype=np.int64),
                                  [self.sizes[space] for space in self.names])

    def ids(self, space, positions=None):
        o = self.offset[space]
        if positions is None:
            return np.arange(o, o + self.sizes[space])
        return o + np.asarray(positions, dtype=np.int64)


def _node_rule(node):
    return RULES.get(rule_key(node))


def _subgraph_captures(graph: onnx.GraphProto) -> set[str]:
    """Outer-scope names read inside If/Loop/Scan bodies (they must keep their shapes)."""
    names = set()
    for node in graph.node:
        for sub in subgraphs(node):
            local = {o for n in sub.node for o in n.output} | {i.name for i in sub.input}
            local |= {t.name for t in sub.initializer}
            names |= {i for n in sub.node for i in n.input if i and i not in local}
            names |= _subgraph_captures(sub) - local
    return names


class _Builder:
    """Collects couplings and pins as global position arrays."""

    def __init__(self, spaces: _Spaces, label):
        self.sp = spaces
        self.label = label
        self.edges_a, self.edges_b = [], []
        self.pin_ids, self.pin_reason = [], []
        self.reasons: list[str] = []
        self.pin_spaces: list = []  # the space each reason was pinned on
        self.nonzi: dict[int, str] = {}
        self.edges: list = []  # (space, space, op) for explaining locks; graphed on demand
        self.ties: list = []  # (merged space, [factor spaces], [sizes])
        self.reads: list = []  # (weight space, activation space) from the rules
        self.scales: list = []
        self.multiples: dict = {}  # space -> the multiple of positions it must keep
        self._graph = None

    def pin(self, space, reason, positions=None):
        if space not in self.sp.offset:
            return
        ids = self.sp.ids(space, positions)
        self.reasons.append(reason)
        self.pin_spaces.append(space)
        self.pin_ids.append(ids)
        self.pin_reason.append(np.full(len(ids), len(self.reasons) - 1))

    def pin_global(self, ids, reason):
        """Pin positions given by global id (found after the rules ran)."""
        ids = distinct(ids)
        if len(ids):
            self.reasons.append(reason)
            self.pin_spaces.append(self.sp.names[self.sp.space_of[ids[0]]])
            self.pin_ids.append(ids)
            self.pin_reason.append(np.full(len(ids), len(self.reasons) - 1))

    def couple(self, a, b, pairs, *, node_name):
        known_a, known_b = a in self.sp.offset, b in self.sp.offset
        if not (known_a and known_b):
            for s, known in ((a, known_a), (b, known_b)):
                if known:  # coupled with an axis of unknown size: keep the known side as it is
                    self.pin(s, f"coupled by {node_name} with an axis of unknown size")
            return
        if len(pairs) == 0:
            return
        top = pairs.max(axis=0)
        if top[0] >= self.sp.sizes[a] or top[1] >= self.sp.sizes[b]:
            self.pin(a, f"inconsistent shapes around {node_name}")
            self.pin(b, f"inconsistent shapes around {node_name}")
            return
        self.edges_a.append(self.sp.ids(a, pairs[:, 0]))
        self.edges_b.append(self.sp.ids(b, pairs[:, 1]))
        self.edges.append((a, b, node_name))

    def tie(self, whole, parts, dims, *, node_name):
        spaces = [whole] + list(parts)
        if not all(s in self.sp.offset for s in spaces) or \
                self.sp.sizes[whole] != int(np.prod(dims)) or \
                any(self.sp.sizes[p] != d for p, d in zip(parts, dims)):
            for s in spaces:
                self.pin(s, f"reshaped by {node_name} with an axis of unknown size")
            return
        self.ties.append((whole, list(parts), list(dims)))
        self.edges.extend((whole, p, node_name) for p in parts)

    def add_result(self, res: Result, node, barrier_reason: str | None):
        mentioned = set(res.free)
        node_name = f"{node.op_type} {self.label(node)}" if res.couplings or res.ties else ""
        for a, b, pairs in res.couplings:
            self.couple(a, b, pairs, node_name=node_name)
            mentioned.update((a, b))
        for whole, parts, dims in res.ties:
            self.tie(whole, parts, dims, node_name=node_name)
            mentioned.update([whole, *parts])
        for space, positions, why in res.pins:
            self.pin(space, why, positions)
            mentioned.add(space)
        self.reads.extend(res.reads)
        self.scales.extend(res.scales)
        for space, m in res.multiples:
            self.multiples[space] = math.lcm(self.multiples.get(space, 1), m)
        for space, why, stats in res.nonzi:
            if space in self.sp.offset:
                old = self.nonzi.get(space)
                if old is None or (old[1] and not stats):  # a plain reason outranks statistics
                    self.nonzi[space] = (why, stats)
        for name in list(node.input) + list(node.output):
            for axis in self.sp_shape(name):
                if (name, axis) not in mentioned:
                    why = barrier_reason or (
                        f"axis {axis} of '{name}' is used by {node.op_type} {self.label(node)} "
                        "in a way no rule describes")
                    self.pin((name, axis), why)

    def sp_shape(self, name):
        """The axes of `name` that are channel spaces."""
        return self.sp.axes.get(name, ())


LOCAL_RULES = (unary, broadcast, squeeze, concat, gather)  # they record their own node's tensors only
INDEX_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL}


def _shape_arithmetic(index: GraphIndex) -> tuple[set, set]:
    """(tensors, node ids): the integer and boolean tensors an export computes from shapes and
    constants alone (Shape -> Gather -> Unsqueeze -> Concat -> Reshape's target: 8.7k of the
    15.8k nodes of a 64-layer LLM export), and the nodes among them whose rule is local.

    Skipping those nodes' rules changes no group: a group needs a float parameter, so channels
    of such tensors alone never make one, and a local rule couples and pins nothing but its own
    tensors. That holds while no other node couples one of these tensors with any other tensor;
    `analyze` checks it on what the other rules recorded, and runs every rule where it fails."""
    dtypes = index.model.dtypes
    found = {n for n in list(index.initializers) + list(index.constant_nodes) if dtypes.get(n) in INDEX_TYPES}
    skip = set()
    for node in index.graph.node:
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in SHAPE_OPS or node.op_type == "Constant":
            continue
        outs = [o for o in node.output if o]
        if not outs or any(dtypes.get(o) not in INDEX_TYPES for o in outs):
            continue
        if node.op_type in ("Shape", "Size"):
            found.update(outs)
        elif all(not i or i in found for i in node.input):
            found.update(outs)
            if RULES.get(rule_key(node)) in LOCAL_RULES:
                skip.add(id(node))
    return found, skip


def _run_rules(index: GraphIndex, spaces: _Spaces, exclude: list[str], freeze_io: bool = False, *,
               skip: set = frozenset()) -> _Builder:
    b = _Builder(spaces, index.label)
    cache = kvcache.cache_names(index.graph, index.shapes)
    for kind, names in (("input", index.graph_inputs), ("output", index.graph_outputs)):
        for name in names:
            for axis in b.sp_shape(name):
                cached = name in cache and axis in kvcache.CACHE_AXES
                if cached and not freeze_io:
                    continue  # the cache's heads and head size are the model's own: they follow the pruning
                b.pin((name, axis), f"model {kind} '{name}'" + (" (a KV cache kept as it is: --freeze-io)" if cached
                                                                else ""))
    if cache and not freeze_io:
        _uniform_cache(index, b)
    for name in sorted(_subgraph_captures(index.graph)):
        for axis in b.sp_shape(name):
            b.pin((name, axis), f"'{name}' is read inside a subgraph (If/Loop/Scan)")
    ctx = Ctx(index)
    for node in index.graph.node:
        if not exclude and node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            continue  # a source, every axis free (rules.elementwise.constant): nothing to record
        if id(node) in skip:
            continue  # integer shape arithmetic (_shape_arithmetic)
        hit = _excluded(node, index, exclude)
        fn = _node_rule(node)
        if hit:
            reason = f"protected by the exclude pattern '{hit}'"
        elif fn is None:
            domain = f" from domain '{node.domain}'" if node.domain not in DEFAULT_DOMAINS else ""
            reason = f"{node.op_type} {index.label(node)}{domain} has no coupling rule (barrier)"
        else:
            reason = None
        res = Result(node)
        if fn is not None and not hit:
            fn(node, ctx, res)
        b.add_result(res, node, reason)
    return b


def _uniform_cache(index: GraphIndex, b: _Builder) -> None:
    """Every layer's key and value caches keep the same heads and head positions as the first layer's
    key cache: the runtime allocates one cache shape for all of them (genai_config.json and
    config.json hold one head count and one head size, optimum's empty cache is built from them)."""
    first = {}
    for past, _, _, _ in kvcache.pairs(index.graph, index.shapes):
        for axis in kvcache.CACHE_AXES:  # keys and values alike: configs hold one head size for both
            space = (past, axis)
            if space not in b.sp.offset:
                continue
            ref = first.setdefault(axis, space)
            if ref != space and b.sp.sizes[ref] == b.sp.sizes[space]:
                b.couple(ref, space, identity(b.sp.sizes[space]), node_name="the KV cache (one shape for every layer)")


def unmatched(model: Model, patterns) -> list[str]:
    """The exclude patterns that match no node name and no initializer/constant input name."""
    names = {n.name for n in model.graph.node} | {t.name for t in model.graph.initializer} | \
        {i for n in model.graph.node for i in n.input}
    return [pat for pat in patterns if not any(fnmatch.fnmatchcase(n, pat) for n in names if n)]


def _excluded(node, index, patterns):
    for pat in patterns:
        names = [node.name] + [i for i in node.input if index.is_const(i)]
        if any(fnmatch.fnmatchcase(n, pat) for n in names if n):
            return pat
    return None


BIG = np.iinfo(np.int64).max


def _concat(parts, dtype=np.int64):
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _pin_reason_per_label(b: _Builder, labels: np.ndarray) -> np.ndarray:
    """Index into b.reasons of the first pin that reaches each label (BIG: free)."""
    best = np.full(b.sp.total, BIG, dtype=np.int64)
    if b.pin_ids:
        ids, why = np.concatenate(b.pin_ids), np.concatenate(b.pin_reason)
        np.minimum.at(best, labels[ids], why)
    return best


def _expand(keys: np.ndarray, table_src: np.ndarray, table_dst: np.ndarray):
    """Join: for every i, one row (i, d) per table entry (k, d) with k == keys[i]."""
    order = np.argsort(table_src, kind="stable")
    src, dst = table_src[order], table_dst[order]
    lo, hi = np.searchsorted(src, keys, "left"), np.searchsorted(src, keys, "right")
    counts = hi - lo
    row = np.repeat(np.arange(len(keys)), counts)
    at = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
    return row, dst[at]


class _Ties:
    """Union-find over couplings, then products: a merged-axis position (a cell) belongs to a
    derived label, removed with any of its factor channels; channels are the root labels.

    Cells of one label must agree factor by factor (else their factors are merged, to a fixed
    point); a label reshaped two incompatible ways, or a factor of itself, is pinned."""

    def __init__(self, b: _Builder):
        sp = b.sp
        self.b = b
        cells: dict[tuple, list] = {}  # dims -> [(merged ids (n,), factor ids (n, k))]
        for whole, parts, dims in b.ties:
            fac = np.stack([sp.ids(p, _digits(dims, k)) for k, p in enumerate(parts)], 1)
            cells.setdefault(tuple(dims), []).append((sp.ids(whole), fac))
        self.cells = {d: (_concat([c[0] for c in v]), np.concatenate([c[1] for c in v]))
                      for d, v in cells.items()}
        edges_a, edges_b = list(b.edges_a), list(b.edges_b)
        for _ in range(32):
            labels = components(sp.total, _concat(edges_a), _concat(edges_b))
            new_a, new_b = self._disagreements(labels)
            if len(new_a) == 0:
                break
            edges_a.append(new_a)
            edges_b.append(new_b)
        self.labels = labels
        self._pin_conflicts(labels)
        self._resolve_roots(labels)

    def _disagreements(self, labels):
        out_a, out_b = [], []
        for flat, fac in self.cells.values():
            lab = labels[flat]
            _, first, inv = np.unique(lab, return_index=True, return_inverse=True)
            rep = fac[first][inv]
            differ = labels[rep] != labels[fac]
            out_a.append(rep[differ])
            out_b.append(fac[differ])
        return _concat(out_a), _concat(out_b)

    def _pin_conflicts(self, labels):
        seen = np.zeros(self.b.sp.total, dtype=np.int64)
        for flat, fac in self.cells.values():
            seen[distinct(labels[flat])] += 1
            cyclic = (labels[fac] == labels[flat][:, None]).any(1)
            if cyclic.any():
                self.b.pin_global(flat[cyclic], "a merged axis is its own factor (reshaped into itself)")
        for flat, fac in self.cells.values():
            clash = seen[labels[flat]] > 1
            if clash.any():
                self.b.pin_global(flat[clash], "reshaped into incompatible factorizations")
                self.b.pin_global(fac[clash].ravel(), "reshaped into incompatible factorizations")

    def _resolve_roots(self, labels):
        """(derived label, root label) pairs: a derived label goes when any of its roots goes."""
        src, dst = [], []
        for flat, fac in self.cells.values():
            lab, first = np.unique(labels[flat], return_index=True)
            src.append(np.repeat(lab, fac.shape[1]))
            dst.append(labels[fac[first]].ravel())
        src, dst = _concat(src), _concat(dst)
        derived = np.zeros(self.b.sp.total, dtype=bool)
        derived[src] = True
        table_src, table_dst = src, dst
        for _ in range(32):
            self_loop = src == dst
            if self_loop.any():
                self.b.pin_global(src[self_loop], "a merged axis is its own factor (reshaped into itself)")
                src, dst = src[~self_loop], dst[~self_loop]
            deep = derived[dst]
            if not deep.any():
                break
            row, nxt = _expand(dst[deep], table_src, table_dst)
            src = np.concatenate([src[~deep], src[deep][row]])
            dst = np.concatenate([dst[~deep], nxt])
            key = distinct(src * self.b.sp.total + dst)
            src, dst = key // self.b.sp.total, key % self.b.sp.total
        self.derived = derived
        self.root_src, self.root_dst = src, dst

    def pairs(self):
        """(channel label, position id, own?) for every position: own positions under their
        label, positions of derived labels under each of their roots."""
        labels = self.labels
        ids = np.arange(self.b.sp.total)
        own = ~self.derived[labels]
        der_ids = ids[~own]
        row, roots = _expand(labels[der_ids], self.root_src, self.root_dst)
        lab = np.concatenate([labels[own], roots])
        pos = np.concatenate([ids[own], der_ids[row]])
        is_own = np.concatenate([np.ones(own.sum(), dtype=bool), np.zeros(len(row), dtype=bool)])
        return lab, pos, is_own

    def reasons(self):
        """Pin reason per channel label: its own pins and those of every cell it derives."""
        why = _pin_reason_per_label(self.b, self.labels)
        np.minimum.at(why, self.root_dst, why[self.root_src])
        return why


def _readers(graph: onnx.GraphProto, names: set | None = None, sinks: dict | None = None) -> dict[str, list]:
    """{tensor: [(node, input slot), ...]} for every read of `names` (None: of every tensor), or
    with `sinks` ({op type: slots}, default domain) only those inputs, in graph order."""
    found: dict[str, list] = {}
    for node in graph.node:
        if sinks is not None:
            slots = sinks.get(node.op_type, ()) if node.domain in DEFAULT_DOMAINS else ()
            reads = [(slot, node.input[slot]) for slot in slots if slot < len(node.input)]
        else:
            reads = enumerate(node.input)
        for slot, name in reads:
            if names is None or name in names:
                found.setdefault(name, []).append((node, slot))
    return found


def untie_uniform(model: Model) -> int:
    """Give every use of a shared, uniform-valued float initializer its own copy (in place).

    Exporters share equal-valued initializers between unrelated layers (dynamo directly,
    TorchScript through Identity): the zero biases and unit norm scales of a freshly built
    model. Such a tensor is the same whatever is sliced out of it, so each use may be
    pruned on its own; non-uniform shared weights (ALBERT's layers, tied embeddings) stay
    shared and are pruned alike for all uses. The prune pass merges equal copies back."""
    graph = model.graph
    uses = _readers(graph, names={t.name for t in graph.initializer})
    made = 0
    outputs = {o.name for o in graph.output}
    for t in list(graph.initializer):
        sites = uses.get(t.name, [])
        if len(sites) < 2 or t.data_type not in FLOAT_TYPES or t.name in outputs or int(np.prod(t.dims)) < 2:
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        value = onnx.numpy_helper.to_array(t)
        if not uniform(value):
            continue
        for k, (node, slot) in enumerate(sites[1:], 1):
            name = f"{t.name}{COPY}{k}"
            graph.initializer.append(onnx.numpy_helper.from_array(value, name))
            node.input[slot] = name
            model.shapes[name] = model.shapes.get(t.name, tuple(value.shape))
            model.dtypes[name] = t.data_type
            made += 1
    return made


SINK_SLOTS = {op: tuple(slot for o, slot in SHAPE_SINKS if o == op) for op, _ in SHAPE_SINKS}


def untie_shapes(model: Model) -> int:
    """Give every shape sink (Reshape, Expand, ...) its own copy of a shared computed shape (in place).

    The dynamo exporter computes `Concat(batch, seq, 256)` once and reshapes every layer's
    MLP output with it; sinks of one shape tensor must agree, which would prune all those
    layers alike. One Concat per sink lets each layer keep its own width. The prune pass
    drops copies that still equal their original."""
    graph = model.graph
    sinks = _readers(graph, sinks=SINK_SLOTS)
    made = 0
    for at in range(len(graph.node) - 1, -1, -1):
        node = graph.node[at]
        sites = sinks.get(node.output[0] if node.output else "", [])
        if node.op_type != "Concat" or len(sites) < 2:
            continue
        for k, (sink, slot) in enumerate(sites[1:], 1):
            clone = onnx.NodeProto()
            clone.CopyFrom(node)
            clone.name, clone.output[0] = f"{node.name}{COPY}{k}", f"{node.output[0]}{COPY}{k}"
            graph.node.insert(at + 1, clone)
            sink.input[slot] = clone.output[0]
            for table in (model.shapes, model.dtypes):
                if node.output[0] in table:
                    table[clone.output[0]] = table[node.output[0]]
            made += 1
    return made


def analyze(model: Model, exclude: list[str] | None = None, freeze_io: bool = False) -> Analysis:
    """Group the coupled channels of `model` (shapes must be inferred, see spa.model.load).
    Shared uniform constants and shared computed shapes are first given one copy per use
    (see `untie_uniform`, `untie_shapes`). A decoder's KV-cache inputs and outputs follow the
    pruning of their heads and head size (spa.core.kvcache) unless `freeze_io`."""
    exclude = list(exclude or [])
    untie_uniform(model)
    untie_shapes(model)
    kvcache.bind_head_size(model.graph, model.shapes)
    index = GraphIndex(model)
    index.virtual = _virtual_shapes(index)
    spaces = _Spaces({**model.shapes, **index.virtual})
    indices, skip = _shape_arithmetic(index) if not exclude else (set(), set())
    b = _run_rules(index, spaces, exclude, freeze_io, skip=skip)
    if skip and any((u[0] in indices) != (v[0] in indices) for u, v, _ in b.edges):
        b = _run_rules(index, spaces, exclude, freeze_io)  # the skipped nodes might matter: none skipped
    groups = _groups(index, b, _Ties(b))
    barriers = [n.name or n.op_type for n in index.graph.node if _node_rule(n) is None]
    return Analysis(model, index, groups, dict(spaces.sizes), barriers, {"exclude": exclude, "freeze_io": freeze_io})


def _reanalyzed(model: Model, options: dict, ids: list[str]) -> Analysis:
    """An unpickled Analysis: the same model analysed again, checked to give the same groups."""
    analysis = analyze(model, **options)
    if [g.id for g in analysis.groups] != ids:
        raise SpaError("the model analysed again in a worker gives other channel groups than on the driver")
    return analysis


def _virtual_shapes(index: GraphIndex) -> dict:
    """The channel spaces rules declare beyond the graph's tensors (spa.core.rules.virtual)."""
    found, ctx = {}, Ctx(index)
    for node in index.graph.node:
        fn = VIRTUAL.get(rule_key(node))
        if fn is not None:
            found.update(fn(node, ctx) or {})
    return found


def _space_order(index: GraphIndex) -> dict[str, int]:
    order = {}
    for i, node in enumerate(index.graph.node):
        for name in list(node.input) + list(node.output):
            order.setdefault(name, i)
    return order


def _groups(index: GraphIndex, b: _Builder, ties: _Ties) -> list[Group]:
    sp = b.sp
    lab, ids, own = ties.pairs()
    spc = sp.space_of[ids]
    is_const = np.array([_is_member_tensor(index, t) for t, _ in sp.names], dtype=bool)
    has_const = np.zeros(sp.total, dtype=bool)
    has_act = np.zeros(sp.total, dtype=bool)
    has_const[lab[is_const[spc]]] = True
    has_act[lab[~is_const[spc]]] = True
    keep = (has_const & has_act)[lab]
    if not keep.any():
        return []
    lab, ids, own, spc = lab[keep], ids[keep], own[keep], spc[keep]
    # signature of a label = the set of spaces it touches, hashed (sum of random 64-bit keys)
    # (own and derived touches count apart: a channel's own spaces are where it is ordered)
    n_key = 2 * len(sp.names)
    pair_key = distinct(lab * n_key + 2 * spc + own)
    pair_lab, pair_spc = pair_key // n_key, pair_key % n_key
    salt = np.random.default_rng(12345).integers(1, 2**62, size=n_key, dtype=np.int64)
    sig = np.zeros(sp.total, dtype=np.int64)
    np.add.at(sig, pair_lab, salt[pair_spc])
    group_of = sig[lab]  # per position: its label's signature
    reason_of = ties.reasons()
    order_of = _space_order(index)
    nonzi_sid = {sp.sid[s]: why for s, why in b.nonzi.items()}
    roles = _roles(index, b)
    order = np.lexsort((ids, spc, lab, group_of))
    lab, ids, own, spc, group_of = lab[order], ids[order], own[order], spc[order], group_of[order]
    cuts = np.flatnonzero(np.diff(group_of)) + 1
    groups = []
    for g in zip(*(np.split(a, cuts) for a in (ids, lab, spc, own))):
        group = _make_group(index, sp, *g, is_const, reason_of, b, nonzi_sid, order_of)
        if group is not None:
            for m in group.members:
                m.role, m.reads = roles.get((m.tensor, m.axis), (None, None))
            groups.append(group)
    groups.sort(key=lambda g: (order_of.get(g.members[0].tensor, 1 << 30), g.members[0].tensor, g.members[0].axis, g.id))
    seen: dict[str, int] = {}
    for g in groups:
        base = g.id
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            g.id = f"{base}#{seen[base]}"
    return groups


def _roles(index: GraphIndex, b: _Builder) -> dict:
    """member space -> (role, activation space read): what the rules said about each parameter."""
    roles = {}
    for w, act in b.reads:
        m = _member_space(index, w)
        if m is not None and not _is_member_tensor(index, act[0]) and act in b.sp.offset:
            roles.setdefault(m, ("in", act))
    for s in b.scales:
        m = _member_space(index, s)
        if m is not None:
            roles.setdefault(m, ("scale", None))
    return roles


def _member_space(index: GraphIndex, space):
    """The parameter space behind `space`, through Identity/Cast/DequantizeLinear/Transpose."""
    tensor, axis = space
    while tensor and not _is_member_tensor(index, tensor):
        node = index.producer.get(tensor)
        if node is None or node.op_type not in ("Identity", "Cast", "DequantizeLinear", "Transpose"):
            return None
        if node.op_type == "Transpose":
            perm = attr(node, "perm") or list(range(index.rank(node.input[0]) or 0))[::-1]
            axis = perm[axis]
        tensor = node.input[0]
    return (tensor, axis) if tensor else None


def _per_channel(local: np.ndarray, ch: np.ndarray, n: int):
    """Positions of each channel `ch` in one space: (n, k) array when uniform, else a list."""
    order = np.lexsort((local, ch))
    local, ch = local[order], ch[order]
    counts = np.bincount(ch, minlength=n)
    if counts.min() == counts.max():
        return local.reshape(n, counts[0])
    return np.split(local, np.cumsum(counts)[:-1])


def _is_member_tensor(index: GraphIndex, name: str) -> bool:
    """Parameters a group can own: floating-point constants (not shape/index vectors)."""
    return (index.is_const(name) or name in index.filled) and index.model.dtypes.get(name) in FLOAT_TYPES


def _make_group(index, sp, g_ids, g_lab, g_spc, g_own, is_const, reason_of, b, nonzi_sid, order_of):
    first_lab = g_lab == g_lab[0]
    sids = sorted(set(g_spc[first_lab].tolist()))  # every channel touches the same spaces
    own_sids = set(g_spc[first_lab & g_own].tolist())
    rank = lambda s: len(index.shape(sp.names[s][0]) or ())
    place = lambda s: (order_of.get(sp.names[s][0], 1 << 30), -rank(s), sp.names[s])
    const_sids = sorted((s for s in sids if is_const[s]), key=place)
    # the anchor names the group and orders its channels: an own parameter if there is one
    anchor = min(own_sids, key=lambda s: (not is_const[s], place(s)))
    local = g_ids - sp.offsets[g_spc]
    in_anchor = g_spc == anchor
    anchor_labs, at = np.unique(g_lab[in_anchor], return_index=True)  # each label's first row in the anchor
    labs = anchor_labs[np.argsort(local[in_anchor][at], kind="stable")].tolist()  # in the anchor's order
    n = len(labs)
    by_label = np.argsort(labs)  # channel of every row: its label's rank in `labs`
    channel = by_label[np.searchsorted(np.sort(labs), g_lab)]
    positions = {}
    by_space = np.argsort(g_spc, kind="stable")
    spc_sorted = g_spc[by_space]
    cuts = np.flatnonzero(np.diff(spc_sorted)) + 1
    for rows in np.split(by_space, cuts):
        positions[sp.names[int(g_spc[rows[0]])]] = _per_channel(local[rows], channel[rows], n)
    members = [Member(sp.names[s][0], sp.names[s][1], positions[sp.names[s]]) for s in const_sids]
    reasons = reason_of[np.array(labs)]
    locked = [int(i) for i in np.flatnonzero(reasons != BIG)]
    if len(locked) == n and not any(is_const[s] or sp.names[s][0] in index.virtual for s in own_sids):
        return None  # a locked factor of a reshape (a spatial axis before Flatten): not a group
    prunable = n > 1 and len(locked) < n
    reason = None
    if not prunable:
        if locked:
            first = int(reasons[reasons != BIG].min())
            reason = b.reasons[first] + _route(b, sp.names[anchor], b.pin_spaces[first])
        else:
            reason = "a single channel cannot be pruned"
    marks = [nonzi_sid[s] for s in sids if s in nonzi_sid]
    plain = [why for why, stats in marks if not stats]
    zi_reason = plain[0] if plain else (marks[0][0] if marks else None)
    tensor, axis = sp.names[anchor]
    return Group(f"{tensor}:{axis}", n, prunable, reason, zi_reason is None, zi_reason,
                 members, positions, locked if prunable else [], hidden=bool(marks) and not plain,
                 multiple=_multiple(b, sp, sids, positions))


def _multiple(b: _Builder, sp: _Spaces, sids, positions) -> int:
    """The step in channels that keeps every space's multiple (in positions) whole."""
    step = 1
    for s in sids:
        m = b.multiples.get(sp.names[s])
        if m:
            per = positions[sp.names[s]]
            count = per.shape[1] if isinstance(per, np.ndarray) and per.ndim == 2 else 1
            step = math.lcm(step, m // math.gcd(m, count))
    return step


def _route(b: _Builder, start, end) -> str:
    """ ' (via Relu 'r' -> Gemm 'fc')': the ops the channels cross to reach a pinned space."""
    if b._graph is None:  # {space: {neighbour space: op}}, built once, on the first locked group
        b._graph = {}
        for u, v, op in b.edges:
            b._graph.setdefault(u, {})[v] = op
            b._graph.setdefault(v, {})[u] = op
    path = _shortest_path(b._graph, start, end)
    ops = []
    for u, v in itertools.pairwise(path):
        op = b._graph[u][v]
        if not ops or ops[-1] != op:
            ops.append(op)
    return f" (via {' -> '.join(ops)})" if ops else ""


def _shortest_path(adjacency: dict, start, end) -> list:
    """A shortest path from `start` to `end` by breadth-first search ([] when there is none).
    Written here rather than taken from networkx: importing networkx costs 85 ms of every
    `spa` command, for this one search over the spaces."""
    if start not in adjacency or end not in adjacency:
        return []
    parent, frontier = {start: None}, collections.deque([start])
    while frontier and end not in parent:
        u = frontier.popleft()
        for v in adjacency[u]:
            if v not in parent:
                parent[v] = u
                frontier.append(v)
    if end not in parent:
        return []
    path = [end]
    while parent[path[-1]] is not None:
        path.append(parent[path[-1]])
    return path[::-1]
