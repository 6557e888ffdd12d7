"""Coupling rules: one function per op type, registered by name.

A rule looks at one node and states, for the axes of its inputs and outputs:

- couplings: two channel spaces `(tensor, axis)` carry the same channels, with the
  position pairs that match them (identity, offset, block, modulo maps below);
- pins: a space (or some positions of it) must keep its size, with the reason;
- ties: a merged axis is the product of several axes (Reshape [.., H*D] <-> [.., H, D]):
  a position of the merged axis is the cell (h, d), removed when its h or its d is;
- free: a space the node does not constrain (e.g. the input of Shape);
- nonzi: a space where zeroed channels still change other channels (Softmax, LRN, a
  divisor), so removing them is not exact: the group is not zero-invariant.

Rules also name the roles parameters play, for criteria that must not look at op types:

- reads: a weight axis contracted with an activation axis (Conv/Gemm/MatMul inputs): the
  weight slices that consume a channel, and the activation they read (OBSPA, activations);
- scales: a per-channel scale (BatchNorm/LayerNorm gamma): bn-scale.

Every input/output axis a rule leaves unmentioned is pinned (never guess). An op with
no rule is a barrier: all its spaces are pinned. A rule may also register a rewriter,
called by the prune pass to update attributes or shape constants of the node.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Space = tuple  # (tensor name, axis)

RULES: dict[str, Callable] = {}
REWRITERS: dict[str, Callable] = {}
VIRTUAL: dict[str, Callable] = {}


def key(node) -> str:
    """Registry key of a node: its op type in the default domain, `domain:op_type` elsewhere
    (ONNX Runtime's contrib ops: `com.microsoft:FastGelu`)."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"


def rule(*op_types: str):
    """Register a coupling rule for the given op types (`domain:op_type` outside the default domain)."""

    def deco(fn):
        for op in op_types:
            RULES[op] = fn
        return fn

    return deco


def rewriter(*op_types: str):
    """Register a prune-time rewriter `(node, edit) -> None` for the given op types."""

    def deco(fn):
        for op in op_types:
            REWRITERS[op] = fn
        return fn

    return deco


def virtual(*op_types: str):
    """Register `(node, ctx) -> {name: shape}`: channel spaces a fused op holds that are no tensor
    of the graph (the query, key and value parts of GroupQueryAttention's packed input, its heads
    and head size), numbered like tensors so that its rule can couple and tie them. Names must not
    be tensor names: by convention `<the node's first output>::<part>`."""

    def deco(fn):
        for op in op_types:
            VIRTUAL[op] = fn
        return fn

    return deco


# ---------------------------------------------------------------- index maps


def identity(n: int) -> np.ndarray:
    """a[i] <-> b[i] (read-only: one array per size, shared by every caller)."""
    return offset(n, 0)


@functools.lru_cache(maxsize=4096)
def offset(n: int, off: int) -> np.ndarray:
    """a[i] <-> b[off + i] (Concat inputs, Split/Slice windows). Read-only and shared: a deep
    graph asks for the same few sizes tens of thousands of times."""
    i = np.arange(n)
    pairs = np.stack([i, i + off], 1)
    pairs.setflags(write=False)
    return pairs


def block(n: int, m: int) -> np.ndarray:
    """a[i] <-> b[i*m : (i+1)*m] (flattened channel blocks, depthwise multipliers)."""
    i = np.repeat(np.arange(n), m)
    return np.stack([i, np.arange(n * m)], 1)


def modulo(n: int, m: int) -> np.ndarray:
    """a[i] <-> b[i % m] (grouped conv: the same slot in every group)."""
    i = np.arange(n)
    return np.stack([i, i % m], 1)




@dataclass
class Result:
    """What one rule says about one node."""

    node: object
    couplings: list = field(default_factory=list)  # (Space, Space, pairs)
    pins: list = field(default_factory=list)  # (Space, positions | None, reason)
    free: set = field(default_factory=set)
    nonzi: list = field(default_factory=list)  # (Space, reason)
    ties: list = field(default_factory=list)  # (merged Space, [factor Spaces], [factor sizes])
    reads: list = field(default_factory=list)  # (weight Space, activation Space) contracted together
    scales: list = field(default_factory=list)  # Spaces of per-channel scales
    multiples: list = field(default_factory=list)  # (Space, m): the op needs its size a multiple of m

    def couple(self, a: Space, b: Space, pairs: np.ndarray) -> None:
        self.couplings.append((a, b, pairs))

    def same(self, a: Space, b: Space, ctx) -> None:
        """Identity coupling when both axes are known and equal; size-1 axes are skipped."""
        sa, sb = ctx.size(a), ctx.size(b)
        if sa == 1 or sb == 1:
            self.free.update((a, b))
        elif sa is not None and sa == sb:
            self.couple(a, b, identity(sa))
        elif sa is None and sb is None:
            self.free.update((a, b))
        elif sa is None or sb is None:  # the analysis pins the known side, with that reason
            self.couple(a, b, identity(sa or sb))
        else:
            self.pin(a, f"size mismatch with axis {b[1]} of '{b[0]}'")
            self.pin(b, f"size mismatch with axis {a[1]} of '{a[0]}'")

    def param(self, name: str, ctx, why: str = "") -> None:
        """`name` is read as sizes/indices/axes, not as data: its values must not change."""
        for k in range(ctx.rank(name) or 0) if name else ():
            self.pin((name, k), why or f"'{name}' holds sizes or indices for {ctx.label(self.node)}")

    def tie(self, whole: Space, parts: list, dims: list) -> None:
        """`whole` is the row-major product of `parts` (sizes `dims`): its position p is the
        cell of digits (p // prod(dims[k+1:])) % dims[k], removed with any of its factors."""
        self.ties.append((whole, list(parts), [int(d) for d in dims]))

    def read(self, weight: Space, activation: Space) -> None:
        """`weight`'s axis multiplies `activation`'s axis and sums it away (a contraction).
        Either side may be the constant; the analysis keeps the pairs whose weight is one."""
        self.reads.append((weight, activation))
        self.reads.append((activation, weight))

    def scale(self, space: Space) -> None:
        """`space` is a per-channel multiplicative scale of its channels (a norm's gamma)."""
        self.scales.append(space)

    def multiple(self, space: Space, m: int) -> None:
        """The op runs only while `space` keeps a multiple of `m` positions (ONNX Runtime's
        GroupQueryAttention: a head size that is a multiple of 16): the planners keep whole steps."""
        self.multiples.append((space, int(m)))

    def pin(self, space: Space, why: str, positions=None) -> None:
        self.pins.append((space, positions, why))

    def mark_nonzi(self, space: Space, why: str, stats: bool = False) -> None:
        """Zeroed channels of `space` still change others. `stats`: only through normalization
        statistics (LayerNorm, RMSNorm, a mean over channels): the hidden-size kind, pruned
        only on request."""
        self.nonzi.append((space, why, stats))


from spa.core.rules import attention, contrib, conv, elementwise, linear, norm, pool, shape  # noqa: F401  (register rules)
