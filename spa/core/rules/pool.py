"""Pooling, reductions, padding and resizing: channels pass straight through.

    MaxPool(x[N,C,H,W]) -> y[N,C,h,w]        x[:,c] <-> y[:,c], spatial axes pinned
    GlobalAveragePool(x) -> y[N,C,1,1]       likewise
    ReduceMean(x, axes) -> y                 kept axes identity; a reduced channel axis mixes
                                             channels (mean over fewer): not exact (statistics);
                                             ReduceSum/SumSquare/L1/L2 over zeros: exact
    Pad(x, pads) -> y                        axes with zero padding identity, others pinned
    Resize(x, roi, scales, sizes) -> y       axes with scale 1 (or size == input) identity
"""

from __future__ import annotations

from spa.core.graph import DimRef
from spa.core.rules import rule
from spa.core.rules.shape import shape_entries
from spa.core.rules.zeros import nonzero_cause

POOLS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
         "MaxRoiPool", "Crop")  # Crop: the experimental spatial crop of CoreML/WinML exports
REDUCES = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
# zeroed entries add nothing to these: removing them is exact
ZERO_SAFE_REDUCES = ("ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2")


@rule(*POOLS)
def pool(node, ctx, res):
    x = node.input[0]
    for y in [o for o in node.output if o]:  # MaxPool's Indices output too
        for k in (0, 1):
            res.same((x, k), (y, k), ctx)
        for k in range(2, ctx.rank(x) or 0):
            res.pin((x, k), f"spatial axis of {node.op_type} {ctx.label(node)}")
            res.pin((y, k), f"spatial axis of {node.op_type} {ctx.label(node)}")


def _reduce_axes(node, ctx, rank):
    axes = ctx.attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = ctx.value(node.input[1])
        if value is None:
            return None
        axes = value.reshape(-1).tolist()
    if not axes:
        return [] if ctx.attr(node, "noop_with_empty_axes", 0) else list(range(rank))
    return sorted(int(a) % rank for a in axes)


@rule(*REDUCES)
def reduce(node, ctx, res):
    x, y = node.input[0], node.output[0]
    rank = ctx.rank(x)
    axes = None if rank is None else _reduce_axes(node, ctx, rank)
    if axes is None:
        return
    keep = ctx.attr(node, "keepdims", 1)
    j = 0
    for k in range(rank):
        if k in axes:
            res.free.add((x, k))
            if node.op_type == "ReduceMean":  # RMSNorm's mean of squares, LayerNorm's mean
                res.mark_nonzi((x, k), f"ReduceMean {ctx.label(node)} averages over this axis", stats=True)
            elif node.op_type not in ZERO_SAFE_REDUCES:
                res.mark_nonzi((x, k), f"{node.op_type} {ctx.label(node)} reduces over this axis")
            elif cause := nonzero_cause(x, k, ctx):  # zeros add nothing to a sum: are they zeros?
                res.mark_nonzi((x, k), f"{node.op_type} {ctx.label(node)} sums over this axis, where zeroed "
                               f"channels are not zero ({cause})")
            j += keep
            continue
        res.same((x, k), (y, j), ctx)
        j += 1
    res.param(node.input[1] if len(node.input) > 1 else "", ctx)


def _pads(node, ctx):
    if len(node.input) > 1 and node.input[1]:
        value = ctx.value(node.input[1])
        return None if value is None else value.reshape(-1).tolist()
    return ctx.attr(node, "pads", None) or ctx.attr(node, "paddings", None)


@rule("Pad")
def pad(node, ctx, res):
    x, y = node.input[0], node.output[0]
    rank, pads = ctx.rank(x), _pads(node, ctx)
    if rank is None or pads is None:
        return
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        value = ctx.value(node.input[3])
        if value is None:
            return
        axes = [int(a) % rank for a in value.reshape(-1)]
    padded = {a for i, a in enumerate(axes) if pads[i] != 0 or pads[i + len(axes)] != 0}
    for k in range(rank):
        if k not in padded:
            res.same((x, k), (y, k), ctx)
    for name in node.input[1:]:
        res.param(name, ctx)


def _full(values, axes, rank, fill):
    """Resize-18 `axes`: scales/sizes listed for some axes only; the others keep `fill`."""
    if values is None or axes is None:
        return values
    out = list(fill)
    for a, v in zip(axes, values):
        out[a % rank] = v
    return out


def _scales(node, ctx):
    if node.op_type == "Upsample" and len(node.input) < 2:
        return ctx.attr(node, "scales", None)
    idx = 1 if node.op_type == "Upsample" or ctx.opset < 11 else 2
    if len(node.input) > idx and node.input[idx]:
        value = ctx.value(node.input[idx])
        return None if value is None or value.size == 0 else value.reshape(-1).tolist()
    return None


@rule("Resize", "Upsample")
def resize(node, ctx, res):
    x, y = node.input[0], node.output[0]
    rank = ctx.rank(x)
    if rank is None:
        return
    axes = ctx.attr(node, "axes", None)
    scales = _full(_scales(node, ctx), axes, rank, [1.0] * rank)
    sizes_name = node.input[3] if node.op_type == "Resize" and len(node.input) > 3 else ""
    if scales is not None:
        for k in range(rank):
            if scales[k] == 1:
                res.same((x, k), (y, k), ctx)
    elif sizes_name:
        entries = _full(ctx.shape_value(sizes_name), axes, rank, [DimRef(x, k) for k in range(rank)])
        if entries is not None and len(entries) == rank:
            for k in (0, 1):
                if entries[k] == ctx.shape(x)[k]:
                    res.same((x, k), (y, k), ctx)
            shape_entries(node, sizes_name, y, entries=entries, ctx=ctx, res=res, skip=lambda j: j >= 2)
    for name in node.input[1:]:
        res.param(name, ctx)
    for k in range(2, rank):
        res.pin((y, k), f"spatial axis of {node.op_type} {ctx.label(node)}")


