"""Normalizations and channel-mixing ops.

    BatchNormalization(x[N,C,..], scale, B, mean, var) -> y     x[:,c] <-> y[:,c] <-> scale[c] <-> ..
    InstanceNormalization(x[N,C,..], scale[C], B[C]) -> y       per channel, spatial axes pinned
    LRN(x) -> y                 channels identity, but each output mixes its neighbours: not exact
    Softmax/LogSoftmax/Hardmax  identity, the reduced axis mixes channels: not exact
    LayerNormalization(x, scale, B; axis) -> y, mean, inv_std_dev
                                x[.., c] <-> y[.., c] <-> scale[c] <-> B[c]; the normalized axes
                                feed the statistics: prunable, not exact (the hidden size)
    RMSNormalization (opset 23)  likewise
"""

from __future__ import annotations

from spa.core.rules import rule


def _same_all(x, y, ctx, res):
    for k in range(ctx.rank(x) or 0):
        res.same((x, k), (y, k), ctx)


@rule("BatchNormalization")
def batchnorm(node, ctx, res):
    x, y = node.input[0], node.output[0]
    _same_all(x, y, ctx, res)
    for p in node.input[1:5]:
        if p:
            res.same((p, 0), (y, 1), ctx)
    res.scale((node.input[1], 0))


@rule("InstanceNormalization")
def instancenorm(node, ctx, res):
    x, y = node.input[0], node.output[0]
    for k in (0, 1):
        res.same((x, k), (y, k), ctx)
    for p in node.input[1:3]:
        res.same((p, 0), (y, 1), ctx)
    res.scale((node.input[1], 0))
    for k in range(2, ctx.rank(x) or 0):
        res.pin((x, k), f"statistics of InstanceNormalization {ctx.label(node)} span this axis")


@rule("LRN")
def lrn(node, ctx, res):
    x, y = node.input[0], node.output[0]
    _same_all(x, y, ctx, res)
    res.mark_nonzi((y, 1), f"LRN {ctx.label(node)} normalises each channel by its neighbours")


@rule("Softmax", "LogSoftmax", "Hardmax")
def softmax(node, ctx, res):
    x, y = node.input[0], node.output[0]
    rank = ctx.rank(x) or 0
    _same_all(x, y, ctx, res)
    default = -1 if ctx.opset >= 13 else 1
    axis = ctx.attr(node, "axis", default) % max(rank, 1)
    mixed = [axis] if ctx.opset >= 13 else range(axis, rank)  # before opset 13: flattened tail
    for k in mixed:
        res.mark_nonzi((y, k), f"{node.op_type} {ctx.label(node)} normalises across this axis")


@rule("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
def layernorm(node, ctx, res):
    x, y = node.input[0], node.output[0]
    rank = ctx.rank(x)
    if rank is None:
        return
    axis = ctx.attr(node, "axis", -1) % rank
    _same_all(x, y, ctx, res)
    for p in node.input[1:3]:
        for k in range(ctx.rank(p) or 0):  # scale/bias broadcast against the normalized axes
            res.same((p, k), (y, rank - (ctx.rank(p) or 0) + k), ctx)
    if len(node.input) > 1 and ctx.rank(node.input[1]) == 1:
        res.scale((node.input[1], 0))
    for stat in node.output[1:3]:  # mean / inv_std_dev: [.., 1, ..] on the normalized axes
        for k in range(ctx.rank(stat) or 0):
            if k < axis:
                res.same((x, k), (stat, k), ctx)
            else:
                res.free.add((stat, k))
    for k in range(axis, rank):
        res.mark_nonzi((y, k), f"{node.op_type} {ctx.label(node)} normalises over this axis "
                       "(its statistics change when channels go)", stats=True)
