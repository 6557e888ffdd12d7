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
with the reason (and, via a networkx path over the spaces, the route to it).
Reshape/Flatten pick which factor of a merged axis carries the channels in a second
pass, preferring factors that are not locked otherwise.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx

from .cost import FLOAT_TYPES
from .graph import DEFAULT_DOMAINS, GraphIndex, attr
from .model import Model
from .rules import RULES, Result
from .unionfind import components


@dataclass
class Member:
    """One parameter slice set of a group: `positions[i]` = positions of channel i on `axis`
    (a 2-D array when every channel has as many positions, else a list of arrays)."""

    tensor: str
    axis: int
    positions: object = field(repr=False)

    @property
    def indices(self) -> list:
        """JSON form: entry i is an int (one position) or a list of ints."""
        return [int(p[0]) if len(p) == 1 else [int(v) for v in p] for p in self.positions]

    def to_json(self) -> dict:
        return {"tensor": self.tensor, "axis": self.axis, "indices": self.indices}


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

    def to_json(self) -> dict:
        return {
            "id": self.id, "size": self.size, "prunable": self.prunable, "reason": self.reason,
            "zero_invariant": self.zero_invariant, "locked": self.locked,
            "members": [m.to_json() for m in self.members],
        }


@dataclass
class Analysis:
    model: Model
    index: GraphIndex
    groups: list[Group]
    sizes: dict  # space -> size
    barriers: list[str]

    def group(self, gid: str) -> Group:
        """The group with id `gid` (KeyError if none)."""
        if getattr(self, "_by_id", None) is None or len(self._by_id) != len(self.groups):
            self._by_id = {g.id: g for g in self.groups}
        return self._by_id[gid]


class Ctx:
    """What a rule may ask about the graph."""

    def __init__(self, index: GraphIndex, chooser):
        self.g = index
        self.opset = index.opset
        self.graph_outputs = set(index.graph_outputs)
        self.choose = chooser

    def shape(self, name):
        return self.g.shape(name)

    def label(self, node):
        return self.g.label(node)

    def rank(self, name):
        return self.g.rank(name) if name else None

    def size(self, space):
        s = self.g.shape(space[0])
        return None if s is None or not 0 <= space[1] < len(s) else s[space[1]]

    def attr(self, node, name, default=None):
        return attr(node, name, default)

    def value(self, name):
        return self.g.value(name)

    def shape_value(self, name):
        return self.g.shape_value(name)

    def consumers(self, name):
        return self.g.consumers.get(name, [])


class _Spaces:
    """Global position numbering for every static space (size-1 axes too: a channel coupled
    to one, e.g. a one-channel Slice or Split output, must stay; broadcasting rules skip them)."""

    def __init__(self, shapes: dict):
        self.offset, self.sizes, self.names, self.sid = {}, {}, [], {}
        total = 0
        for tensor, shape in shapes.items():
            for axis, size in enumerate(shape):
                if size is not None and size > 0:
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
        self.space_of = np.zeros(total, dtype=np.int64)
        for sid, space in enumerate(self.names):
            o = self.offset[space]
            self.space_of[o:o + self.sizes[space]] = sid

    def ids(self, space, positions=None):
        o = self.offset[space]
        if positions is None:
            return np.arange(o, o + self.sizes[space])
        return o + np.asarray(positions, dtype=np.int64)


def _node_rule(node):
    if node.domain not in DEFAULT_DOMAINS:
        return None
    return RULES.get(node.op_type)


def _subgraph_captures(graph: onnx.GraphProto) -> set[str]:
    """Outer-scope names read inside If/Loop/Scan bodies (they must keep their shapes)."""
    names = set()
    for node in graph.node:
        for a in node.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in subs:
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
        self._graph = None

    def pin(self, space, reason, positions=None):
        if space not in self.sp.offset:
            return
        ids = self.sp.ids(space, positions)
        self.reasons.append(reason)
        self.pin_spaces.append(space)
        self.pin_ids.append(ids)
        self.pin_reason.append(np.full(len(ids), len(self.reasons) - 1))

    def couple(self, a, b, pairs, node_name):
        known_a, known_b = a in self.sp.offset, b in self.sp.offset
        if not (known_a and known_b):
            for s, known in ((a, known_a), (b, known_b)):
                if known:  # coupled with an axis of unknown size: keep the known side as it is
                    self.pin(s, f"coupled by {node_name} with an axis of unknown size")
            return
        if len(pairs) == 0:
            return
        if pairs[:, 0].max() >= self.sp.sizes[a] or pairs[:, 1].max() >= self.sp.sizes[b]:
            self.pin(a, f"inconsistent shapes around {node_name}")
            self.pin(b, f"inconsistent shapes around {node_name}")
            return
        self.edges_a.append(self.sp.ids(a, pairs[:, 0]))
        self.edges_b.append(self.sp.ids(b, pairs[:, 1]))
        self.edges.append((a, b, node_name))

    def add_result(self, res: Result, node, barrier_reason: str | None):
        mentioned = set(res.free)
        for a, b, pairs in res.couplings:
            self.couple(a, b, pairs, f"{node.op_type} {self.label(node)}")
            mentioned.update((a, b))
        for space, positions, why in res.pins:
            self.pin(space, why, positions)
            mentioned.add(space)
        for space, why in res.nonzi:
            if space in self.sp.offset:
                self.nonzi.setdefault(space, why)
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


def _run_rules(index: GraphIndex, spaces: _Spaces, chooser, exclude: list[str]) -> _Builder:
    b = _Builder(spaces, index.label)
    for name in index.graph_inputs:
        for axis in b.sp_shape(name):
            b.pin((name, axis), f"model input '{name}'")
    for name in index.graph_outputs:
        for axis in b.sp_shape(name):
            b.pin((name, axis), f"model output '{name}'")
    for name in sorted(_subgraph_captures(index.graph)):
        for axis in b.sp_shape(name):
            b.pin((name, axis), f"'{name}' is read inside a subgraph (If/Loop/Scan)")
    ctx = Ctx(index, chooser)
    for node in index.graph.node:
        hit = _excluded(node, index, exclude)
        fn = _node_rule(node)
        if hit:
            reason = f"protected by --exclude '{hit}'"
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


def _excluded(node, index, patterns):
    for pat in patterns:
        names = [node.name] + [i for i in node.input if index.is_const(i)]
        if any(fnmatch.fnmatchcase(n, pat) for n in names if n):
            return pat
    return None


def _labels(b: _Builder) -> np.ndarray:
    if b.edges_a:
        return components(b.sp.total, np.concatenate(b.edges_a), np.concatenate(b.edges_b))
    return np.arange(b.sp.total)


def _pin_reason_per_label(b: _Builder, labels: np.ndarray) -> np.ndarray:
    """Index into b.reasons of the first pin that reaches each label (-1: free)."""
    best = np.full(b.sp.total, np.iinfo(np.int64).max, dtype=np.int64)
    if b.pin_ids:
        ids, why = np.concatenate(b.pin_ids), np.concatenate(b.pin_reason)
        np.minimum.at(best, labels[ids], why)
    best[best == np.iinfo(np.int64).max] = -1
    return best


def analyze(model: Model, exclude: list[str] | None = None) -> Analysis:
    """Group the coupled channels of `model` (shapes must be inferred, see spa.model.load)."""
    exclude = list(exclude or [])
    index = GraphIndex(model)
    spaces = _Spaces(model.shapes)
    asked = []  # first pass: Reshape/Flatten factors are left free, and we note who asked
    b = _run_rules(index, spaces, lambda parts: asked.append(parts), exclude)
    labels = _labels(b)
    if asked:
        locked = _pin_reason_per_label(b, labels) >= 0

        def choose(parts):
            known = [p for p in parts if p in spaces.offset]
            free = [p for p in known if not locked[labels[spaces.ids(p)]].all()]
            pool = free or known
            return max(pool, key=lambda p: (spaces.sizes[p], -p[1])) if pool else None

        b = _run_rules(index, spaces, choose, exclude)
        labels = _labels(b)
    groups = _groups(index, b, labels)
    barriers = [n.name or n.op_type for n in index.graph.node if _node_rule(n) is None]
    return Analysis(model, index, groups, dict(spaces.sizes), barriers)


def _space_order(index: GraphIndex) -> dict[str, int]:
    order = {}
    for i, node in enumerate(index.graph.node):
        for name in list(node.input) + list(node.output):
            order.setdefault(name, i)
    return order


def _groups(index: GraphIndex, b: _Builder, labels: np.ndarray) -> list[Group]:
    sp = b.sp
    is_const = np.array([_is_member_tensor(index, t) for t, _ in sp.names], dtype=bool)
    pos_const = is_const[sp.space_of]
    has_const = np.zeros(sp.total, dtype=bool)
    has_act = np.zeros(sp.total, dtype=bool)
    has_const[labels[pos_const]] = True
    has_act[labels[~pos_const]] = True
    ids = np.flatnonzero((has_const & has_act)[labels])
    if len(ids) == 0:
        return []
    lab, spc = labels[ids], sp.space_of[ids]
    # signature of a label = the set of spaces it touches, hashed (sum of random 64-bit keys)
    pair_key = np.sort(lab * len(sp.names) + spc)
    pair_key = pair_key[np.r_[True, pair_key[1:] != pair_key[:-1]]]  # unique (sorting beats hashing here)
    pair_lab, pair_spc = pair_key // len(sp.names), pair_key % len(sp.names)
    salt = np.random.default_rng(12345).integers(1, 2**62, size=len(sp.names), dtype=np.int64)
    sig = np.zeros(sp.total, dtype=np.int64)
    np.add.at(sig, pair_lab, salt[pair_spc])
    group_of = sig[lab]  # per position: its label's signature
    reason_of = _pin_reason_per_label(b, labels)
    order_of = _space_order(index)
    nonzi_sid = {sp.sid[s]: why for s, why in b.nonzi.items()}
    order = np.lexsort((ids, spc, lab, group_of))
    ids, lab, spc, group_of = ids[order], lab[order], spc[order], group_of[order]
    cuts = np.flatnonzero(np.diff(group_of)) + 1
    groups = []
    for g_ids, g_lab, g_spc in zip(np.split(ids, cuts), np.split(lab, cuts), np.split(spc, cuts)):
        groups.append(_make_group(index, sp, g_ids, g_lab, g_spc, is_const, reason_of, b, nonzi_sid, order_of))
    groups.sort(key=lambda g: (order_of.get(g.members[0].tensor, 1 << 30), g.members[0].tensor, g.members[0].axis))
    seen: dict[str, int] = {}
    for g in groups:
        base = g.id
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            g.id = f"{base}#{seen[base]}"
    return groups


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


def _make_group(index, sp, g_ids, g_lab, g_spc, is_const, reason_of, b, nonzi_sid, order_of):
    sids = sorted(set(g_spc[g_lab == g_lab[0]].tolist()))  # every channel touches the same spaces
    const_sids = [s for s in sids if is_const[s]]
    rank = lambda s: len(index.shape(sp.names[s][0]) or ())  # noqa: E731
    const_sids.sort(key=lambda s: (order_of.get(sp.names[s][0], 1 << 30), -rank(s), sp.names[s]))
    anchor = const_sids[0]
    local = g_ids - sp.offsets[g_spc]
    in_anchor = g_spc == anchor
    first = {}
    for l_, p in zip(g_lab[in_anchor][::-1], local[in_anchor][::-1]):  # keep the smallest position
        first[int(l_)] = int(p)
    labs = sorted(first, key=first.get)
    n = len(labs)
    by_label = np.argsort(labs)  # channel of every row: its label's rank in `labs`
    channel = by_label[np.searchsorted(np.sort(labs), g_lab)]
    positions = {}
    for s in sids:
        mask = g_spc == s
        positions[sp.names[s]] = _per_channel(local[mask], channel[mask], n)
    members = [Member(sp.names[s][0], sp.names[s][1], positions[sp.names[s]]) for s in const_sids]
    reasons = reason_of[np.array(labs)]
    locked = [int(i) for i in np.flatnonzero(reasons >= 0)]
    prunable = n > 1 and len(locked) < n
    reason = None
    if not prunable:
        if locked:
            first = int(reasons[reasons >= 0].min())
            reason = b.reasons[first] + _route(b, sp.names[anchor], b.pin_spaces[first])
        else:
            reason = "a single channel cannot be pruned"
    zi_reason = next((nonzi_sid[s] for s in sids if s in nonzi_sid), None)
    tensor, axis = sp.names[anchor]
    return Group(f"{tensor}:{axis}", n, prunable, reason, zi_reason is None, zi_reason,
                 members, positions, locked if prunable else [])


def _route(b: _Builder, start, end) -> str:
    """ ' (via Relu 'r' -> Gemm 'fc')': the ops the channels cross to reach a pinned space."""
    import networkx as nx  # only needed to explain locked groups

    if b._graph is None:
        b._graph = nx.Graph()
        b._graph.add_edges_from((u, v, {"node": op}) for u, v, op in b.edges)
    try:
        path = nx.shortest_path(b._graph, start, end)
    except (nx.NetworkXNoPath, nx.NodeNotFound):
        return ""
    ops = []
    for u, v in zip(path, path[1:]):
        op = b._graph.edges[u, v]["node"]
        if not ops or ops[-1] != op:
            ops.append(op)
    return f" (via {' -> '.join(ops)})" if ops else ""

