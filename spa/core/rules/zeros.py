"""Do zeroed channels stay zero? The proof behind a zero-invariance claim that needs it.

Zeroing a group's member slices zeroes its channels where they are made (a Conv's weight rows
and bias). Downstream they stay zero or not: Relu(0) = 0 but Sigmoid(0) = 0.5, `x + 1` is 1
there, and a weight computed at run time from a stored one ((W - mean(W)) / std(W), weight
standardization) is not zero where the stored weight was zeroed. A contraction with a stored
weight does not care (the weight's slice is zeroed too); a sum over the channels (ReduceSum)
and a contraction with a weight computed at run time do: there, pruning the channels equals
zeroing them only if they are zero. `nonzero_cause` proves it, or names the op that breaks it.
"""

from __future__ import annotations

import numpy as np

from spa.core.rules.shape import align

# f(0) == 0 for these (elementwise, the same axes)
ZERO_AT_ZERO = (
    "Relu", "LeakyRelu", "PRelu", "Tanh", "Sin", "Neg", "Abs", "Sqrt", "Erf", "Gelu", "Elu", "Selu", "Celu",
    "Mish", "Softsign", "Swish", "HardSwish", "Relu6", "ThresholdedRelu", "Shrink", "ScaledTanh", "Floor",
    "Ceil", "Round", "Sign", "Identity", "Cast", "Dropout", "IsNaN", "IsInf", "Resize", "Upsample", "Slice",
    "Split",
)
POOLS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
SUMS = ("Add", "Sub", "Sum", "Mean", "Where", "Max", "Min")
DEPTH = 200


def nonzero_cause(name: str, axis: int, ctx, *, depth: int = 0) -> str | None:
    """None when channels zeroed on `axis` of `name` are proven zero there, else the op (and why)
    that makes them non-zero. Stored tensors and model inputs are sources (zeroed where they
    are members; the channels of inputs are pinned)."""
    cache = ctx.__dict__.setdefault("_nonzero", {})
    key = (name, axis)
    if key not in cache:
        if depth > DEPTH:
            return "a path too long to follow"
        cache[key] = _cause(name, axis, ctx, depth + 1)
    return cache[key]


def _cause(name, axis, ctx, depth):
    node = ctx.g.producer.get(name)
    if node is None or ctx.g.is_const(name) or name in ctx.g.filled:
        return None
    label = f"{node.op_type} {ctx.label(node)}"
    sub = lambda t, k: nonzero_cause(t, k, ctx, depth=depth)
    op = node.op_type
    if op in ZERO_AT_ZERO or (op in POOLS and axis < 2):
        return sub(node.input[0], axis)
    if op in SUMS or op in ("Mul", "Pow", "Div"):
        return _broadcast_cause(node, axis, ctx, sub, label)
    handler = _HANDLERS.get(op)
    if handler is not None:
        return handler(node, axis, ctx, sub, label)
    return f"{label} is not known to keep zeroed channels at zero"


def _aligned(node, x, axis, ctx):
    """Axis of input `x` read at output `axis` (numpy broadcasting), or None when `x` is the
    same for every position of that axis (a missing or size-1 axis)."""
    k = axis - ((ctx.rank(node.output[0]) or 0) - (ctx.rank(x) or 0))
    if k < 0 or ctx.size((x, k)) == 1 and ctx.size((node.output[0], axis)) != 1:
        return None
    return k


def _broadcast_cause(node, axis, ctx, sub, label):
    """Mul is zero where any input carrying the axis is; Add/Sub/Max/.. where all are. An input
    shared by every channel (broadcast) must be 0 for Add, <= 0 for Max, >= 0 for Min."""
    op = node.op_type
    inputs = list(node.input[1:]) if op == "Where" else list(node.input)
    if op == "Div":  # a zero numerator (the divisor's own zeros are the Div rule's business)
        inputs = inputs[:1]
    if op == "Pow":
        e = ctx.value(node.input[1])
        return sub(node.input[0], axis) if e is not None and bool((e > 0).all()) else \
            f"{label} raises a zeroed channel to a power that may be 0"
    causes = []
    for x in filter(None, inputs):
        k = _aligned(node, x, axis, ctx)
        if k is None:
            causes.append(_shared_cause(op, ctx.value(x), label))
        else:
            causes.append(sub(x, k))
    if op == "Mul":
        return None if None in causes else causes[0]
    return next((c for c in causes if c), None)


def _shared_cause(op, value, label):
    """An input broadcast over the channels: what it leaves in a zeroed channel."""
    ok = value is not None and value.size > 0 and (
        bool((value <= 0).all()) if op == "Max" else bool((value >= 0).all()) if op == "Min" else
        not value.any())
    return None if ok else f"{label} gives zeroed channels a non-zero value shared by all channels"


def _conv(node, axis, ctx, sub, label):
    if axis != 1:
        return None  # batch and spatial axes are pinned, never a group's channels
    w, conv_t = node.input[1], node.op_type == "ConvTranspose"
    cause = sub(w, 1 if conv_t else 0)
    if cause and ctx.attr(node, "group", 1) > 1:  # grouped: an output channel reads its own inputs only
        cause = sub(node.input[0], 1) and cause
    bias = node.input[2] if len(node.input) > 2 else ""
    return cause or (sub(bias, 0) if bias else None)


def _gemm(node, axis, ctx, sub, label):
    a, b = node.input[0], node.input[1]
    if axis == 0:
        return sub(a, 1 if ctx.attr(node, "transA", 0) else 0)
    cause = sub(b, 0 if ctx.attr(node, "transB", 0) else 1)
    c = node.input[2] if len(node.input) > 2 else ""
    if cause or not c:
        return cause
    k = _aligned(node, c, axis, ctx)
    return _shared_cause("Add", ctx.value(c), label) if k is None else sub(c, k)


def _matmul(node, axis, ctx, sub, label):
    a, b, y = node.input[0], node.input[1], node.output[0]
    ra, rb, ry = ctx.rank(a) or 0, ctx.rank(b) or 0, ctx.rank(y) or 0
    if axis == ry - 1 and rb >= 2:
        return sub(b, rb - 1)
    if axis == ry - (2 if rb >= 2 else 1) and ra >= 2:
        return sub(a, ra - 2)
    causes = [sub(x, k) for x in (a, b) if (k := _aligned(node, x, axis, ctx)) is not None]
    return None if None in causes else f"{label} is not known to keep zeroed channels at zero"


def _transpose(node, axis, ctx, sub, label):
    perm = ctx.attr(node, "perm", None) or list(reversed(range(ctx.rank(node.input[0]) or 0)))
    return sub(node.input[0], perm[axis])


def _reshape(node, axis, ctx, sub, label):
    """Each output axis reads the input axes of its aligned run (a merged axis all of them)."""
    x = node.input[0]
    sx, sy = ctx.shape(x), ctx.shape(node.output[0])
    runs = None if sx is None or sy is None else align(sx, sy)
    if node.op_type in ("Squeeze", "Unsqueeze") and sx is not None and sy is not None:
        xs, ys = [k for k, d in enumerate(sx) if d != 1], [k for k, d in enumerate(sy) if d != 1]
        runs = [([i], [j]) for i, j in zip(xs, ys)] if len(xs) == len(ys) else None
    for ins, outs in runs or ():
        if axis in outs:
            return next((c for k in ins if sx[k] != 1 and (c := sub(x, k))), None)
    if sy is not None and axis < len(sy) and sy[axis] == 1:
        return None
    return f"{label} is not known to keep zeroed channels at zero"


def _concat(node, axis, ctx, sub, label):
    return next((c for x in node.input if x and (c := sub(x, axis))), None)


def _gather(node, axis, ctx, sub, label):
    x = node.input[0]
    g_axis = ctx.attr(node, "axis", 0) % max(ctx.rank(x) or 1, 1)
    if (ctx.rank(node.input[1]) or 0) == 1 or axis < g_axis:
        return sub(x, axis)
    return f"{label} is not known to keep zeroed channels at zero"


def _batchnorm(node, axis, ctx, sub, label):
    if axis != 1:
        return sub(node.input[0], axis)
    scale, bias, mean = node.input[1], node.input[2], node.input[3]
    centered = sub(node.input[0], 1) or sub(mean, 0)
    return sub(bias, 0) or (sub(scale, 0) and centered)


def _instancenorm(node, axis, ctx, sub, label):
    if axis != 1:
        return f"{label} is not known to keep zeroed channels at zero"
    return sub(node.input[2], 0) or sub(node.input[1], 0)


def _layernorm(node, axis, ctx, sub, label):
    """Normalized axes: zero where scale and bias are zeroed. A zeroed row normalizes to 0, plus the bias."""
    x, rank = node.input[0], ctx.rank(node.input[0]) or 0
    params = [p for p in node.input[1:3] if p]
    if axis < ctx.attr(node, "axis", -1) % max(rank, 1):
        bias = node.input[2] if len(node.input) > 2 else ""
        return sub(x, axis) or (_shared_cause("Add", ctx.value(bias), label) if bias else None)
    causes = [_shared_cause("Add", ctx.value(p), label) if (k := _aligned(node, p, axis, ctx)) is None
              else sub(p, k) for p in params]
    return next((c for c in causes if c), None)


def _dequantize(node, axis, ctx, sub, label):
    zero_point = ctx.value(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1)
    if zero_point is None or zero_point.any():
        return f"{label} has a non-zero zero point"
    return sub(node.input[0], axis)


_HANDLERS = {
    "Conv": _conv, "ConvTranspose": _conv, "Gemm": _gemm, "MatMul": _matmul, "Transpose": _transpose,
    "Reshape": _reshape, "Flatten": _reshape, "Squeeze": _reshape, "Unsqueeze": _reshape, "Concat": _concat,
    "Gather": _gather, "BatchNormalization": _batchnorm, "InstanceNormalization": _instancenorm,
    "LayerNormalization": _layernorm, "RMSNormalization": _layernorm, "SimplifiedLayerNormalization": _layernorm,
    "DequantizeLinear": _dequantize, "QuantizeLinear": _dequantize,
}


def computed_weight(name: str, ctx) -> bool:
    """`name` is computed at run time from stored tensors only (no model input reaches it)."""
    cache = ctx.__dict__.setdefault("_computed", {})
    if name not in cache:
        cache[name] = False  # a cycle guard; graphs are acyclic
        node = ctx.g.producer.get(name)
        cache[name] = node is not None and not ctx.g.is_const(name) and name not in ctx.g.filled and \
            all(ctx.g.is_const(i) or i in ctx.g.filled or computed_weight(i, ctx) for i in node.input if i)
    return cache[name]


def check_contraction(res, ctx, *, weight, activation) -> None:
    """A contraction over a group's channels is exact when the weight's slice is zeroed with
    them. A stored weight (a member) is; one computed at run time must be proven zero there,
    or else the activation must be."""
    if not computed_weight(weight[0], ctx):
        return
    cause = nonzero_cause(*weight, ctx)
    if cause and nonzero_cause(*activation, ctx):
        node = res.node
        res.mark_nonzi(activation, f"the weight of {node.op_type} {ctx.label(node)} is computed at run time: "
                       f"zeroing its stored channels does not zero it ({cause})")
