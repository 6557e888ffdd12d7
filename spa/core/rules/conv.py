"""Convolutions: output channels are weight rows, input channels are weight columns.

    Conv(x[N,C,..], W[M,C/g,..], B[M]) -> y[N,M,..]
      g == 1          x[:,c] <-> W[:,c]          y[:,m] <-> W[m] <-> B[m]
      depthwise       x[:,c] <-> y[:, c*k:(c+1)*k] (k = M/g): whole groups go, `group` is rewritten
      grouped (C/g>1) x[:,c] <-> W[:, c % (C/g)]  y[:,m] ~ y[:, m % (M/g)]: the same slot of every
                      group goes, so groups stay balanced and `group` is unchanged
    ConvTranspose(x[N,C,..], W[C,M/g,..], B[M]) -> y[N,M,..]: the same with W's axes swapped.
    Spatial axes of x and y are pinned (their sizes follow from the kernel). Channel counts
    come from W, so a Conv after an op with unknown output shape still couples its output.
"""

from __future__ import annotations

from spa.core.rules import block, modulo, rewriter, rule
from spa.core.rules.zeros import check_contraction


@rule("Conv", "ConvTranspose")
def conv(node, ctx, res):
    x, w, y = node.input[0], node.input[1], node.output[0]
    b = node.input[2] if len(node.input) > 2 else ""
    shape_w = ctx.shape(w)
    if shape_w is None or None in shape_w[:2]:
        return
    g = ctx.attr(node, "group", 1)
    # sizes from the weight: activations may have unknown shapes (e.g. after a custom op)
    if node.op_type == "Conv":
        c_in, m_out = shape_w[1] * g, shape_w[0]
    else:
        c_in, m_out = shape_w[0], shape_w[1] * g
    res.same((x, 0), (y, 0), ctx)
    if b:
        res.same((b, 0), (y, 1), ctx)
    # W's "full" axis spans all channels of one activation, its "part" axis one group's share
    full, part = ((y, x) if node.op_type == "Conv" else (x, y))
    n_full, n_part = (m_out, c_in) if node.op_type == "Conv" else (c_in, m_out)
    res.same((full, 1), (w, 0), ctx)
    if g > 1 and c_in == g:
        res.couple((x, 1), (y, 1), block(c_in, m_out // g))
        res.free.add((w, 1))
    else:
        res.couple((part, 1), (w, 1), modulo(n_part, n_part // g))
        if g == 1:
            res.read((w, 0 if node.op_type == "ConvTranspose" else 1), (x, 1))
            check_contraction(res, ctx, weight=(w, 0 if node.op_type == "ConvTranspose" else 1), activation=(x, 1))
        if g > 1:
            res.couple((full, 1), (full, 1), modulo(n_full, n_full // g))
    for t in (x, y):
        for k in range(2, ctx.rank(t) or 0):
            res.pin((t, k), f"spatial axis of {node.op_type} {ctx.label(node)}")


@rewriter("Conv", "ConvTranspose")
def conv_group(node, edit):
    """Depthwise convs lose whole groups: `group` follows the kept input channels."""
    g = edit.attr(node, "group", 1)
    c_in = edit.old_size((node.input[0], 1))
    if g > 1 and g == c_in:
        edit.set_attr(node, "group", edit.new_size((node.input[0], 1)))

