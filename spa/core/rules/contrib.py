"""ONNX Runtime contrib ops (domain com.microsoft) that `onnxruntime.transformers` fusion writes.

    FastGelu(x, bias) / BiasGelu(x, bias) / Gelu / QuickGelu / BiasAdd(x, bias, skip)
                         elementwise with broadcasting: x[.., c] <-> bias[c] <-> y[.., c]
    SkipLayerNormalization(x, skip, gamma, beta, bias) -> y, mean, inv_std, x + skip + bias
    SkipSimplifiedLayerNormalization (RMS)
                         x, skip, y and the sum share every axis; gamma/beta/bias follow the
                         last axis, whose statistics make it the hidden size (prunable, not exact)

    MatMulNBits(A[.., K], B[N, blocks, blob], scales, zero_points, g_idx, bias) -> Y[.., N]
                         block-quantized weights (ONNX Runtime GenAI's int4): an output channel n
                         is row n of B, scales, zero points and bias; input channels go in whole
                         quantization blocks (A[b*block_size : (b+1)*block_size] <-> B[:, b] <->
                         scales[:, b]), so a block is one channel. Refused (pinned, with the
                         reason): 4-bit zero points (two blocks share a byte), g_idx (act-order).
                         The codes carry no magnitude: criteria score the scales.

The fused `Attention`, `EmbedLayerNormalization` and `MultiHeadAttention` ops keep no rule:
their head count is an attribute tied to packed QKV weights and KV caches; they stay
barriers, and the groups that reach them say so.
"""

from __future__ import annotations

from spa.core.rules import block, rewriter, rule
from spa.core.rules.elementwise import broadcast

MS = "com.microsoft"

rule(*(f"{MS}:{op}" for op in ("FastGelu", "BiasGelu", "Gelu", "QuickGelu", "BiasAdd")))(broadcast)


@rule(f"{MS}:SkipLayerNormalization", f"{MS}:SkipSimplifiedLayerNormalization")
def skip_layernorm(node, ctx, res):
    x, y = node.input[0], node.output[0]
    rank = ctx.rank(x)
    if rank is None:
        return
    full = [node.input[1]] + [o for o in node.output[3:4] if o]  # skip; input + skip + bias
    for k in range(rank):
        res.same((x, k), (y, k), ctx)
        for t in full:
            if ctx.rank(t) == rank:
                res.same((t, k), (y, k), ctx)
    for p in node.input[2:5]:  # gamma, beta, bias: [hidden]
        if p:
            res.same((p, 0), (y, rank - 1), ctx)
    for stat in node.output[1:3]:  # mean, inv_std_var: [.., 1]
        for k in range(ctx.rank(stat) or 0):
            if k < rank - 1:
                res.same((x, k), (stat, k), ctx)
            else:
                res.free.add((stat, k))
    res.mark_nonzi((y, rank - 1), f"{node.op_type} {ctx.label(node)} normalises over this axis "
                   "(its statistics change when channels go)", stats=True)


@rule(f"{MS}:MatMulNBits")
def matmul_nbits(node, ctx, res):
    a, b, y = node.input[0], node.input[1], node.output[0]
    r = ctx.rank(a)
    n, k, bs = ctx.attr(node, "N", 0), ctx.attr(node, "K", 0), ctx.attr(node, "block_size", 0)
    if r is None or ctx.rank(y) != r or ctx.rank(b) != 3 or not bs or ctx.size((b, 0)) != n:
        return
    for ax in range(r - 1):
        res.same((a, ax), (y, ax), ctx)
    res.same((y, r - 1), (b, 0), ctx)
    res.free.add((b, 2))
    blocks = ctx.size((b, 1))
    pairs = block(blocks, bs)
    res.couple((b, 1), (a, r - 1), pairs[pairs[:, 1] < k])
    scales, zp = (node.input[i] if len(node.input) > i and node.input[i] else None for i in (2, 3))
    for t in (scales, zp):
        if t is None:
            continue
        if ctx.rank(t) == 2:
            res.same((t, 0), (b, 0), ctx)
            if t == scales or ctx.size((t, 1)) == blocks:
                res.same((t, 1), (b, 1), ctx)
            else:
                res.free.add((t, 1))
                res.pin((b, 1), f"MatMulNBits {ctx.label(node)} packs the zero points of several blocks in a byte")
        elif ctx.rank(t) == 1 and ctx.size((t, 0)) == n * blocks:
            res.tie((t, 0), [(b, 0), (b, 1)], [n, blocks])
        elif ctx.rank(t) == 1 and ctx.size((t, 0)) and ctx.size((t, 0)) % n == 0:
            res.couple((b, 0), (t, 0), block(n, ctx.size((t, 0)) // n))
            res.pin((b, 1), f"MatMulNBits {ctx.label(node)} packs the zero points of several blocks in a byte")
    if len(node.input) > 4 and node.input[4]:
        res.pin((a, r - 1), f"MatMulNBits {ctx.label(node)} reorders its inputs (g_idx, act-order)")
    if len(node.input) > 5 and node.input[5]:
        res.same((node.input[5], 0), (y, r - 1), ctx)


@rewriter(f"{MS}:MatMulNBits")
def matmul_nbits_sizes(node, edit):
    r = len(edit.old_shape(node.input[0]) or ())
    k, n = edit.new_size((node.input[0], r - 1)), edit.new_size((node.output[0], r - 1))
    if k is not None:
        edit.set_attr(node, "K", int(k))
    if n is not None:
        edit.set_attr(node, "N", int(n))
