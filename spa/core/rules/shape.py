"""Layout ops: channels move between axes or tensors, and shape constants follow them.

    Transpose(x, perm) -> y        x[perm[i]] <-> y[i]
    Squeeze/Unsqueeze              the remaining axes, in order
    Concat(a, b; axis) -> y        a[i] <-> y[i], b[i] <-> y[len(a) + i]         (offset)
    Split(x; axis) -> y0, y1       y_k[i] <-> x[off_k + i]                       (window)
    Slice(x; step 1) -> y          y[i] <-> x[start + i]; positions outside are free
    Gather(x, const idx; axis)     y[j] <-> x[idx[j]]
    Reshape/Flatten(x) -> y        axes grouped by equal products; a merged axis is tied to its
                                   factors (a position is a cell, removed with any factor):
                                   [B,S,H*D] -> [B,S,H,D]: heads and head_dim both prunable;
                                   [N,C,H,W] -> [N,C*H*W]: x[:,c] <-> y[:, c*H*W:(c+1)*H*W]
    Expand/ConstantOfShape/Reshape shape entries: `Shape(t)[a]` couples t[a] with the output axis;
                                   literals in constant shapes are rewritten when pruned.
"""

from __future__ import annotations

import numpy as np

from spa.core.graph import DimProd, DimRef, literal_sources
from spa.core.rules import offset, rewriter, rule

SHAPE_ARITH = ("Gather", "Concat", "Unsqueeze", "Squeeze", "Cast", "Identity", "Slice", "Mul", "Equal", "Where")
SHAPE_SINKS = {("Reshape", 1), ("Expand", 1), ("ConstantOfShape", 0), ("Resize", 3)}


@rule("Transpose")
def transpose(node, ctx, res):
    x, y = node.input[0], node.output[0]
    rank = ctx.rank(x)
    if rank is None:
        return
    perm = ctx.attr(node, "perm", None) or list(reversed(range(rank)))
    for i, p in enumerate(perm):
        res.same((x, p), (y, i), ctx)


def _axes(node, ctx, idx=1):
    axes = ctx.attr(node, "axes", None)
    if axes is None and len(node.input) > idx and node.input[idx]:
        value = ctx.value(node.input[idx])
        return None if value is None else [int(a) for a in value.reshape(-1)]
    return axes


@rule("Squeeze", "Unsqueeze")
def squeeze(node, ctx, res):
    x, y = node.input[0], node.output[0]
    rx, ry = ctx.rank(x), ctx.rank(y)
    if rx is None or ry is None:
        return
    axes = _axes(node, ctx)
    if node.op_type == "Squeeze":
        gone = {a % rx for a in axes} if axes else {k for k, d in enumerate(ctx.shape(x)) if d == 1}
        kept_x, kept_y = [k for k in range(rx) if k not in gone], list(range(ry))
    else:
        if axes is None:
            return
        new = {a % ry for a in axes}
        kept_x, kept_y = list(range(rx)), [k for k in range(ry) if k not in new]
    for a, b in zip(kept_x, kept_y):
        res.same((x, a), (y, b), ctx)
    res.param(node.input[1] if len(node.input) > 1 else "", ctx)


def _pieces(res, ctx, whole, parts, axis, rank):
    """`parts` laid end to end along `axis` make `whole` (Concat inputs, Split outputs)."""
    sizes = [(ctx.shape(part) or [None] * rank)[axis] for part in parts]
    unknown_split = None in sizes and res.node.op_type == "Split"
    if unknown_split:  # its rewriter could not state every new size
        for space in [(whole, axis)] + [(p, axis) for p in parts]:
            res.pin(space, f"split into pieces of unknown size by Split {ctx.label(res.node)}")
    start = 0
    for part, size in zip(parts, sizes):
        for k in range(rank):  # the other axes match whatever the pieces' lengths (a KV cache grows on one)
            if k != axis:
                res.same((part, k), (whole, k), ctx)
        if start is None or size is None:
            start = None  # offsets past a piece of unknown length are unknown: those axes stay pinned
            continue
        if size > 0 and not unknown_split:
            res.couple((part, axis), (whole, axis), offset(size, start))
        start += size


@rule("Concat")
def concat(node, ctx, res):
    y = node.output[0]
    rank = ctx.rank(y)
    if rank is not None:
        _pieces(res, ctx, y, node.input, ctx.attr(node, "axis", 0) % rank, rank)


@rule("Split")
def split(node, ctx, res):
    x = node.input[0]
    rank = ctx.rank(x)
    if rank is not None:
        _pieces(res, ctx, x, node.output, ctx.attr(node, "axis", 0) % rank, rank)
    res.param(node.input[1] if len(node.input) > 1 else "", ctx)


@rewriter("Split")
def split_sizes(node, edit):
    rank = len(edit.old_shape(node.input[0]))
    axis = edit.attr(node, "axis", 0) % rank
    sizes = [edit.new_size((y, axis)) for y in node.output]
    if sizes == [edit.old_size((y, axis)) for y in node.output]:
        return
    if edit.opset >= 13:
        edit.del_attr(node, "num_outputs")
        edit.set_input_const(node, 1, np.array(sizes, dtype=np.int64))
    else:
        edit.set_attr(node, "split", sizes)


def _slice_params(node, ctx):
    """(starts, ends, axes, steps) as lists, or None when not constant."""
    if len(node.input) == 1:
        starts, ends = ctx.attr(node, "starts", None), ctx.attr(node, "ends", None)
        axes = ctx.attr(node, "axes", None) or list(range(len(starts)))
        return starts, ends, axes, [1] * len(starts)
    vals = [ctx.value(n) if n else None for n in list(node.input[1:5]) + [""] * (5 - len(node.input))]
    if vals[0] is None or vals[1] is None or (node.input[3:4] and node.input[3] and vals[2] is None):
        return None
    starts, ends = vals[0].reshape(-1).tolist(), vals[1].reshape(-1).tolist()
    axes = vals[2].reshape(-1).tolist() if vals[2] is not None else list(range(len(starts)))
    steps = vals[3].reshape(-1).tolist() if vals[3] is not None else [1] * len(starts)
    if len(node.input) > 4 and node.input[4] and vals[3] is None:
        return None
    return starts, ends, axes, steps


def _window(start, end, size):
    start = max(0, min(size, start + size if start < 0 else start))
    end = max(0, min(size, end + size if end < 0 else end))
    return start, max(start, end)


@rule("Slice")
def slice_(node, ctx, res):
    x, y = node.input[0], node.output[0]
    rank, params = ctx.rank(x), _slice_params(node, ctx)
    if rank is None:
        return
    if params is None:  # a window computed at run time (rotary halves: x[..., :d // 2])
        axes = _computed_slice_axes(node, ctx, rank)
        for k in range(rank) if axes is not None else ():
            if k in axes:
                res.pin((x, k), f"sliced by Slice {ctx.label(node)} at positions computed at run time")
                res.pin((y, k), f"sliced by Slice {ctx.label(node)} at positions computed at run time")
            else:
                res.same((x, k), (y, k), ctx)
        for name in node.input[1:]:
            res.param(name, ctx)
        return
    starts, ends, axes, steps = params
    sliced = {int(a) % rank: i for i, a in enumerate(axes)}
    for k in range(rank):
        if k not in sliced:
            res.same((x, k), (y, k), ctx)
            continue
        i, size = sliced[k], ctx.shape(x)[k]
        if steps[i] != 1 or size is None:
            continue
        start, end = _window(int(starts[i]), int(ends[i]), size)
        if end > start:
            res.couple((y, k), (x, k), offset(end - start, start))
        else:
            res.free.add((x, k))
    for name in node.input[1:]:
        res.param(name, ctx)


def _computed_slice_axes(node, ctx, rank):
    if len(node.input) == 1:
        return None
    if len(node.input) > 3 and node.input[3]:
        axes = ctx.value(node.input[3])
        return None if axes is None else {int(a) % rank for a in axes.reshape(-1)}
    starts = ctx.shape(node.input[1])
    return set(range(starts[0])) if starts and starts[0] is not None else None


@rewriter("Slice")
def slice_window(node, edit):
    params = _slice_params(node, edit)
    if params is None:  # computed window: its axes are pinned, nothing to rewrite
        return
    starts, ends, axes, _steps = params
    rank = len(edit.old_shape(node.input[0]) or ())
    changed = False
    for i, a in enumerate(axes):
        k = int(a) % max(rank, 1)
        kept = edit.kept((node.input[0], k))
        if kept is None:
            continue
        start, end = _window(int(starts[i]), int(ends[i]), edit.old_size((node.input[0], k)))
        # the window keeps the kept positions inside it, whether or not the output's size is known
        starts[i] = int(np.searchsorted(kept, start))
        ends[i] = starts[i] + int(np.count_nonzero((kept >= start) & (kept < end)))
        changed = True
    if not changed:
        return
    if len(node.input) == 1:
        edit.set_attr(node, "starts", starts)
        edit.set_attr(node, "ends", ends)
    else:
        dtype = edit.value(node.input[1]).dtype
        edit.set_input_const(node, 1, np.array(starts, dtype=dtype))
        edit.set_input_const(node, 2, np.array(ends, dtype=dtype))


@rule("Gather")
def gather(node, ctx, res):
    x, idx, y = node.input[0], node.input[1], node.output[0]
    rank, ind = ctx.rank(x), ctx.value(idx)
    if rank is None or ctx.rank(y) is None:
        return
    axis = ctx.attr(node, "axis", 0) % rank
    ir = ctx.rank(idx) or 0
    for k in range(rank):
        if k != axis:
            res.same((x, k), (y, k if k < axis else k + ir - 1), ctx)
    if ind is None or ind.ndim > 1 or ctx.shape(x)[axis] is None:
        return
    pos = ind.reshape(-1).astype(np.int64) % ctx.shape(x)[axis]
    if ind.ndim == 0:
        res.pin((x, axis), f"one channel is picked by Gather {ctx.label(node)}", positions=pos)
    else:
        res.couple((y, axis), (x, axis), np.stack([np.arange(len(pos)), pos], 1))
    res.param(idx, ctx)


@rewriter("Gather")
def gather_indices(node, edit):
    rank = len(edit.old_shape(node.input[0]))
    axis = edit.attr(node, "axis", 0) % rank
    kept = edit.kept((node.input[0], axis))
    ind = edit.value(node.input[1])
    if kept is None or ind is None:
        return
    pos = ind.reshape(-1).astype(np.int64) % edit.old_size((node.input[0], axis))
    remap = np.searchsorted(kept, pos[np.isin(pos, kept)])
    edit.set_input_const(node, 1, remap.reshape(ind.shape if ind.ndim == 0 else (-1,)).astype(ind.dtype))


# ---------------------------------------------------------------- reshape


def align(sx, sy):
    """Group axes of two shapes with equal products: [([in axes], [out axes]), ...] or None."""
    i = j = 0
    groups = []
    while i < len(sx) or j < len(sy):
        if i < len(sx) and j < len(sy) and sx[i] is None and sy[j] is None:
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        ins, outs, pi, pj = [], [], 1, 1
        while True:
            if (pi < pj or not ins) and i < len(sx):
                if sx[i] is None:
                    return None
                pi, i = pi * sx[i], i + 1
                ins.append(i - 1)
            elif (pj < pi or not outs) and j < len(sy):
                if sy[j] is None:
                    return None
                pj, j = pj * sy[j], j + 1
                outs.append(j - 1)
            else:
                break
            if pi == pj and ins and outs:
                break
        while i < len(sx) and sx[i] == 1:
            ins, i = ins + [i], i + 1
        while j < len(sy) and sy[j] == 1:
            outs, j = outs + [j], j + 1
        if pi != pj or not (ins or outs):
            return None
        groups.append((ins, outs))
    return groups


def _digits(dims, which):
    """For every flat position of a row-major block `dims`, its coordinate along `which`."""
    inner = int(np.prod(dims[which + 1:], dtype=np.int64))
    return (np.arange(int(np.prod(dims, dtype=np.int64))) // inner) % dims[which]


def _product(res, ctx, whole, parts, shape):
    """The one-axis side `whole` is the product of the axes `parts` (heads x head_dim, C x H x W)."""
    dims = [shape[a] for _, a in parts]
    res.tie(whole, parts, dims)


@rule("Reshape", "Flatten")
def reshape(node, ctx, res):
    x, y = node.input[0], node.output[0]
    sx, sy = ctx.shape(x), ctx.shape(y)
    if sx is None or sy is None:
        return
    groups = align(sx, sy)
    if groups is None:
        groups, mid_x, mid_y = _align_ends(sx, sy)
        _fold(node, ctx, res, x, y, sx, sy, mid_x, mid_y)
    for ins, outs in groups:
        ins_ = [(x, a) for a in ins if sx[a] != 1]
        outs_ = [(y, b) for b in outs if sy[b] != 1]
        res.free.update((x, a) for a in ins if sx[a] == 1)
        if len(ins_) == 1 and len(outs_) == 1:
            res.same(ins_[0], outs_[0], ctx)
        elif len(ins_) > 1 and len(outs_) == 1:
            _product(res, ctx, outs_[0], ins_, sx)
        elif len(ins_) == 1 and len(outs_) > 1:
            _product(res, ctx, ins_[0], outs_, sy)
    if node.op_type == "Reshape":
        entries = ctx.shape_value(node.input[1])
        if entries is None or len(entries) != len(sy):
            for k in range(len(sy)):
                res.pin((y, k), f"computed shape of Reshape {ctx.label(node)} could not be followed")
            return
        shape_entries(node, node.input[1], y, entries=entries, ctx=ctx, res=res)


def _end_group(sx, sy, i, j, step, lo_x, lo_y, hi_x, hi_y):
    """From axes i, j walking by `step`: the smallest run of static axes with equal products."""
    a, b = i, j
    pa, pb = sx[a], sy[b]
    while pa != pb:
        if pa < pb:
            a += step
            if not lo_x <= a < hi_x or sx[a] is None:
                return None
            pa *= sx[a]
        else:
            b += step
            if not lo_y <= b < hi_y or sy[b] is None:
                return None
            pb *= sy[b]
    return a, b


def _align_ends(sx, sy):
    """`align` for shapes whose dynamic axes do not line up ([B,S,H,D] -> [B*S,H*D]): axes
    matched from both ends (pairs of dynamic axes, static runs of equal product), and the
    unmatched middle of each side."""
    groups = []
    i, j = len(sx), len(sy)
    lo_x = lo_y = 0
    while lo_x < i and lo_y < j:  # from the left
        if sx[lo_x] is None and sy[lo_y] is None:
            lo_x, lo_y = lo_x + 1, lo_y + 1
            continue
        if sx[lo_x] is None or sy[lo_y] is None:
            break
        end = _end_group(sx, sy, lo_x, lo_y, 1, lo_x, lo_y, i, j)
        if end is None:
            break
        groups.append((list(range(lo_x, end[0] + 1)), list(range(lo_y, end[1] + 1))))
        lo_x, lo_y = end[0] + 1, end[1] + 1
    while i > lo_x and j > lo_y:  # from the right
        if sx[i - 1] is None and sy[j - 1] is None:
            i, j = i - 1, j - 1
            continue
        if sx[i - 1] is None or sy[j - 1] is None:
            break
        end = _end_group(sx, sy, i - 1, j - 1, -1, lo_x, lo_y, i, j)
        if end is None:
            break
        groups.append((list(range(end[0], i)), list(range(end[1], j))))
        i, j = end
    return groups, list(range(lo_x, i)), list(range(lo_y, j))


def _fold(node, ctx, res, x, y, sx, sy, mid_x, mid_y):
    """The unmatched middle of a Reshape folds static axes into a dynamic one, or unfolds
    them ([B,H,S,D] -> [B*H,S,D], as exporters write attention). A folded axis is free only
    when a nearby Reshape unfolds it by reading its size at run time (`Shape(x)[a]`), which
    re-couples it; an unfolded axis must read its size the same way, else it is pinned."""
    unfolded = _unfolded_downstream(y, ctx) if any(sx[a] not in (None, 1) for a in mid_x) else set()
    tunnel = None  # computed once, for the first folded axis no Shape read re-couples
    for a in mid_x:
        if sx[a] is None or sx[a] == 1:
            continue
        if DimRef(x, a) in unfolded:
            res.free.add((x, a))
            continue
        tunnel = _literal_tunnel(node, ctx) if tunnel is None else tunnel
        if tunnel:
            for other in tunnel:  # the same heads, wherever the folded axis is unfolded or folded again
                res.same((x, a), other, ctx)
        else:
            res.pin((x, a), f"folded into a dynamic axis by {node.op_type} {ctx.label(node)}")
    entries = ctx.shape_value(node.input[1]) if node.op_type == "Reshape" else None
    for b in mid_y:
        if sy[b] is None or sy[b] == 1:
            continue
        if entries is not None and len(entries) == len(sy) and isinstance(entries[b], DimRef):
            res.free.add((y, b))  # shape_entries couples it with the axis whose size it reads
        elif _literal_unfold(node, ctx, b) and _folds_upstream(node, b, ctx):
            res.free.add((y, b))  # coupled by the literal folds upstream (_literal_tunnel)
        else:
            res.pin((y, b), f"unfolded from a dynamic axis by {node.op_type} {ctx.label(node)}")


def _literal_fold(node, ctx):
    """(folded axis, its size, stored literal) when this Reshape folds one static axis into a
    dynamic one sized `Shape(t)[k] * n`, with n stored as a literal (BLOOM: [B, H, S, D] ->
    [B*H, S, D], B*H = batch * 4); else None."""
    x, y = node.input[0], node.output[0]
    sx, sy = ctx.shape(x), ctx.shape(y)
    if node.op_type != "Reshape" or sx is None or sy is None or align(sx, sy) is not None:
        return None
    static = [a for a in _align_ends(sx, sy)[1] if sx[a] not in (None, 1)]
    entries, sources = ctx.shape_value(node.input[1]), ctx.literal_sources(node.input[1])
    if len(static) != 1 or not entries or not sources or len(entries) != len(sy):
        return None
    size = sx[static[0]]
    folds = [j for j, e in enumerate(entries) if isinstance(e, DimProd) and e.factor == size and sy[j] is None]
    if len(folds) != 1 or sources[folds[0]] is None:
        return None
    return static[0], size, sources[folds[0]]


def _literal_unfold(node, ctx, b) -> bool:
    """Axis b of this Reshape's output unfolds a dynamic axis with a size stored as a literal."""
    if node.op_type != "Reshape":
        return False
    entries, sources = ctx.shape_value(node.input[1]), ctx.literal_sources(node.input[1])
    return bool(entries and sources and len(entries) > b and isinstance(entries[b], int) and sources[b] is not None)


def _tunnel_ends(name, ctx, up: bool, depth=0) -> list:
    """The Reshapes reached from `name` through batched ops (FOLD_SAFE), downstream (or upstream
    if `up`): where the folded axis is unfolded (or was folded). None when the walk leaves the
    attention arithmetic some other way (then nothing is coupled)."""
    if depth > 8:
        return None
    nodes = [ctx.g.producer.get(name)] if up else ctx.consumers(name)
    found = []
    for user in nodes:
        if user is None:
            return None if up else found
        if user.op_type == "Reshape" and (user.input[0] == name or up):
            found.append(user)
        elif user.op_type in FOLD_SAFE and not (user.op_type == "Softmax" and ctx.attr(user, "axis", -1) == 0):
            nxt = [i for i in user.input if i and ctx.value(i) is None] if up else list(user.output)
            for n in nxt:
                more = _tunnel_ends(n, ctx, up, depth + 1)
                if more is None:
                    return None
                found += more
        elif user.op_type != "Shape" or _read_for_unknown_use(user, ctx, ctx.rank(name) or 0):
            return None  # the folded size is read by arithmetic spa does not follow (Div by heads)
    return found


def _folds_upstream(node, b, ctx) -> bool:
    """Every fold upstream of this unfold couples its folded axis with output axis b."""
    ends = _tunnel_ends(node.input[0], ctx, up=True)
    return bool(ends) and all((node.output[0], b) in _literal_tunnel(r, ctx) for r in ends)


def _literal_tunnel(node, ctx) -> list:
    """The static axes this literal fold's channels must match: the unfolds (and re-folds'
    inputs) it reaches, and the folds that share its stored batch x heads literal."""
    fold = _literal_fold(node, ctx)
    if fold is None:
        return []
    _, size, (src_node, _, _) = fold
    ends = _tunnel_ends(node.output[0], ctx, up=False)
    if not ends:
        return []
    spaces = []
    for r in ends:
        sy = ctx.shape(r.output[0]) or ()
        axes = [b for b in range(len(sy)) if sy[b] == size and _literal_unfold(r, ctx, b)]
        if len(axes) != 1:
            return []
        spaces.append((r.output[0], axes[0]))
    for other in _literal_sharers(src_node, ctx):
        theirs = _literal_fold(other, ctx)
        if theirs is None or theirs[1] != size:
            return []
        spaces.append((other.input[0], theirs[0]))
    return spaces


def _literal_sharers(src_node, ctx, depth=0) -> list:
    """Reshapes whose shape input reads the output of `src_node` (through shape arithmetic)."""
    found = []
    for user in ctx.consumers(src_node.output[0]) if depth < 8 else ():
        if user.op_type == "Reshape" and user.input[1] == src_node.output[0]:
            found.append(user)
        elif user.op_type in SHAPE_ARITH or user.op_type == "Reshape":
            found += _literal_sharers(user, ctx, depth + 1)
    return found


FOLD_SAFE = ("Transpose", "Mul", "Div", "Add", "Sub", "MatMul", "Softmax", "Cast", "Identity", "Where")


def _unfolded_downstream(name, ctx, depth=0) -> set:
    """DimRefs read by the shapes of Reshapes shortly downstream of `name`."""
    found = set()
    if depth > 6:
        return found
    for user in ctx.consumers(name):
        if user.op_type == "Reshape" and (depth or user.input[0] == name):
            entries = ctx.shape_value(user.input[1]) or []
            found |= {e for e in entries if isinstance(e, DimRef)}
        if user.op_type in FOLD_SAFE:
            for out in user.output:
                found |= _unfolded_downstream(out, ctx, depth + 1)
    return found


def shape_entries(node, shape_name, out, *, entries, ctx, res, skip=lambda j: False):
    """Couple output axes with the `Shape(t)[a]` entries that size them; pin unknown sizes.

    A literal size inside a computed shape (`Concat(Shape(x)[0], [-1], [64])`) is rewritten
    where it is stored; outputs of every sink that reads the same shape tensor must then
    agree on that axis, so they are coupled."""
    constant = ctx.value(shape_name) is not None
    sources = None if constant else ctx.literal_sources(shape_name)
    res.param(shape_name, ctx)
    for j, e in enumerate(entries):
        if skip(j):
            continue
        if isinstance(e, DimRef):
            res.same((e.tensor, e.axis), (out, j), ctx)
        elif isinstance(e, DimProd):  # a merged axis sized at run time: its tie keeps it exact
            if not _tied_product(e, out, j, ctx):
                res.pin((out, j), f"size computed as a product in {node.op_type} {ctx.label(node)}")
        elif e is not None and e > 1 and not constant and sources and sources[j] is not None:
            for other in _sinks_sharing(shape_name, node, ctx):
                res.same((out, j), (other.output[0], j), ctx)
        elif e is None or (e > 1 and not constant):
            if (ctx.shape(out) or [1] * (j + 1))[j] != 1:
                res.pin((out, j), f"size set by a computed shape in {node.op_type} {ctx.label(node)}")
        elif e == 0 and node.op_type == "Reshape" and not ctx.attr(node, "allowzero", 0):
            res.same((node.input[0], j), (out, j), ctx)


def _tied_product(e, out, j, ctx) -> bool:
    """`Shape(t)[a] * k` sizes axis j of `out`, which this Reshape merged from t's axis a and
    a factor k: the sizes agree now and after pruning t's axis."""
    size_t, size_out = ctx.size((e.ref.tensor, e.ref.axis)), ctx.size((out, j))
    return size_t is not None and size_out == size_t * e.factor


def _sinks_sharing(shape_name, node, ctx):
    return [n for n in ctx.consumers(shape_name) if n is not node and n.output
            and any((n.op_type, i) in SHAPE_SINKS for i, x in enumerate(n.input) if x == shape_name)]


@rule("Expand")
def expand(node, ctx, res):
    x, y = node.input[0], node.output[0]
    rx, ry = ctx.rank(x), ctx.rank(y)
    if rx is None or ry is None:
        return
    for k in range(rx):
        res.same((x, k), (y, ry - rx + k), ctx)
    entries = ctx.shape_value(node.input[1])
    if entries is not None and len(entries) == ry:
        shape_entries(node, node.input[1], y, entries=entries, ctx=ctx, res=res)
    else:
        for k in range(ry):
            res.pin((y, k), f"computed shape of Expand {ctx.label(node)} could not be followed")


@rule("ConstantOfShape")
def constant_of_shape(node, ctx, res):
    """A constant shape makes a constant tensor (a source, rewritten when pruned)."""
    y = node.output[0]
    if ctx.value(node.input[0]) is not None:
        res.param(node.input[0], ctx)
        res.free.update((y, k) for k in range(ctx.rank(y) or 0))
        return
    entries = ctx.shape_value(node.input[0])
    if entries is not None and len(entries) == (ctx.rank(y) or 0):
        shape_entries(node, node.input[0], y, entries=entries, ctx=ctx, res=res)


@rewriter("Reshape", "Expand", "ConstantOfShape", "Resize")
def shape_constant(node, edit):
    """Literal sizes in a constant shape input follow the pruned output axes."""
    idx = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0, "Resize": 3}[node.op_type]
    if len(node.input) <= idx or not node.input[idx]:
        return
    value = edit.value(node.input[idx])
    out = node.output[0]
    if value is None:
        _computed_shape_literals(node, node.input[idx], out, edit)
        return
    if value.ndim != 1 or len(value) != len(edit.old_shape(out)):
        return
    new = value.copy()
    for j, e in enumerate(value):
        if e > 1 and e == edit.old_size((out, j)):
            new[j] = edit.new_size((out, j))
    if not np.array_equal(new, value):
        edit.set_input_const(node, idx, new)


@rule("Shape", "Size")
def shape(node, ctx, res):
    """Reading sizes is harmless when every use ends in a shape input that spa follows."""
    x = node.input[0]
    rank = ctx.rank(x) or 0
    res.param(node.output[0], ctx)
    read = set(range(rank)) if node.op_type == "Size" else _read_for_unknown_use(node, ctx, rank)
    for k in range(rank):
        if k in read:
            res.pin((x, k), f"its size is read by {node.op_type} {ctx.label(node)} for an unknown use")
        else:
            res.free.add((x, k))


def _read_for_unknown_use(node, ctx, rank) -> set:
    """Axes of Shape's input whose sizes reach a use spa does not follow (e.g. attention's
    1/sqrt(head_dim) scale); an entry picked by a constant Gather/Slice is followed alone."""
    start, end = ctx.attr(node, "start", 0), ctx.attr(node, "end", rank)
    axes = list(range(rank))[slice(start, end)]
    read = set()
    for user in ctx.consumers(node.output[0]):
        picked = axes
        if user.op_type == "Gather" and user.input[0] == node.output[0] and ctx.attr(user, "axis", 0) == 0:
            idx = ctx.value(user.input[1])
            ind = None if idx is None else [int(i) for i in np.asarray(idx).reshape(-1)]
            picked = None if ind is None or any(not -len(axes) <= i < len(axes) for i in ind) else \
                [axes[i] for i in ind]
        elif user.op_type == "Slice" and user.input[0] == node.output[0]:
            params = _slice_params(user, ctx)
            if params is not None and len(params[0]) == 1 and params[3][0] == 1:
                picked = axes[slice(int(params[0][0]), int(params[1][0]))]
            else:
                picked = None
        if picked is None:
            return set(range(rank))
        if user.op_type in ("Gather", "Slice"):
            if not all(_uses_understood(o, ctx, 1) for o in user.output):
                read.update(picked)
        elif not _uses_understood_by(user, node.output[0], ctx):
            read.update(axes)
    return read if node.output[0] not in ctx.graph_outputs else set(range(rank))


def _uses_understood_by(user, name, ctx, depth=1) -> bool:
    """`user` reads `name` as a shape input spa follows, or as shape arithmetic that ends in one."""
    slots = [i for i, n in enumerate(user.input) if n == name]
    if all((user.op_type, s) in SHAPE_SINKS for s in slots):
        return True
    return user.op_type in SHAPE_ARITH and all(_uses_understood(o, ctx, depth) for o in user.output)


def _uses_understood(name, ctx, depth):
    if depth > 16:
        return False
    return all(_uses_understood_by(u, name, ctx, depth + 1) for u in ctx.consumers(name)) \
        and name not in ctx.graph_outputs


def _computed_shape_literals(node, shape_name, out, edit):
    """Literal sizes inside a computed shape follow the pruned output axes, where they are
    stored; the n of a folded `Shape(t)[k] * n` follows the axis it folds."""
    entries = edit.index.shape_value(shape_name)
    sources = literal_sources(edit.index, shape_name)
    if entries is None or sources is None or len(entries) != len(edit.old_shape(out)):
        return
    for j, (e, src) in enumerate(zip(entries, sources)):
        if src is None or isinstance(e, DimRef):
            continue
        if isinstance(e, DimProd):
            _folded_literal(node, e, src, edit)
            continue
        if e <= 1 or e != edit.old_size((out, j)):
            continue
        new = edit.new_size((out, j))
        if new != e:
            edit.set_const_element(*src, value=new)


def _folded_literal(node, e, src, edit):
    if node.op_type != "Reshape":
        return
    sx, sy = edit.old_shape(node.input[0]), edit.old_shape(node.output[0])
    if align(sx, sy) is not None:
        return
    _, mid_x, _ = _align_ends(sx, sy)
    static = [a for a in mid_x if sx[a] not in (None, 1)]
    if len(static) == 1 and sx[static[0]] == e.factor:
        new = edit.new_size((node.input[0], static[0]))
        if new != e.factor:
            edit.set_const_element(*src, value=new)
