"""ONNX Runtime's fused attention of LLM exports (the GenAI model builder, onnxruntime.transformers):
GroupQueryAttention, MultiHeadAttention and RotaryEmbedding.

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


def head_size(heads: int, kv: int, width, *, packed: bool) -> int | None:
    """A GroupQueryAttention's head size from num_heads, kv_num_heads and its query input's last
    axis (`packed`: Q | K | V on it), or None when they do not fit together."""
    if not heads or not kv or heads % kv or not width:
        return None
    per = heads + 2 * kv if packed else heads
    return width // per if width % per == 0 else None


def _dims(node, ctx):
    """(H, K, D, packed) of a GroupQueryAttention whose sizes are known, else None."""
    heads, kv = ctx.attr(node, "num_heads", 0), ctx.attr(node, "kv_num_heads", 0)
    packed = len(node.input) < 2 or not node.input[1]
    d = head_size(heads, kv, ctx.size((node.input[0], 2)), packed=packed)
    return None if d is None else (heads, kv, d, packed)


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


def _rotary(node, ctx, res, head_dim, d, cos_at: int = 7):
    """Position i of the head and its rotation partner share cos/sin column i % (rot/2) (or i // 2
    interleaved): one channel. Past the rotary width (partial rotary) positions stand alone.
    `cos_at`: the cos cache's input slot (sin follows it)."""
    cos, sin = _opt(node, cos_at), _opt(node, cos_at + 1)
    half = ctx.size((cos, 1)) if cos else None
    if half is None or 2 * half > d:
        return  # unknown or inconsistent cache width: the head_dim group reaches a pinned axis
    i = np.arange(2 * half)
    interleaved = ctx.attr(node, "rotary_interleaved", 0) or ctx.attr(node, "interleaved", 0)
    col = i // 2 if interleaved else i % half
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


# ---------------------------------------------------------------- MultiHeadAttention

MHA = f"{MS}:MultiHeadAttention"
MHA_PARTS = ("heads", "head_dim", "v_head_dim")


def _mha(node, ctx):
    """(H, D, Dv) of a MultiHeadAttention with separate rank-3 query, key and value, else None
    (packed QKV or cross-attention caches as key/value stay pinned)."""
    heads = ctx.attr(node, "num_heads", 0)
    q, k, v = (_opt(node, i) for i in range(3))
    if not heads or None in (q, k, v) or any(ctx.rank(t) != 3 for t in (q, k, v)):
        return None
    sizes = [ctx.size((t, 2)) for t in (q, k, v)]
    if None in sizes or sizes[0] != sizes[1] or any(s % heads for s in sizes):
        return None
    return heads, sizes[0] // heads, sizes[2] // heads


def _mha_ties(node):
    o = node.output[0]
    found = [((node.input[0], 2), "q", ("heads", "head_dim")), ((node.input[1], 2), "k", ("heads", "head_dim")),
             ((node.input[2], 2), "v", ("heads", "v_head_dim")), ((o, 2), "out", ("heads", "v_head_dim"))]
    if _opt(node, 3):  # bias [q | k | v]
        found += [((f"{o}::bias_{p}", 0), f"bias_{p}", parts) for p, parts in
                  (("q", ("heads", "head_dim")), ("k", ("heads", "head_dim")), ("v", ("heads", "v_head_dim")))]
    return found


@virtual(MHA)
def mha_spaces(node, ctx):
    dims = _mha(node, ctx)
    if dims is None:
        return {}
    size = dict(zip(MHA_PARTS, dims))
    o = node.output[0]
    spaces = {f"{o}::{p}": (size[p],) for p in MHA_PARTS}
    if _opt(node, 3):
        spaces.update({f"{o}::bias_{p}": (size["heads"] * size[d],) for p, d in
                       (("q", "head_dim"), ("k", "head_dim"), ("v", "v_head_dim"))})
    for _, tag, parts in _mha_ties(node):
        spaces.update({f"{o}::{tag}.{p}": (size[p],) for p in parts})
    return spaces


@rule(MHA)
def multi_head_attention(node, ctx, res):
    """MultiHeadAttention(query, key, value, bias, key_padding_mask, attention_bias, past_key,
    past_value) -> output, present_key, present_value: heads (with their query, key and value
    columns, output rows and cache slices), the query/key head size and the value head size."""
    dims = _mha(node, ctx)
    if dims is None:
        return
    heads, d, dv = dims
    o, q = node.output[0], node.input[0]
    canon = {p: (f"{o}::{p}", 0) for p in MHA_PARTS}
    for whole, tag, parts in _mha_ties(node):
        factors = [(f"{o}::{tag}.{p}", 0) for p in parts]
        res.tie(whole, factors, [ctx.size(f) for f in factors])
        for p, f in zip(parts, factors):
            res.same(f, canon[p], ctx)
    if _opt(node, 3):
        for at, part, n in ((0, "q", heads * d), (heads * d, "k", heads * d), (2 * heads * d, "v", heads * dv)):
            res.couple((f"{o}::bias_{part}", 0), (node.input[3], 0), offset(n, at))
    for t in (node.input[1], node.input[2], o):
        res.same((t, 0), (q, 0), ctx)
    res.same((o, 1), (q, 1), ctx)
    res.same((node.input[2], 1), (node.input[1], 1), ctx)
    for past, present, part in ((6, 1, "head_dim"), (7, 2, "v_head_dim")):
        for t in (_opt(node, past), _opt(node, present, outputs=True)):
            if t is None or ctx.rank(t) != 4:
                continue
            res.same((t, 0), (q, 0), ctx)
            res.free.add((t, 2))
            res.same((t, 1), canon["heads"], ctx)
            res.same((t, 3), canon[part], ctx)
    for i in (4, 5):  # key_padding_mask, attention_bias: batch and lengths (a head axis of the bias stays)
        t = _opt(node, i)
        res.free.update((t, k) for k in range(ctx.rank(t) or 0) if t and not (i == 5 and k == 1))
        if t and i == 5 and ctx.size((t, 1)) == 1:
            res.free.add((t, 1))
    res.param(_opt(node, 8), ctx)  # past_sequence_length


@rewriter(MHA)
def mha_attributes(node, edit):
    o = node.output[0]
    heads, d = edit.new_size((f"{o}::heads", 0)), edit.new_size((f"{o}::head_dim", 0))
    old_d = edit.old_size((f"{o}::head_dim", 0))
    if None in (heads, d, old_d):
        return
    edit.set_attr(node, "num_heads", int(heads))
    if d != old_d and not edit.attr(node, "scale", 0.0):
        edit.set_attr(node, "scale", float(1.0 / np.sqrt(old_d)))


# ---------------------------------------------------------------- RotaryEmbedding

ROPE = f"{MS}:RotaryEmbedding"


def _rope(node, ctx):
    """(layout, heads, head size) of a RotaryEmbedding: "3d" [B, S, H*D] (num_heads given),
    "4d" [B, H, S, D] or [B, S, H, D]; None when unknown."""
    x = node.input[0]
    rank, heads = ctx.rank(x), ctx.attr(node, "num_heads", 0)
    if rank == 3 and heads and ctx.size((x, 2)) and ctx.size((x, 2)) % heads == 0:
        return "3d", heads, ctx.size((x, 2)) // heads
    if rank == 4 and ctx.size((x, 3)):
        return "4d", None, ctx.size((x, 3))
    return None


@virtual(ROPE)
def rope_spaces(node, ctx):
    found = _rope(node, ctx)
    if found is None or found[0] != "3d":
        return {}
    o = node.output[0]
    return {f"{o}::heads": (found[1],), f"{o}::head_dim": (found[2],)}


@rule(ROPE)
def rotary_embedding(node, ctx, res):
    """RotaryEmbedding(input, position_ids, cos_cache, sin_cache) -> output: every axis as it is;
    the head size in rotary pairs with their cos/sin column (as GroupQueryAttention's rotary)."""
    found = _rope(node, ctx)
    if found is None or len(node.input) < 4:
        return
    x, y = node.input[0], node.output[0]
    for k in range(ctx.rank(x)):
        res.same((x, k), (y, k), ctx)
    res.free.update((node.input[1], k) for k in range(ctx.rank(node.input[1]) or 0))
    if found[0] == "3d":
        head_dim = (f"{y}::head_dim", 0)
        res.tie((y, 2), [(f"{y}::heads", 0), head_dim], [found[1], found[2]])
    else:
        head_dim = (y, 3)
    _rotary(node, ctx, res, head_dim, found[2], cos_at=2)


@rewriter(ROPE)
def rope_attributes(node, edit):
    y = node.output[0]
    heads = edit.new_size((f"{y}::heads", 0))
    if heads is not None and edit.attr(node, "num_heads", 0):
        edit.set_attr(node, "num_heads", int(heads))
    half = edit.new_size((node.input[2], 1))
    if half is not None and edit.attr(node, "rotary_embedding_dim", 0):
        edit.set_attr(node, "rotary_embedding_dim", int(2 * half))
