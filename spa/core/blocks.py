"""Attention blocks as the groups see them: heads, head_dim, MLP width, before and after a plan.

    Softmax(scores) ─▶ scores = MatMul(Q, Kᵀ) [· scale + mask] ─▶ heads = scores' leading axes
                                                                  head_dim = Q's last axis
    MatMul(Softmax(..), V)                                      ─▶ V's head_dim = V's last axis
    prunable groups anchored after this Softmax, before the next ─▶ intermediate (MLP widths)

Nothing here knows an architecture: a block is found from the graph's own attention
arithmetic, and each size is read from the channel groups that touch that axis (a
position dropped by any of them is gone), so GQA's query heads (KV heads x queries per
KV head) and heads that are locked come out right. Sizes of axes no group touches are
reported as fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spa.core.analysis import Analysis, Group

# ops between the score MatMul and Softmax, and between Softmax and the value MatMul
_SCORE_OPS = {"Add", "Mul", "Div", "Sub", "Where", "Cast", "Identity", "Dropout", "Max", "Min", "Reshape", "Squeeze",
              "Unsqueeze"}
_DEPTH = 6


@dataclass
class Axis:
    """One attention dimension: its size before/after and the groups that change it."""

    before: int | None
    after: int | None
    groups: list[str] = field(default_factory=list)
    fixed: str | None = None  # why no plan can change it (no group reaches it, or its groups are locked)

    def to_json(self) -> dict:
        return {"before": self.before, "after": self.after, "groups": self.groups, "fixed": self.fixed}

    def text(self) -> str:
        if self.before is None:
            return "?"
        if self.fixed is not None:
            return f"{self.before} (fixed: {self.fixed})"
        return str(self.before) if self.after == self.before else f"{self.before} -> {self.after}"


NO_GROUP = ("no channel group reaches this axis: a reshape to sizes computed at run time, a graph input or "
            "output, or an op without a rule on the way (spa analyze's group table says which); --simplify "
            "folds run-time shape arithmetic and may free it")


@dataclass
class Block:
    softmax: str  # the attention's Softmax, or its fused op (GroupQueryAttention)
    heads: Axis
    head_dim: Axis
    v_head_dim: Axis
    intermediate: list[Axis]
    kv_heads: Axis | None = None  # where the op names them (GroupQueryAttention)

    def to_json(self) -> dict:
        doc = {"softmax": self.softmax, "heads": self.heads.to_json(), "head_dim": self.head_dim.to_json(),
               "v_head_dim": self.v_head_dim.to_json(), "intermediate": [a.to_json() for a in self.intermediate]}
        if self.kv_heads is not None:
            doc["kv_heads"] = self.kv_heads.to_json()
        return doc


def _walk(index, start: str, up: bool):
    """The first MatMul reached from `start` through score arithmetic (producers if `up`)."""
    frontier = [start]
    for _ in range(_DEPTH):
        nxt = []
        for name in frontier:
            nodes = [index.producer.get(name)] if up else index.consumers.get(name, [])
            for node in filter(None, nodes):
                if node.op_type == "MatMul":
                    return node
                if node.op_type in _SCORE_OPS:
                    nxt += [i for i in node.input if i and not index.is_const(i)] if up else list(node.output)
        frontier = nxt
    return None


def _touching(analysis: Analysis, spaces: list[tuple]) -> list[Group]:
    return [g for g in analysis.groups if any(s in g.positions for s in spaces)]


def _axis(analysis: Analysis, spaces: list[tuple], plan: dict) -> Axis:
    """Size of the first of `spaces` with a static size, before and after `plan`."""
    spaces = [s for s in spaces if isinstance(_size(analysis, s), int)]
    if not spaces:
        return Axis(None, None)
    groups = _touching(analysis, spaces)
    space = next((s for s in spaces if any(s in g.positions for g in groups)), spaces[0])
    before = _size(analysis, space)
    gone = set()
    for g in groups:
        for ch in plan.get(g.id, []):
            if space in g.positions:
                gone.update(int(p) for p in g.positions[space][ch])
    touching = [g for g in groups if space in g.positions]
    fixed = NO_GROUP if not touching else None
    if touching and not any(g.prunable for g in touching):
        fixed = f"its group {touching[0].id} is locked: {touching[0].reason}"
    return Axis(before, before - len(gone), [g.id for g in touching], fixed)


def _size(analysis: Analysis, space: tuple):
    shape = analysis.index.shape(space[0])
    return shape[space[1]] if shape is not None and 0 <= space[1] < len(shape) else None


def _node_order(analysis: Analysis) -> dict[str, int]:
    first_use = {}
    for i, node in enumerate(analysis.index.graph.node):
        for name in node.input:
            first_use.setdefault(name, i)
    return first_use


def _fused(analysis: Analysis, node, plan: dict) -> Block | None:
    """The Block of a GroupQueryAttention (query heads = KV heads x query heads per KV head) or a
    MultiHeadAttention, read from the spaces its rule declares (spa.core.rules.attention)."""
    o = node.output[0]
    if node.op_type == "MultiHeadAttention":
        if analysis.index.shape(f"{o}::heads") is None:
            return None
        heads, d, dv = (_axis(analysis, [(f"{o}::{p}", 0)], plan) for p in ("heads", "head_dim", "v_head_dim"))
        return Block(analysis.index.label(node).strip("'"), heads, d, dv, [])
    if analysis.index.shape(f"{o}::kv_heads") is None:
        return None
    kv, rep, d = (_axis(analysis, [(f"{o}::{p}", 0)], plan) for p in ("kv_heads", "q_per_kv", "head_dim"))
    fixed = None if kv.fixed is None or rep.fixed is None else \
        f"KV heads: {kv.fixed}; query heads per KV head: {rep.fixed}"
    heads = Axis(kv.before * rep.before, kv.after * rep.after, kv.groups + rep.groups, fixed)
    return Block(analysis.index.label(node).strip("'"), heads, d, d, [], kv)


def attention_blocks(analysis: Analysis, plan: dict | None = None) -> list[Block]:
    """One Block per Softmax that sits between two MatMuls (an attention), and per fused attention
    op with a rule (GroupQueryAttention, MultiHeadAttention), in graph order."""
    plan = plan or {}
    index = analysis.index
    found = []  # (node index, Block)
    for i, node in enumerate(index.graph.node):
        if node.op_type in ("GroupQueryAttention", "MultiHeadAttention"):
            block = _fused(analysis, node, plan)
        elif node.op_type == "Softmax":
            block = _softmax(analysis, node, plan)
        else:
            continue
        if block is not None:
            found.append((i, block))
    first_use = _node_order(analysis)
    anchor = {g.id: first_use.get(g.members[0].tensor, 1 << 30) for g in analysis.groups}
    attention_groups = {gid for _, b in found for a in (b.heads, b.head_dim, b.v_head_dim) for gid in a.groups}
    ends = [i for i, _ in found[1:]] + [1 << 31]
    for (start, block), end in zip(found, ends):
        for g in analysis.groups:
            if g.prunable and g.id not in attention_groups and not g.hidden and start < anchor[g.id] < end:
                dropped = len(plan.get(g.id, []))
                block.intermediate.append(Axis(g.size, g.size - dropped, [g.id]))
    return [b for _, b in found]


def _softmax(analysis: Analysis, node, plan: dict) -> Block | None:
    """The Block of a Softmax between a score MatMul and a value MatMul, else None."""
    index = analysis.index
    qk, av = _walk(index, node.input[0], up=True), _walk(index, node.output[0], up=False)
    if qk is None or av is None:
        return None
    scores, q, v, out = node.input[0], qk.input[0], av.input[1], av.output[0]
    lead = lambda name: [(name, a) for a in range(max((index.rank(name) or 0) - 2, 0))]
    heads = _axis(analysis, lead(scores) + lead(out) + lead(q), plan)
    head_dim = _axis(analysis, [(q, (index.rank(q) or 0) - 1)], plan)
    v_head_dim = _axis(analysis, [(v, (index.rank(v) or 0) - 1)], plan)
    return Block(index.label(node).strip("'"), heads, head_dim, v_head_dim, [])
