"""More ONNX operators for spa.torch: Resize/Upsample, recurrent layers, control flow, legacy
winml ops, ai.onnx.ml ops, and the com.microsoft fused transformer ops ONNX Runtime emits.

Same contract as spa.torch.ops: `fn(ctx, *inputs) -> output(s)`, torch ops only, so gradients
flow through float math. Where the ONNX spec leaves room, the numerics follow ONNX Runtime's CPU
kernels (Resize coordinates are computed in float32 like ORT's, Attention masks like ORT's).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from spa.torch.ops import RETURNS_LIST, ints, numbers, op


def _floats(t) -> list[float]:
    return numbers(t, float)


def _present(t) -> bool:
    return t is not None and (not isinstance(t, torch.Tensor) or t.numel() > 0)


# ---------------------------------------------------------------------------------------------
# Resize / Upsample
# ---------------------------------------------------------------------------------------------

_F32 = np.float32


def _source_coords(ctm: str, out_len: int, in_len: int, scale, roi_start: float, roi_end: float) -> np.ndarray:
    """ORT's get_original_coordinate for every output index of one axis, in float32."""
    y = np.arange(out_len, dtype=_F32)
    s = _F32(scale)
    half = _F32(0.5)
    if ctm == "asymmetric":
        return y / s
    if ctm == "pytorch_half_pixel":
        return (y + half) / s - half if out_len > 1 else np.zeros(out_len, _F32)
    if ctm == "tf_half_pixel_for_nn":
        return (y + half) / s
    if ctm == "align_corners":
        return y * _F32(in_len - 1) / _F32(out_len - 1) if out_len != 1 else np.zeros(out_len, _F32)
    if ctm == "tf_crop_and_resize":
        start, end = _F32(roi_start), _F32(roi_end)
        if out_len > 1:
            return start * _F32(in_len - 1) + (y * (end - start) * _F32(in_len - 1)) / _F32(out_len - 1)
        return np.full(out_len, 0.5 * (roi_start + roi_end) * (in_len - 1), _F32)
    if ctm == "half_pixel_symmetric":
        adjustment = _F32(out_len) / (s * _F32(in_len))
        offset = _F32(in_len) / _F32(2) * (_F32(1) - adjustment)
        return offset + (y + half) / s - half
    if ctm == "half_pixel":
        return (y + half) / s - half
    raise NotImplementedError(f"Resize coordinate_transformation_mode '{ctm}'")


def _nearest_index(x: np.ndarray, nearest_mode: str, downsample: bool) -> np.ndarray:
    if nearest_mode == "simple":  # Resize-10 / Upsample: ORT's legacy rounding
        return np.ceil(x) if downsample else np.trunc(x)
    if nearest_mode == "round_prefer_ceil":
        return np.where(x >= 0, np.floor(x + _F32(0.5)), -np.floor(-x + _F32(0.5)))  # C round(): half away
    if nearest_mode == "floor":
        return np.floor(x)
    if nearest_mode == "ceil":
        return np.ceil(x)
    if nearest_mode == "round_prefer_floor":
        half_way = x == np.trunc(x) + _F32(0.5)
        rounded = np.where(x >= 0, np.floor(x + _F32(0.5)), -np.floor(-x + _F32(0.5)))
        return np.where(half_way, np.floor(x), rounded)
    raise NotImplementedError(f"Resize nearest_mode '{nearest_mode}'")


def _cubic_coeffs(s: np.ndarray, a: float) -> np.ndarray:
    s = np.abs(s.astype(np.float64))
    c0 = ((a * (s + 1) - 5 * a) * (s + 1) + 8 * a) * (s + 1) - 4 * a
    c1 = ((a + 2) * s - (a + 3)) * s * s + 1
    c2 = ((a + 2) * (1 - s) - (a + 3)) * (1 - s) * (1 - s) + 1
    c3 = ((a * (2 - s) - 5 * a) * (2 - s) + 8 * a) * (2 - s) - 4 * a
    return np.stack([c0, c1, c2, c3], axis=1)


def _axis_plan(mode, ctm, nearest_mode, cubic_a, exclude_outside, in_len, out_len, scale, roi):
    """(indices [out, k], weights [out, k] or None, extrapolated mask [out] or None) for one axis."""
    x = _source_coords(ctm, out_len, in_len, scale, *roi)
    extrapolated = ((x < 0) | (x > in_len - 1)) if ctm == "tf_crop_and_resize" else None
    if mode == "nearest":
        idx = _nearest_index(x, nearest_mode, float(scale) < 1).astype(np.int64)
        return np.clip(idx, 0, in_len - 1)[:, None], None, extrapolated
    if mode == "linear":
        xc = np.clip(x, _F32(0), _F32(in_len - 1))
        lo = np.minimum(np.trunc(xc).astype(np.int64), in_len - 1)
        hi = np.minimum(lo + 1, in_len - 1)
        frac = (xc - lo.astype(_F32)).astype(np.float64)
        return np.stack([lo, hi], 1), np.stack([1 - frac, frac], 1), extrapolated
    if mode == "cubic":
        base = np.floor(x).astype(np.int64)
        coeffs = _cubic_coeffs(x - np.floor(x), cubic_a)
        idx = base[:, None] + np.arange(-1, 3)[None, :]
        if exclude_outside:
            coeffs = np.where((idx < 0) | (idx >= in_len), 0.0, coeffs)
            total = coeffs.sum(1, keepdims=True)
            coeffs = coeffs / np.where(total == 0, 1.0, total)
        return np.clip(idx, 0, in_len - 1), coeffs, extrapolated
    raise NotImplementedError(f"Resize mode '{mode}'")


def _antialias_matrix(mode, ctm, cubic_a, exclude_outside, in_len, out_len, scale, roi) -> np.ndarray:
    """Dense [out, in] weights of ORT's antialiased (Pillow-style) linear/cubic filter for one axis."""
    inv = _F32(1) / _F32(scale)  # ORT's "scale": input pixels per output pixel
    cubic = mode == "cubic"
    support = _F32(2.0 if cubic else 1.0) * (inv if inv >= 1 else _F32(1))
    window = math.ceil(support) * 2 + 1
    step = _F32(1) / inv if inv >= 1 else _F32(1)
    a = _F32(cubic_a)

    def filt(v):
        v = np.abs(v)
        if cubic:
            inner = ((a + 2) * v - (a + 3)) * v * v + 1
            outer = (((v - 5) * v + 8) * v - 4) * a
            return np.where(v < 1, inner, np.where(v < 2, outer, _F32(0)))
        return np.where(v < 1, _F32(1) - v, _F32(0))

    coords = _source_coords(ctm, out_len, in_len, scale, *roi) if float(inv) != 1.0 \
        else np.arange(out_len, dtype=_F32)
    matrix = np.zeros((out_len, in_len), np.float64)
    for i, c in enumerate(coords):
        center = _F32(0.5) + c
        lo = int(np.floor(center - support + _F32(0.5)))
        hi = int(np.floor(center + support + _F32(0.5)))
        hi = lo + min(max(hi - lo, 0), window)
        lo_cut, hi_cut = min(max(lo, 0), in_len), min(max(hi, 0), in_len)
        if exclude_outside:
            lo, hi = lo_cut, hi_cut
        taps = np.arange(lo, hi)
        w = filt((taps.astype(_F32) - center + _F32(0.5)) * step).astype(_F32)
        total = w.sum(dtype=_F32)
        if lo_cut < hi_cut:  # outside taps go to the edge pixel (exclude_outside=0), as ORT does
            np.add.at(matrix[i], np.clip(taps, lo_cut, hi_cut - 1), w / (total if total != 0 else _F32(1)))
    return matrix


@functools.lru_cache(maxsize=256)
def _torch_nearest_index(in_len: int, out_len: int) -> np.ndarray:
    """The source index F.interpolate(mode="nearest", size=...) takes for each output index."""
    ramp = torch.arange(in_len, dtype=torch.float32).reshape(1, 1, in_len)
    return F.interpolate(ramp, size=out_len, mode="nearest").reshape(-1).numpy().astype(np.int64)


def _nearest_fast(x, out_sizes, scales, ctm, nearest_mode):
    """F.interpolate(mode="nearest") when it picks exactly ORT's source pixels (spatial axes only)."""
    if x.dtype not in (torch.float32, torch.float64) or not 3 <= x.dim() <= 5 or ctm == "tf_crop_and_resize":
        return None
    if any(out_sizes[a] != x.shape[a] or float(scales[a]) != 1.0 for a in range(2)):
        return None
    for axis in range(2, x.dim()):
        in_len, out_len, scale = x.shape[axis], out_sizes[axis], scales[axis]
        if float(scale) == 1.0 and out_len == in_len:
            continue
        idx, _, _ = _axis_plan("nearest", ctm, nearest_mode, -0.75, False, in_len, out_len, scale, (0.0, 1.0))
        if not np.array_equal(idx[:, 0], _torch_nearest_index(in_len, out_len)):
            return None
    return F.interpolate(x, size=list(out_sizes[2:]), mode="nearest")


def _resize(ctx, x, out_sizes, scales, roi, mode, ctm, nearest_mode, cubic_a=-0.75, exclude_outside=False,
            extrapolation_value=0.0, antialias=False):
    """Separable resize: per resized axis, gather the neighbours and weight them (ORT's numerics)."""
    if mode == "nearest":
        fast = _nearest_fast(x, out_sizes, scales, ctm, nearest_mode)
        if fast is not None:
            return fast
    masks = []
    for axis in range(x.dim()):
        in_len, out_len, scale = x.shape[axis], out_sizes[axis], scales[axis]
        axis_roi = (roi[axis], roi[axis + x.dim()]) if roi else (0.0, 1.0)
        if float(scale) == 1.0 and out_len == in_len:  # ORT: identity along the axis, roi or not
            continue
        if antialias:
            if out_len == in_len:  # ORT copies the axis as is
                continue
            w = _antialias_matrix(mode, ctm, cubic_a, exclude_outside, in_len, out_len, scale, axis_roi)
            weights = torch.from_numpy(w).to(device=x.device, dtype=x.dtype)
            x = torch.matmul(x.movedim(axis, -1), weights.t()).movedim(-1, axis)
            continue
        idx, w, extrapolated = _axis_plan(mode, ctm, nearest_mode, cubic_a, exclude_outside, in_len, out_len,
                                          scale, axis_roi)
        index = torch.from_numpy(idx).to(x.device)
        shape = [1] * x.dim()
        shape[axis] = out_len
        if w is None:
            x = torch.index_select(x, axis, index[:, 0])
        else:
            weights = torch.from_numpy(w).to(device=x.device, dtype=x.dtype)
            y = None
            for k in range(idx.shape[1]):
                term = torch.index_select(x, axis, index[:, k]) * weights[:, k].reshape(shape)
                y = term if y is None else y + term
            x = y
        if extrapolated is not None and extrapolated.any():
            masks.append(torch.from_numpy(extrapolated).to(x.device).reshape(shape))
    if masks:
        mask = masks[0]
        for m in masks[1:]:
            mask = mask | m
        x = torch.where(mask, torch.as_tensor(extrapolation_value, dtype=x.dtype, device=x.device), x)
    return x


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("Resize")
def resize(ctx, x, roi=None, scales=None, sizes=None):
    if ctx.opset < 11:  # Resize-10: (X, scales); asymmetric coordinates, ORT's legacy nearest rounding
        roi, scales, sizes = None, roi, None
        ctm, nearest_mode = "asymmetric", "simple"
    else:
        ctm = ctx.attr("coordinate_transformation_mode", "half_pixel")
        nearest_mode = ctx.attr("nearest_mode", "round_prefer_floor")
    mode = ctx.attr("mode", "nearest")
    rank = x.dim()
    axes = [a % rank for a in (ctx.attr("axes") or range(rank))]
    policy = ctx.attr("keep_aspect_ratio_policy", "stretch")
    in_dims = list(x.shape)
    if _present(sizes):
        wanted = ints(sizes)
        out_sizes = list(in_dims)
        for a, n in zip(axes, wanted):
            out_sizes[a] = n
        scale_list = [_F32(1)] * rank
        if policy != "stretch":
            ratios = [_F32(out_sizes[a]) / _F32(in_dims[a]) for a in axes]
            common = min(ratios) if policy == "not_larger" else max(ratios)
            for a in axes:
                scale_list[a] = common
                out_sizes[a] = int(np.floor(float(common) * in_dims[a] + 0.5))
        else:
            for a in axes:
                scale_list[a] = _F32(out_sizes[a]) / _F32(in_dims[a]) if in_dims[a] else _F32(1)
    elif _present(scales):
        given = _floats(scales)
        scale_list = [_F32(1)] * rank
        for a, s in zip(axes, given):
            scale_list[a] = _F32(s)
        out_sizes = [int(scale_list[i] * _F32(in_dims[i])) for i in range(rank)]
    else:
        raise ValueError("Resize needs scales or sizes")
    if mode != "nearest" and not x.is_floating_point():
        raise NotImplementedError(f"Resize mode '{mode}' on {x.dtype} (integer rounding)")
    antialias = bool(ctx.attr("antialias", 0)) and mode != "nearest"
    if antialias and ctm == "tf_crop_and_resize":
        raise NotImplementedError("Resize with antialias=1 and tf_crop_and_resize")
    roi_list = []
    if ctm == "tf_crop_and_resize":
        values = _floats(roi)
        if len(values) == 2 * len(axes) and len(axes) != rank:
            roi_list = [0.0] * rank + [1.0] * rank
            for i, a in enumerate(axes):
                roi_list[a], roi_list[rank + a] = values[i], values[len(axes) + i]
        else:
            roi_list = values
    return _resize(ctx, x, out_sizes, scale_list, roi_list, mode, ctm, nearest_mode,
                   float(ctx.attr("cubic_coeff_a", -0.75)), bool(ctx.attr("exclude_outside", 0)),
                   float(ctx.attr("extrapolation_value", 0.0)), antialias)


@op("Upsample")
def upsample(ctx, x, scales=None):
    mode = ctx.attr("mode", "nearest")
    mode = "linear" if mode == "bilinear" else mode
    given = [_F32(s) for s in (_floats(scales) if scales is not None else ctx.attr("scales"))]
    out_sizes = [int(s * _F32(n)) for s, n in zip(given, x.shape)]
    return _resize(ctx, x, out_sizes, given, [], mode, "asymmetric", "simple")


# ---------------------------------------------------------------------------------------------
# recurrent layers (gate orders as in the spec: LSTM iofc, GRU zrh)
# ---------------------------------------------------------------------------------------------

_ACT_DEFAULTS = {"leakyrelu": (0.01, None), "thresholdedrelu": (1.0, None), "elu": (1.0, None),
                 "hardsigmoid": (0.2, 0.5), "affine": (1.0, 0.0), "scaledtanh": (1.0, 1.0)}


def _activation(name: str, alpha, beta):
    key = name.lower()
    if key == "sigmoid":
        return torch.sigmoid
    if key == "tanh":
        return torch.tanh
    if key == "relu":
        return torch.relu
    if key == "softsign":
        return F.softsign
    if key == "softplus":
        return F.softplus
    if key == "leakyrelu":
        return lambda v: F.leaky_relu(v, alpha)
    if key == "thresholdedrelu":
        return lambda v: torch.where(v > alpha, v, torch.zeros_like(v))
    if key == "elu":
        return lambda v: F.elu(v, alpha)
    if key == "hardsigmoid":
        return lambda v: torch.clamp(alpha * v + beta, 0, 1)
    if key == "affine":
        return lambda v: alpha * v + beta
    if key == "scaledtanh":
        return lambda v: alpha * torch.tanh(beta * v)
    raise NotImplementedError(f"recurrent activation '{name}'")


def _activations(ctx, defaults: list[str], num_dirs: int) -> list[list]:
    """Per direction, the activation functions (alpha/beta consumed in order, as ORT does)."""
    names = list(ctx.attr("activations") or [])
    if not names:
        names = defaults * num_dirs
    elif len(names) == len(defaults) and num_dirs == 2:
        names = names * 2
    alphas = list(ctx.attr("activation_alpha") or [])
    betas = list(ctx.attr("activation_beta") or [])
    fns = []
    for name in names:
        default_a, default_b = _ACT_DEFAULTS.get(name.lower(), (None, None))
        a = alphas.pop(0) if default_a is not None and alphas else default_a
        b = betas.pop(0) if default_b is not None and betas else default_b
        fns.append(_activation(name, a, b))
    per = len(defaults)
    return [fns[d * per:(d + 1) * per] for d in range(num_dirs)]


def _rnn_inputs(ctx, x, init_h, init_c=None):
    layout = ctx.attr("layout", 0)
    if layout:
        x = x.transpose(0, 1)
        init_h = init_h.transpose(0, 1) if init_h is not None else None
        init_c = init_c.transpose(0, 1) if init_c is not None else None
    return layout, x, init_h, init_c


def _rnn_outputs(layout, ys, hs, cs=None):
    y = torch.stack(ys, 1)  # [S, D, B, H]
    h = torch.stack(hs, 0)  # [D, B, H]
    c = torch.stack(cs, 0) if cs is not None else None
    if layout:
        y = y.permute(2, 0, 1, 3)
        h = h.transpose(0, 1)
        c = c.transpose(0, 1) if c is not None else None
    return (y, h) if c is None else (y, h, c)


def _scan_direction(xw, step, state: tuple, lens, reverse: bool):
    """Run `step(xw_t, *state) -> state` (state[0] is the hidden output) over time; sequence_lens
    freeze the state and zero the output after each sequence's end, and a reverse direction
    starts at each sequence's last valid step, as in the ONNX spec."""
    seq = xw.shape[0]
    mask = None
    order = None
    if lens is not None and bool((lens < seq).any()):
        steps = torch.arange(seq, device=xw.device)[:, None]
        mask = steps < lens[None, :].to(xw.device)  # [S, B]
    if reverse:
        if mask is None:
            xw = xw.flip(0)
        else:
            steps = torch.arange(seq, device=xw.device)[:, None].expand_as(mask)
            order = torch.where(mask, lens[None, :].to(xw.device) - 1 - steps, steps)  # an involution
            xw = torch.gather(xw, 0, order[:, :, None].expand_as(xw))
    ys = []
    for t in range(seq):
        new = step(xw[t], *state)
        if mask is None:
            state = new
            ys.append(new[0])
        else:
            m = mask[t][:, None]
            state = tuple(torch.where(m, n, o) for n, o in zip(new, state))
            ys.append(torch.where(m, new[0], torch.zeros_like(new[0])))
    y = torch.stack(ys, 0)
    if reverse:
        y = y.flip(0) if order is None else torch.gather(y, 0, order[:, :, None].expand_as(y))
    return list(y.unbind(0)), state


def _clip(ctx):
    clip = ctx.attr("clip")
    return (lambda v: torch.clamp(v, -clip, clip)) if clip is not None else (lambda v: v)


def _directions(ctx):
    direction = ctx.attr("direction", "forward")
    return {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]


def _seq_lens(lens):
    return lens.long() if lens is not None else None


def _init(state, d, batch, hidden, like):
    return state[d] if state is not None else torch.zeros(batch, hidden, dtype=like.dtype, device=like.device)


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("LSTM")
def lstm(ctx, x, w, r, b=None, lens=None, init_h=None, init_c=None, p=None):
    layout, x, init_h, init_c = _rnn_inputs(ctx, x, init_h, init_c)
    hidden = ctx.attr("hidden_size") or r.shape[-1]
    dirs = _directions(ctx)
    acts = _activations(ctx, ["Sigmoid", "Tanh", "Tanh"], len(dirs))
    clip, couple = _clip(ctx), bool(ctx.attr("input_forget", 0))
    lens = _seq_lens(lens)
    batch = x.shape[1]
    ys, hs, cs = [], [], []
    for d, reverse in enumerate(dirs):
        f, g, h_act = acts[d]
        xw = torch.matmul(x, w[d].t())
        if b is not None:
            xw = xw + b[d, :4 * hidden] + b[d, 4 * hidden:]
        rt = r[d].t()
        peep = (p[d, :hidden], p[d, hidden:2 * hidden], p[d, 2 * hidden:]) if p is not None else None

        def step(xw_t, h, c, rt=rt, f=f, g=g, h_act=h_act, peep=peep):
            gates = torch.addmm(xw_t, h, rt)
            i, o, fg, cc = gates.split(hidden, -1)
            if peep is not None:
                i, fg = i + peep[0] * c, fg + peep[2] * c
            i = f(clip(i))
            fg = 1 - i if couple else f(clip(fg))
            c_new = fg * c + i * g(clip(cc))
            if peep is not None:
                o = o + peep[1] * c_new
            return f(clip(o)) * h_act(c_new), c_new

        state = (_init(init_h, d, batch, hidden, xw), _init(init_c, d, batch, hidden, xw))
        y, (h, c) = _scan_direction(xw, step, state, lens, reverse)
        ys.append(torch.stack(y, 0))
        hs.append(h)
        cs.append(c)
    return _rnn_outputs(layout, ys, hs, cs)


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("GRU")
def gru(ctx, x, w, r, b=None, lens=None, init_h=None):
    layout, x, init_h, _ = _rnn_inputs(ctx, x, init_h)
    hidden = ctx.attr("hidden_size") or r.shape[-1]
    dirs = _directions(ctx)
    acts = _activations(ctx, ["Sigmoid", "Tanh"], len(dirs))
    clip, before = _clip(ctx), bool(ctx.attr("linear_before_reset", 0))
    lens = _seq_lens(lens)
    batch = x.shape[1]
    ys, hs = [], []
    for d, reverse in enumerate(dirs):
        f, g = acts[d]
        xw = torch.matmul(x, w[d].t())
        wb = b[d, :3 * hidden] if b is not None else None
        rb = b[d, 3 * hidden:] if b is not None else None
        if wb is not None:
            xw = xw + wb
        r_zr, r_h = r[d, :2 * hidden].t(), r[d, 2 * hidden:].t()

        def step(xw_t, h, r_zr=r_zr, r_h=r_h, rb=rb, f=f, g=g):
            x_z, x_r, x_h = xw_t.split(hidden, -1)
            hr = torch.matmul(h, r_zr)
            if rb is not None:
                hr = hr + rb[:2 * hidden]
            z = f(clip(x_z + hr[..., :hidden]))
            rr = f(clip(x_r + hr[..., hidden:]))
            if before:
                hh = torch.matmul(h, r_h)
                if rb is not None:
                    hh = hh + rb[2 * hidden:]
                cand = g(clip(x_h + rr * hh))
            else:
                hh = torch.matmul(rr * h, r_h)
                if rb is not None:
                    hh = hh + rb[2 * hidden:]
                cand = g(clip(x_h + hh))
            return ((1 - z) * cand + z * h,)

        y, (h,) = _scan_direction(xw, step, (_init(init_h, d, batch, hidden, xw),), lens, reverse)
        ys.append(torch.stack(y, 0))
        hs.append(h)
    return _rnn_outputs(layout, ys, hs)


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("RNN")
def rnn(ctx, x, w, r, b=None, lens=None, init_h=None):
    layout, x, init_h, _ = _rnn_inputs(ctx, x, init_h)
    hidden = ctx.attr("hidden_size") or r.shape[-1]
    dirs = _directions(ctx)
    acts = _activations(ctx, ["Tanh"], len(dirs))
    clip = _clip(ctx)
    lens = _seq_lens(lens)
    batch = x.shape[1]
    ys, hs = [], []
    for d, reverse in enumerate(dirs):
        (f,) = acts[d]
        xw = torch.matmul(x, w[d].t())
        if b is not None:
            xw = xw + b[d, :hidden] + b[d, hidden:]
        rt = r[d].t()

        def step(xw_t, h, rt=rt, f=f):
            return (f(clip(torch.addmm(xw_t, h, rt))),)

        y, (h,) = _scan_direction(xw, step, (_init(init_h, d, batch, hidden, xw),), lens, reverse)
        ys.append(torch.stack(y, 0))
        hs.append(h)
    return _rnn_outputs(layout, ys, hs)


# ---------------------------------------------------------------------------------------------
# control flow
# ---------------------------------------------------------------------------------------------

@op("If")
def if_(ctx, cond):
    branch = "then_branch" if bool(cond.reshape(-1)[0]) else "else_branch"
    return tuple(ctx.run_subgraph(branch, []))


@op("Loop")
def loop(ctx, trip=None, cond=None, *carried):
    max_trips = int(trip.reshape(-1)[0]) if _present(trip) else None
    keep_going = bool(cond.reshape(-1)[0]) if _present(cond) else True
    device = ctx.module.device
    state = list(carried)
    scans: list[list] = []
    i = 0
    while keep_going and (max_trips is None or i < max_trips):
        out = ctx.run_subgraph("body", [torch.tensor(i, dtype=torch.int64, device=device),
                                        torch.tensor(keep_going, device=device)] + state)
        keep_going = bool(out[0].reshape(-1)[0])
        state = list(out[1:1 + len(carried)])
        for k, value in enumerate(out[1 + len(carried):]):
            if len(scans) <= k:
                scans.append([])
            scans[k].append(value)
        i += 1
    n_scan = len(ctx.node.outputs) - len(carried)
    stacked = [torch.stack(s, 0) for s in scans] + \
        [torch.zeros(0, dtype=ctx.float_dtype, device=device)] * (n_scan - len(scans))
    return tuple(state + stacked)


@op("Scan")
def scan(ctx, *inputs):
    if ctx.opset < 9:
        raise NotImplementedError("Scan-8 (batched, with sequence_lens)")
    m = ctx.attr("num_scan_inputs")
    states, xs = list(inputs[:len(inputs) - m]), inputs[len(inputs) - m:]
    in_axes = list(ctx.attr("scan_input_axes") or [0] * m)
    in_dirs = list(ctx.attr("scan_input_directions") or [0] * m)
    xs = [x.movedim(a % x.dim(), 0) for x, a in zip(xs, in_axes)]
    steps = xs[0].shape[0]
    outs: list[list] = []
    for t in range(steps):
        sliced = [x[steps - 1 - t] if rev else x[t] for x, rev in zip(xs, in_dirs)]
        result = ctx.run_subgraph("body", states + sliced)
        states = list(result[:len(states)])
        for k, value in enumerate(result[len(states):]):
            if len(outs) <= k:
                outs.append([])
            outs[k].append(value)
    n_out = len(ctx.node.outputs) - len(states)
    out_axes = list(ctx.attr("scan_output_axes") or [0] * n_out)
    out_dirs = list(ctx.attr("scan_output_directions") or [0] * n_out)
    stacked = []
    for k, values in enumerate(outs):
        if out_dirs[k]:
            values = values[::-1]
        y = torch.stack(values, 0)
        stacked.append(y.movedim(0, out_axes[k] % y.dim()))
    return tuple(states + stacked)


# ---------------------------------------------------------------------------------------------
# legacy (experimental, opset 1-9) ops that winml / CoreML converters emit
# ---------------------------------------------------------------------------------------------

@op("ImageScaler")
def image_scaler(ctx, x):
    scale = ctx.attr("scale", 1.0)
    bias = ctx.attr("bias")
    y = x * scale
    if bias:
        y = y + torch.as_tensor(bias, dtype=x.dtype, device=x.device).reshape([1, -1] + [1] * (x.dim() - 2))
    return y


@op("Affine")
def affine(ctx, x):
    return x * ctx.attr("alpha", 1.0) + ctx.attr("beta", 0.0)


@op("ScaledTanh")
def scaled_tanh(ctx, x):
    return ctx.attr("alpha", 1.0) * torch.tanh(ctx.attr("beta", 1.0) * x)


@op("ParametricSoftplus")
def parametric_softplus(ctx, x):
    return ctx.attr("alpha", 1.0) * F.softplus(ctx.attr("beta", 1.0) * x)


@op("Crop")
def crop(ctx, x):
    left, top, right, bottom = list(ctx.attr("border"))
    scale = ctx.attr("scale")
    height, width = x.shape[2], x.shape[3]
    if scale:
        bottom_limit, right_limit = top + scale[0], left + scale[1]
    else:
        bottom_limit, right_limit = height - bottom, width - right
    return x[:, :, top:bottom_limit, left:right_limit]


# ---------------------------------------------------------------------------------------------
# ai.onnx.ml
# ---------------------------------------------------------------------------------------------

@op("ArrayFeatureExtractor", domain="ai.onnx.ml")
def array_feature_extractor(ctx, x, idx):
    flat = idx.reshape(-1).long()
    y = torch.index_select(x, x.dim() - 1, flat)
    return y.reshape(1, -1) if x.dim() == 1 else y


@op("ZipMap", domain="ai.onnx.ml")
def zipmap(ctx, x):
    labels = ctx.attr("classlabels_int64s")
    if labels is None:
        labels = list(ctx.attr("classlabels_strings"))
    rows = x.reshape(1, -1) if x.dim() == 1 else x
    order = sorted(range(len(labels)), key=lambda i: labels[i])  # ORT returns ordered maps
    return [{labels[i]: row[i] for i in order} for row in rows.detach().cpu().tolist()]


RETURNS_LIST.add("ZipMap")


# ---------------------------------------------------------------------------------------------
# com.microsoft contrib ops (as ONNX Runtime's CPU kernels compute them)
# ---------------------------------------------------------------------------------------------

_MS = "com.microsoft"


@op("FastGelu", domain=_MS)
def fast_gelu(ctx, x, bias=None):
    return F.gelu(x + bias if bias is not None else x, approximate="tanh")


@op("Gelu", domain=_MS)
def ms_gelu(ctx, x):
    return F.gelu(x)


@op("BiasGelu", domain=_MS)
def bias_gelu(ctx, x, bias):
    return F.gelu(x + bias)


@op("QuickGelu", domain=_MS)
def quick_gelu(ctx, x):
    return x * torch.sigmoid(ctx.attr("alpha", 1.702) * x)


@op("FusedMatMul", domain=_MS)
def fused_matmul(ctx, a, b):
    a = _fused_operand(a, ctx.attr("transA", 0), ctx.attr("transBatchA", 0))
    b = _fused_operand(b, ctx.attr("transB", 0), ctx.attr("transBatchB", 0))
    y = torch.matmul(a, b)
    alpha = ctx.attr("alpha", 1.0)
    return y * alpha if alpha != 1.0 else y


def _fused_operand(t, trans: int, trans_batch: int):
    if t.dim() >= 3 and trans_batch:  # [b0, ..., M, K] -> batches first: [..., b0, ...] per ORT's permutation
        t = t.movedim(0, -2)
    if trans and t.dim() >= 2:
        t = t.transpose(-1, -2)
    return t


def _layer_norm_stats(x, eps):
    mean = x.mean(-1, keepdim=True)
    var = (x * x).mean(-1, keepdim=True) - mean * mean
    return mean, torch.rsqrt(var.clamp_min(0) + eps)


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("SkipLayerNormalization", domain=_MS)
def skip_layer_norm(ctx, x, skip, gamma, beta=None, bias=None):
    eps = ctx.attr("epsilon", 1e-12)
    total = x + skip
    if bias is not None:
        total = total + bias
    mean = total.mean(-1, keepdim=True)
    centered = total - mean
    inv = torch.rsqrt((centered * centered).mean(-1, keepdim=True) + eps)
    y = centered * inv * gamma
    if beta is not None:
        y = y + beta
    return y, mean, inv, total


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("SkipSimplifiedLayerNormalization", domain=_MS)
def skip_simplified_layer_norm(ctx, x, skip, gamma, bias=None):
    eps = ctx.attr("epsilon", 1e-12)
    total = x + skip
    if bias is not None:
        total = total + bias
    inv = torch.rsqrt((total * total).mean(-1, keepdim=True) + eps)
    return total * inv * gamma, torch.zeros_like(inv), inv, total


@op("SimplifiedLayerNormalization")
def simplified_layer_norm(ctx, x, scale):
    eps = ctx.attr("epsilon", 1e-5)
    axis = ctx.attr("axis", -1) % x.dim()
    dims = tuple(range(axis, x.dim()))
    xf = x.float() if ctx.attr("stash_type", 1) == 1 and x.dtype in (torch.float16, torch.bfloat16) else x
    inv = torch.rsqrt((xf * xf).mean(dims, keepdim=True) + eps)
    return (xf * inv).to(x.dtype) * scale, inv


op("SimplifiedLayerNormalization", domain=_MS)(simplified_layer_norm)


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("EmbedLayerNormalization", domain=_MS)
def embed_layer_norm(ctx, ids, segment_ids, word, position, segment_emb=None, gamma=None, beta=None, mask=None,
                     position_ids=None):
    eps = ctx.attr("epsilon", 1e-12)
    batch, seq = ids.shape
    emb = F.embedding(ids.long(), word)
    if position_ids is not None:
        pos = position_ids.long().expand(batch, seq)
    else:
        pos = torch.arange(seq, device=ids.device).expand(batch, seq)
    emb = emb + F.embedding(pos, position)
    if segment_ids is not None and segment_emb is not None:
        emb = emb + F.embedding(segment_ids.long(), segment_emb)
    y = F.layer_norm(emb, (emb.shape[-1],), gamma, beta, eps)
    if mask is not None:
        mask_index = (mask == 1).sum(-1).to(torch.int32)  # ORT counts the ones
    else:
        mask_index = torch.zeros(batch, dtype=torch.int32, device=ids.device)
    return y, mask_index, emb


def _attention_mask(mask, batch, seq, past, total, dtype, filter_value):
    """ORT's PrepareMask: an additive [B, 1, S, T] mask (or None) from a mask_index input."""
    device = mask.device
    keys = torch.arange(total, device=device)
    if mask.dim() == 1:
        if mask.shape[0] not in (batch, 2 * batch):
            raise NotImplementedError("Attention mask_index of shape [3*B+2]")
        end = mask[:batch].long()[:, None]
        masked = keys[None, :] >= end
        if mask.shape[0] == 2 * batch:
            masked = masked | (keys[None, :] < mask[batch:].long().clamp(max=total)[:, None])
        masked = masked[:, None, None, :].expand(batch, 1, seq, total)
    elif mask.dim() == 2:
        if mask.shape[1] == 1 and mask.shape[1] != total:
            return None  # ORT's "dummy" mask: broadcasting one value masks nothing
        masked = (mask <= 0)[:, None, None, :].expand(batch, 1, seq, total)
    elif mask.dim() == 3:
        masked = (mask <= 0)[:, None, :, :]
    else:
        raise NotImplementedError("Attention with a 4D (Megatron) mask_index")
    zero = torch.zeros((), dtype=dtype, device=device)
    filter_value = max(filter_value, torch.finfo(dtype).min)  # -3.4e38 stays finite in half precision
    return torch.where(masked, torch.as_tensor(filter_value, dtype=dtype, device=device), zero)


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("Attention", domain=_MS)
def attention(ctx, x, weights, bias=None, mask_index=None, past=None, attention_bias=None, past_seq_len=None):
    heads = ctx.attr("num_heads")
    if ctx.attr("do_rotary", 0) or ctx.attr("past_present_share_buffer", 0):
        raise NotImplementedError("Attention with do_rotary or past_present_share_buffer")
    sizes = list(ctx.attr("qkv_hidden_sizes") or [])
    if not sizes:
        third = weights.shape[1] // 3
        sizes = [third, third, third]
    batch, seq = x.shape[0], x.shape[1]
    qkv = torch.matmul(x, weights)
    if bias is not None:
        qkv = qkv + bias
    q, k, v = qkv.split(sizes, -1)

    def heads_first(t):
        return t.reshape(batch, seq, heads, -1).transpose(1, 2)

    q, k, v = heads_first(q), heads_first(k), heads_first(v)
    past_len = 0
    if past is not None:
        past_len = past.shape[3]
        k = torch.cat([past[0].to(k.dtype), k], 2)
        v = torch.cat([past[1].to(v.dtype), v], 2)
    present = torch.stack([k, v], 0) if past is not None or len(ctx.node.outputs) > 1 else None
    total = past_len + seq
    scale = ctx.attr("scale", 0.0) or 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attention_bias is not None:
        scores = scores + attention_bias
    filter_value = ctx.attr("mask_filter_value", -10000.0)
    if mask_index is not None:
        additive = _attention_mask(mask_index, batch, seq, past_len, total, scores.dtype, filter_value)
        if additive is not None:
            scores = scores + additive
    if ctx.attr("unidirectional", 0) and seq > 1:
        rows = torch.arange(seq, device=x.device)[:, None] + past_len
        future = torch.arange(total, device=x.device)[None, :] > rows
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, -1)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, seq, -1)
    return (out, present) if present is not None else out


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("RotaryEmbedding", domain=_MS)
def rotary_embedding(ctx, x, position_ids, cos_cache, sin_cache):
    interleaved = bool(ctx.attr("interleaved", 0))
    if ctx.attr("is_packed_batching", 0):
        raise NotImplementedError("RotaryEmbedding with is_packed_batching")
    scale = ctx.attr("scale", 1.0)
    three_d = x.dim() == 3
    if three_d:
        batch, seq, hidden = x.shape
        heads = ctx.attr("num_heads", 0) or hidden // (2 * cos_cache.shape[1])
        x4 = x.reshape(batch, seq, heads, hidden // heads)
    else:  # [B, N, S, H]
        batch, seq = x.shape[0], x.shape[2]
        x4 = x.transpose(1, 2)
    head = x4.shape[-1]
    rot = ctx.attr("rotary_embedding_dim", 0) or 2 * cos_cache.shape[1]
    if position_ids.numel() == 1:
        pos = position_ids.reshape(-1).long() + torch.arange(seq, device=x.device)
        pos = pos.expand(batch, seq)
    else:
        pos = position_ids.long().expand(batch, seq)
    cos = cos_cache[pos][:, :, None, : rot // 2].to(x.dtype)  # [B, S, 1, rot/2]
    sin = sin_cache[pos][:, :, None, : rot // 2].to(x.dtype)
    part, rest = x4[..., :rot], x4[..., rot:]
    if interleaved:
        x1, x2 = part[..., 0::2], part[..., 1::2]
        y = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).reshape(part.shape)
    else:
        x1, x2 = part[..., : rot // 2], part[..., rot // 2:]
        y = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    if scale != 1.0:
        y = y * scale
    y = torch.cat([y, rest], -1) if head > rot else y
    return y.reshape(batch, seq, -1) if three_d else y.transpose(1, 2)
