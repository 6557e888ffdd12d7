"""Elementwise ops: every axis of the output carries the same channels as the inputs.

    Relu(x) -> y          x[:, c] <-> y[:, c]                   (all axes, identity)
    Add(a, b) -> y        a[.., c] <-> b[.., c] <-> y[.., c]    (numpy broadcasting, right-aligned;
                                                                 size-1 axes are not coupled)
"""

from __future__ import annotations

from spa.core.rules import rule

UNARY = (
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus",
    "Softsign", "Erf", "Elu", "Selu", "Celu", "Gelu", "Mish", "Exp", "Abs", "Neg", "Sqrt",
    "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Not", "IsNaN", "IsInf", "Identity",
    "Dropout", "Cast", "ThresholdedRelu", "Shrink", "Swish", "Relu6",
    "Affine", "ScaledTanh",  # experimental (opset < 10) scalar-attribute activations
)
# f(0) is infinite: channels zeroed upstream become inf/nan here
NOT_ZERO_SAFE = ("Log", "Reciprocal")
BROADCAST = (
    "Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu", "Where",
    "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor", "Mod",
    "BitwiseAnd", "BitwiseOr", "BitwiseXor", "CastLike",
)


# ops whose output is >= 0 whatever their input (statistics of squares, magnitudes)
NON_NEGATIVE = ("Abs", "Sqrt", "ReduceSumSquare", "ReduceL1", "ReduceL2", "Softmax", "Relu", "Sigmoid")
_PASS = ("Cast", "Identity", "ReduceMean", "ReduceSum", "ReduceMax")  # keep the sign of their input


def _non_negative(name, ctx, depth=0) -> bool:
    node = ctx.g.producer.get(name)
    if node is None or depth > 8:
        value = ctx.value(name)
        return value is not None and bool((value >= 0).all())
    if node.op_type in NON_NEGATIVE:
        return True
    if node.op_type == "Pow":  # x ** even constant
        e = ctx.value(node.input[1])
        return e is not None and e.size == 1 and float(e) % 2 == 0
    if node.op_type == "Mul" and node.input[0] == node.input[1]:
        return True
    if node.op_type in _PASS or node.op_type == "Add":
        return all(_non_negative(i, ctx, depth + 1) for i in node.input[: 1 if node.op_type in _PASS else 2])
    return False


def positive(name, ctx) -> bool:
    """`name` is > 0 whatever the channels zeroed upstream: a non-negative value plus a positive
    constant (RMSNorm's Sqrt(ReduceMean(x^2) + eps), Relu(x) + 1), so Div/Reciprocal/Log of it
    stay finite. A zeroed channel may then carry a finite non-zero value (1/sqrt(eps)), which
    is harmless: the group's consumer weights for that channel are zeroed too."""
    node = ctx.g.producer.get(name)
    while node is not None and node.op_type in ("Sqrt", "Cast", "Identity"):
        node = ctx.g.producer.get(node.input[0])
    if node is None or node.op_type != "Add":
        return False
    for eps, rest in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
        value = ctx.value(eps)
        if value is not None and value.size and bool((value > 0).all()) and _non_negative(rest, ctx):
            return True
    return False


@rule(*UNARY, *NOT_ZERO_SAFE)
def unary(node, ctx, res):
    """y = f(x), shape preserved: x[.., k] <-> y[.., k] for every axis k."""
    x, y = node.input[0], node.output[0]
    rank = ctx.rank(x)
    if rank is None:
        return
    if node.op_type == "Identity" and ctx.is_alias(y):  # a copy of a constant: pruned on its own
        res.free.update((t, k) for t in (x, y) for k in range(rank))
        return
    for k in range(rank):
        for out in node.output[:2] if node.op_type == "Dropout" else node.output[:1]:  # + Dropout's mask
            if out:
                res.same((x, k), (out, k), ctx)
        if node.op_type in NOT_ZERO_SAFE and not positive(x, ctx):
            res.mark_nonzi((y, k), f"{node.op_type} of a zeroed channel is not finite")
    for i in node.input[1:]:  # Clip min/max, Dropout ratio: scalars
        res.param(i, ctx)


@rule(*BROADCAST)
def broadcast(node, ctx, res):
    """Inputs right-aligned against the output; equal non-1 axes are the same channels."""
    y = node.output[0]
    out_rank = ctx.rank(y)
    if out_rank is None:
        return
    inputs = node.input[:1] if node.op_type == "CastLike" else node.input
    for idx, x in enumerate(inputs):
        rank = ctx.rank(x)
        if rank is None or not x or rank > out_rank:
            continue
        for k in range(rank):
            res.same((x, k), (y, out_rank - rank + k), ctx)
            if node.op_type in ("Div", "Mod") and idx == 1 and not (node.op_type == "Div" and positive(x, ctx)):
                res.mark_nonzi((x, k), f"zeroing a divisor of {node.op_type} {ctx.label(node)} gives inf/nan")
            if node.op_type == "Pow" and idx == 1:
                res.mark_nonzi((x, k), f"a zeroed exponent of Pow {ctx.label(node)} gives 1, not 0")
    if node.op_type == "CastLike":  # the second input only lends its dtype
        res.free.update((node.input[1], k) for k in range(ctx.rank(node.input[1]) or 0))


@rule("Constant")
def constant(node, ctx, res):
    """A constant is a source: its axes are whatever its consumers make of them."""
    for k in range(ctx.rank(node.output[0]) or 0):
        res.free.add((node.output[0], k))
