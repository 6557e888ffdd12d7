"""ONNX Runtime's fused attention of LLM exports (the GenAI model builder, onnxruntime.transformers).

    GroupQueryAttention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                        cos_cache, sin_cache, position_ids, attention_bias, head_sink)
        -> output, present_key, present_value, output_qk;  attributes num_heads, kv_num_heads, scale

Query head h reads KV head h // R (R = num_heads / kv_num_heads), so a query-laid axis is the
row-major product [kv_heads, q_per_kv, head_dim], a key- or value-laid axis [kv_heads, head_dim],
and the caches [batch, kv_heads, length, head_dim]. With `key` empty the query input packs
[Q | K | V] on its last axis: each part is a virtual space (spa.core.rules.virtual) offset into it
and tied to its factors. So three kinds of channels prune:

- a KV head: its key and value columns, the R query heads that read it, their output rows, and
  its slice of every cache;
- one query head of each KV group (`q_per_kv`, the same slot in every group: the op needs the
  same R for all of them);
- a head_dim position, in Q, K and V alike (the op has one head size); with `do_rotary` the
  cos/sin caches rotate position i with i + rot/2 (or 2j with 2j + 1 when interleaved): both are
  one channel, with its cos/sin column, so rotary pairs are never split. The cos/sin caches
  are shared by every layer, so the head size is pruned alike in all of them.

Zeroed heads and head positions leave the other heads' outputs as they are, so each kind is
zero-invariant. ONNX Runtime's CPU kernel needs a head size that is a multiple of 16, so the
head size keeps whole steps of 16 (Group.multiple). The rewriter sets `num_heads`, `kv_num_heads` and, when the head size shrinks
and `scale` was the default 1/sqrt(head_size), that scale explicitly. `q_per_kv` is coupled across
every GroupQueryAttention of the model: the runtime's config (genai_config.json) holds one head count.
"""

from __future__ import annotations

import numpy as np

from spa.core.rules import offset, rewriter, rule, virtual

MS = "com.microsoft"
GQA = f"{MS}:GroupQueryAttention"
PARTS = ("kv_heads", "q_per_kv", "head_dim")
HEAD_MULTIPLE = 16  # ONNX Runtime's CPU kernel: "head_size shall be a multiple of 16" (1.32)


def _dims(node, ctx):
    """(H, K, D, packed) of a GroupQueryAttention whose sizes are known, else None."""
    heads, kv = ctx.attr(node, "num_heads", 0), ctx.attr(node, "kv_num_heads", 0)
    width = ctx.size((node.input[0], 2))
    packed = len(node.input) < 2 or not node.input[1]
    if not heads or not kv or heads % kv or width is None:
        return None
    per = heads + 2 * kv if packed else heads
    return (heads, kv, width // per, packed) if width % per == 0 else None


def _opt(node, i, outputs=False):
    names = node.output if outputs else node.input
    return names[i] if len(names) > i and names[i] else None


def _ties(node, dims):
    """[(whole space, tag, parts)]: the axes laid out as heads x head_dim, and their factors."""
    _, _, _, packed = dims
    o = node.output[0]
    q, k, v = ((f"{o}::q", 0), (f"{o}::k", 0), (f"{o}::v", 0)) if packed else \
        ((node.input[0], 2), (node.input[1], 2), (node.input[2], 2))
    found = [(q, "q", PARTS), (k, "k", ("kv_heads", "head_dim")), (v, "v", ("kv_heads", "head_dim")),
             ((o, 2), "out", PARTS)]
    if _opt(node, 11):
        found.append(((node.input[11], 0), "sink", PARTS[:2]))
    if _opt(node, 3, outputs=True):
        found.append(((node.output[3], 1), "qk", PARTS[:2]))
    return found


def _uniform(node, dims):
    """The model-wide space every GroupQueryAttention's q_per_kv is coupled to (one config value)."""
    heads, kv, _, _ = dims
    return f"::GroupQueryAttention.q_per_kv.{heads // kv}"


@virtual(GQA)
def gqa_spaces(node, ctx):
    dims = _dims(node, ctx)
    if dims is None:
        return {}
    heads, kv, d, packed = dims
    o = node.output[0]
    size = {"kv_heads": kv, "q_per_kv": heads // kv, "head_dim": d}
    spaces = {f"{o}::{p}": (size[p],) for p in PARTS}
    spaces[_uniform(node, dims)] = (heads // kv,)
    if packed:
        spaces.update({f"{o}::q": (heads * d,), f"{o}::k": (kv * d,), f"{o}::v": (kv * d,)})
    for _, tag, parts in _ties(node, dims):
        spaces.update({f"{o}::{tag}.{p}": (size[p],) for p in parts})
    return spaces


@rule(GQA)
def group_query_attention(node, ctx, res):
    dims = _dims(node, ctx)
    if dims is None:
        return  # sizes unknown or inconsistent: every axis stays pinned
    heads, kv, d, packed = dims
    o, q = node.output[0], node.input[0]
    canon = {p: (f"{o}::{p}", 0) for p in PARTS}
    if packed:
        for at, part in ((0, "q"), (heads * d, "k"), ((heads + kv) * d, "v")):
            n = (heads if part == "q" else kv) * d
            res.couple((f"{o}::{part}", 0), (q, 2), offset(n, at))
    for whole, tag, parts in _ties(node, dims):
        factors = [(f"{o}::{tag}.{p}", 0) for p in parts]
        res.tie(whole, factors, [ctx.size(f) for f in factors])
        for p, f in zip(parts, factors):
            res.same(f, canon[p], ctx)
    res.same(canon["q_per_kv"], (_uniform(node, dims), 0), ctx)
    for t in [q, o] + ([node.input[1], node.input[2]] if not packed else []):
        res.same((t, 0), (q, 0), ctx)
        res.same((t, 1), (q, 1), ctx)
    for past, present in ((3, 1), (4, 2)):  # the caches: [batch, kv_heads, length, head_dim]
        for t in (_opt(node, past), _opt(node, present, outputs=True)):
            if t is None or ctx.rank(t) != 4:
                continue
            res.same((t, 0), (q, 0), ctx)
            res.free.add((t, 2))
            for axis, part in ((1, "kv_heads"), (3, "head_dim")):
                if ctx.size((t, axis)) is None:
                    res.free.add((t, axis))  # symbolic (the builder's 'kv_cache_dim'): follows at run time
                else:
                    res.same((t, axis), canon[part], ctx)
    for i in (5, 6):  # seqlens_k, total_sequence_length
        res.param(_opt(node, i), ctx)
    for i in (9, 10):  # position_ids, attention_bias: batch and lengths (a head axis of the bias stays)
        t = _opt(node, i)
        res.free.update((t, k) for k in range(ctx.rank(t) or 0) if t and not (i == 10 and k == 1))
        if t and i == 10 and ctx.size((t, 1)) == 1:
            res.free.add((t, 1))
    res.multiple(canon["head_dim"], HEAD_MULTIPLE)
    if ctx.attr(node, "do_rotary", 0):
        _rotary(node, ctx, res, canon["head_dim"], d)


def _rotary(node, ctx, res, head_dim, d):
    """Position i of the head and its rotation partner share cos/sin column i % (rot/2) (or i // 2
    interleaved): one channel. Past the rotary width (partial rotary) positions stand alone."""
    cos, sin = _opt(node, 7), _opt(node, 8)
    half = ctx.size((cos, 1)) if cos else None
    if half is None or 2 * half > d:
        return  # unknown or inconsistent cache width: the head_dim group reaches a pinned axis
    i = np.arange(2 * half)
    col = i // 2 if ctx.attr(node, "rotary_interleaved", 0) else i % half
    for t in (cos, sin):
        res.couple(head_dim, (t, 1), np.stack([i, col], 1))
        res.free.add((t, 0))


@rewriter(GQA)
def gqa_attributes(node, edit):
    o = node.output[0]
    kv, per, d = (edit.new_size((f"{o}::{p}", 0)) for p in PARTS)
    old_d = edit.old_size((f"{o}::head_dim", 0))
    if None in (kv, per, d, old_d):
        return
    edit.set_attr(node, "num_heads", int(kv * per))
    edit.set_attr(node, "kv_num_heads", int(kv))
    if d != old_d and not edit.attr(node, "scale", 0.0):
        edit.set_attr(node, "scale", float(1.0 / np.sqrt(old_d)))  # the default read the old head size
