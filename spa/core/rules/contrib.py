"""ONNX Runtime contrib ops (domain com.microsoft) that `onnxruntime.transformers` fusion writes.

    FastGelu(x, bias) / BiasGelu(x, bias) / Gelu / QuickGelu / BiasAdd(x, bias, skip)
                         elementwise with broadcasting: x[.., c] <-> bias[c] <-> y[.., c]
    SkipLayerNormalization(x, skip, gamma, beta, bias) -> y, mean, inv_std, x + skip + bias
    SkipSimplifiedLayerNormalization (RMS)
                         x, skip, y and the sum share every axis; gamma/beta/bias follow the
                         last axis, whose statistics make it the hidden size (prunable, not exact)

The fused `Attention`, `EmbedLayerNormalization` and `MultiHeadAttention` ops keep no rule:
their head count is an attribute tied to packed QKV weights and KV caches; they stay
barriers, and the groups that reach them say so.
"""

from __future__ import annotations

from spa.core.rules import rule
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
