"""Matrix products: the contracted axis couples both operands, free axes follow to the output.

    Gemm(A[M,K], B[K,N], C) -> Y[M,N]     A[:,k] <-> B[k]   Y[:,n] <-> B[:,n] <-> C[.., n]
                                          (transA/transB swap the axes of A/B)
    MatMul(A[..,M,K], B[..,K,N]) -> Y[..,M,N]   batch axes broadcast; 1-D operands as in numpy
"""

from __future__ import annotations

from spa.core.rules import rule
from spa.core.rules.zeros import check_contraction


@rule("Gemm")
def gemm(node, ctx, res):
    a, b, y = node.input[0], node.input[1], node.output[0]
    if ctx.rank(a) != 2 or ctx.rank(b) != 2 or ctx.rank(y) != 2:
        return
    ta, tb = ctx.attr(node, "transA", 0), ctx.attr(node, "transB", 0)
    a_m, a_k = (1, 0) if ta else (0, 1)
    b_k, b_n = (1, 0) if tb else (0, 1)
    res.same((a, a_m), (y, 0), ctx)
    res.same((a, a_k), (b, b_k), ctx)
    res.read((b, b_k), (a, a_k))
    check_contraction(res, ctx, weight=(b, b_k), activation=(a, a_k))
    check_contraction(res, ctx, weight=(a, a_k), activation=(b, b_k))
    res.same((b, b_n), (y, 1), ctx)
    if len(node.input) > 2 and node.input[2]:
        c = node.input[2]
        rank = ctx.rank(c) or 0
        for k in range(rank):
            res.same((c, k), (y, 2 - rank + k), ctx)


@rule("MatMul")
def matmul(node, ctx, res):
    a, b, y = node.input[0], node.input[1], node.output[0]
    ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
    if ra is None or rb is None or ry is None:
        return
    res.same((a, ra - 1), (b, max(rb - 2, 0)), ctx)
    res.read((b, max(rb - 2, 0)), (a, ra - 1))
    check_contraction(res, ctx, weight=(b, max(rb - 2, 0)), activation=(a, ra - 1))
    check_contraction(res, ctx, weight=(a, ra - 1), activation=(b, max(rb - 2, 0)))
    if ra >= 2:
        res.same((a, ra - 2), (y, ry - 2 if rb >= 2 else ry - 1), ctx)
    if rb >= 2:
        res.same((b, rb - 1), (y, ry - 1), ctx)
    batch_y = ry - (ra >= 2) - (rb >= 2)
    for x, r in ((a, ra), (b, rb)):
        nb = max(r - 2, 0)
        for k in range(nb):
            res.same((x, k), (y, batch_y - nb + k), ctx)
