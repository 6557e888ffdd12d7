"""ONNX operators as torch functions: `OPS[(domain, op_type)](ctx, *inputs) -> output(s)`.

Each function follows the ONNX operator spec (attributes from `ctx.attr`, opset from
`ctx.opset` where the signature changed between opsets) with torch ops only, so gradients
flow through float tensors. Values that ONNX treats as data but torch needs as Python numbers
(shapes, axes, pads, slice bounds) are read with `.tolist()`.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
import torch.nn.functional as F

OPS: dict = {}
RETURNS_LIST: set = set()  # ops whose single output is itself a Python list (sequence values)

T = onnx.TensorProto
TORCH_DTYPES = {
    T.FLOAT: torch.float32, T.DOUBLE: torch.float64, T.FLOAT16: torch.float16, T.BFLOAT16: torch.bfloat16,
    T.INT8: torch.int8, T.UINT8: torch.uint8, T.INT16: torch.int16, T.INT32: torch.int32, T.INT64: torch.int64,
    T.BOOL: torch.bool, T.UINT16: torch.int32, T.UINT32: torch.int64, T.UINT64: torch.int64,
}
_WIDEN = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64, np.dtype(np.uint64): np.int64}


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """A torch tensor of a numpy array (unsigned types torch lacks are widened)."""
    arr = np.asarray(arr)
    if arr.dtype in _WIDEN:
        arr = arr.astype(_WIDEN[arr.dtype])
    return torch.from_numpy(np.array(arr, copy=True))


def op(*names, domain: str = ""):
    def deco(fn):
        for name in names:
            OPS[(domain, name)] = fn
        return fn

    return deco


def numbers(t, kind=int) -> list:
    """A shape/axes/scales input or attribute as a list of Python `kind` ([] for None)."""
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1).tolist()
    return [kind(v) for v in t]


def ints(t) -> list[int]:
    """A shape/axes input or attribute as Python ints."""
    return numbers(t, int)


def _float_like(ctx, value, like=None) -> torch.Tensor:
    dtype = like.dtype if like is not None else ctx.float_dtype
    device = like.device if like is not None else ctx.module.device
    return torch.as_tensor(value, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# elementwise
# ---------------------------------------------------------------------------------------------

def _binary(fn):
    return lambda ctx, a, b: fn(a, _same(b, a))


def _same(b, a):
    """Align a scalar constant's dtype with the other operand (ONNX has no type promotion)."""
    if a.dtype != b.dtype and (a.is_floating_point() or b.is_floating_point()):
        return b.to(a.dtype) if a.is_floating_point() else b
    return b


for _name, _fn in {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul,
                   "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
                   "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or,
                   "Xor": torch.logical_xor, "BitShift": None}.items():
    if _fn is not None:
        OPS[("", _name)] = _binary(_fn)


@op("Div")
def div(ctx, a, b):
    b = _same(b, a)
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


@op("Pow")
def pow_(ctx, a, b):
    if a.is_floating_point() and not b.is_floating_point() or a.is_floating_point():
        b = b.to(a.dtype)
    return torch.pow(a, b)


@op("Mod")
def mod(ctx, a, b):
    if ctx.attr("fmod", 0):
        return torch.fmod(a, b)
    return torch.remainder(a, b)


def _variadic(fn):
    def run(ctx, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, _same(x, out))
        return out

    return run


OPS[("", "Sum")] = _variadic(torch.add)
OPS[("", "Max")] = _variadic(torch.maximum)
OPS[("", "Min")] = _variadic(torch.minimum)


@op("Mean")
def mean(ctx, *xs):
    return _variadic(torch.add)(ctx, *xs) / len(xs)


_UNARY = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp, "Log": torch.log,
    "Sqrt": torch.sqrt, "Abs": torch.abs, "Neg": torch.neg, "Erf": torch.erf, "Reciprocal": torch.reciprocal,
    "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sin": torch.sin, "Cos": torch.cos,
    "Tan": torch.tan, "Asin": torch.asin, "Acos": torch.acos, "Atan": torch.atan, "Sinh": torch.sinh,
    "Cosh": torch.cosh, "Softplus": F.softplus, "Softsign": F.softsign, "Sign": torch.sign, "IsNaN": torch.isnan,
    "Not": torch.logical_not, "Mish": F.mish, "HardSwish": F.hardswish,
}
def _unary(fn):
    return lambda ctx, x: fn(x)


for _name, _fn in _UNARY.items():
    OPS[("", _name)] = _unary(_fn)


@op("IsInf")
def isinf(ctx, x):
    pos, neg = ctx.attr("detect_positive", 1), ctx.attr("detect_negative", 1)
    return (torch.isposinf(x) & bool(pos)) | (torch.isneginf(x) & bool(neg))


@op("LeakyRelu")
def leaky_relu(ctx, x):
    return F.leaky_relu(x, ctx.attr("alpha", 0.01))


@op("Elu")
def elu(ctx, x):
    return F.elu(x, ctx.attr("alpha", 1.0))


@op("Celu")
def celu(ctx, x):
    return F.celu(x, ctx.attr("alpha", 1.0))


@op("Selu")
def selu(ctx, x):
    alpha, gamma = ctx.attr("alpha", 1.67326319217681884765625), ctx.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@op("ThresholdedRelu")
def thresholded_relu(ctx, x):
    return torch.where(x > ctx.attr("alpha", 1.0), x, torch.zeros_like(x))


@op("HardSigmoid")
def hard_sigmoid(ctx, x):
    return torch.clamp(ctx.attr("alpha", 0.2) * x + ctx.attr("beta", 0.5), 0, 1)


@op("Gelu")
def gelu(ctx, x):
    return F.gelu(x, approximate="tanh" if ctx.attr("approximate", "none") == "tanh" else "none")


@op("PRelu")
def prelu(ctx, x, slope):
    return torch.where(x >= 0, x, x * slope)


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("Clip")
def clip(ctx, x, lo=None, hi=None):
    if ctx.opset < 11:
        lo, hi = ctx.attr("min"), ctx.attr("max")
    lo = lo.to(x.dtype) if isinstance(lo, torch.Tensor) else lo
    hi = hi.to(x.dtype) if isinstance(hi, torch.Tensor) else hi
    if lo is not None and hi is not None:
        return torch.clamp(x, lo, hi)
    if lo is not None:
        return torch.clamp(x, min=lo)
    if hi is not None:
        return torch.clamp(x, max=hi)
    return x


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("Where")
def where(ctx, c, a, b):
    return torch.where(c, a, _same(b, a))


@op("Identity")
def identity(ctx, x, *rest):
    return x


@op("Dropout")
def dropout(ctx, x, *rest):
    """Inference: the identity, and an all-true mask when the mask output is asked for."""
    if len(ctx.node.outputs) > 1 and ctx.node.outputs[1]:
        return x, torch.ones_like(x, dtype=torch.bool)
    return x


@op("BitShift")
def bit_shift(ctx, a, b):
    return a << b if ctx.attr("direction") == "LEFT" else a >> b


def _softmax(fn):
    def run(ctx, x):
        axis = ctx.attr("axis", -1 if ctx.opset >= 13 else 1)
        if ctx.opset >= 13:
            return fn(x, axis)
        axis %= x.dim()
        flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
        return fn(flat, 1).reshape(x.shape)

    return run


OPS[("", "Softmax")] = _softmax(lambda x, a: torch.softmax(x, a))
OPS[("", "LogSoftmax")] = _softmax(lambda x, a: torch.log_softmax(x, a))
OPS[("", "Hardmax")] = _softmax(lambda x, a: F.one_hot(x.argmax(a), x.shape[a]).movedim(-1, a).to(x.dtype))


# ---------------------------------------------------------------------------------------------
# linear algebra and convolution
# ---------------------------------------------------------------------------------------------

@op("MatMul")
def matmul(ctx, a, b):
    return torch.matmul(a, b)


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("Gemm")
def gemm(ctx, a, b, c=None):
    if ctx.attr("transA", 0):
        a = a.t()
    if ctx.attr("transB", 0):
        b = b.t()
    y = torch.matmul(a, b)
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


@op("Einsum")
def einsum(ctx, *xs):
    return torch.einsum(ctx.attr("equation").replace(" ", ""), *xs)


def _pads(ctx, x, kernel, strides, dilations) -> tuple[list, list]:
    """(begin pads, end pads) per spatial axis, auto_pad resolved."""
    n = len(kernel)
    auto = ctx.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(n):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else large)
            end.append(large if auto == "SAME_UPPER" else small)
        return begin, end
    if auto == "VALID":
        return [0] * n, [0] * n
    pads = ctx.attr("pads") or [0] * (2 * n)
    return list(pads[:n]), list(pads[n:])


def _pad_input(x, begin, end, value=0.0):
    """F.pad for asymmetric spatial pads (torch's pad order: last axis first)."""
    spec = []
    for b, e in zip(reversed(begin), reversed(end)):
        spec += [b, e]
    return F.pad(x, spec, value=value)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("Conv")
def conv(ctx, x, w, b=None):
    n = w.dim() - 2
    kernel = ctx.attr("kernel_shape") or list(w.shape[2:])
    strides = ctx.attr("strides") or [1] * n
    dilations = ctx.attr("dilations") or [1] * n
    begin, end = _pads(ctx, x, kernel, strides, dilations)
    if begin != end:
        x, pad = _pad_input(x, begin, end), 0
    else:
        pad = begin
    return _CONV[n](x, w, b, strides, pad, dilations, ctx.attr("group", 1))


_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("ConvTranspose")
def conv_transpose(ctx, x, w, b=None):
    n = w.dim() - 2
    group = ctx.attr("group", 1)
    strides = ctx.attr("strides") or [1] * n
    dilations = ctx.attr("dilations") or [1] * n
    out_pad = ctx.attr("output_padding") or [0] * n
    out_shape = ctx.attr("output_shape")
    auto = ctx.attr("auto_pad", "NOTSET")
    y = _CONV_T[n](x, w, None, strides, 0, out_pad, group, dilations)
    if out_shape or auto in ("SAME_UPPER", "SAME_LOWER"):
        # the spec's total padding = full size - wanted size; SAME_UPPER puts the smaller half
        # first, NOTSET/SAME_LOWER the larger; a wanted size beyond the full one pads the tail
        target = list(out_shape)[-n:] if out_shape else [x.shape[2 + i] * strides[i] for i in range(n)]
        begin, end = [], []
        for i in range(n):
            total = y.shape[2 + i] - target[i]
            if total < 0:
                begin.append(0)
                end.append(total)
                continue
            small, large = total // 2, total - total // 2
            upper = auto == "SAME_UPPER"
            begin.append(small if upper else large)
            end.append(large if upper else small)
    elif auto == "VALID":
        begin, end = [0] * n, [0] * n
    else:
        pads = ctx.attr("pads") or [0] * (2 * n)
        begin, end = list(pads[:n]), list(pads[n:])
    if any(begin) or any(end):
        spec = []
        for bg, e in zip(reversed(begin), reversed(end)):
            spec += [-bg, -e]
        y = F.pad(y, spec)
    return y if b is None else y + _channel(b, y)


# ---------------------------------------------------------------------------------------------
# normalization
# ---------------------------------------------------------------------------------------------

def _channel(v, x):
    return v.reshape([1, -1] + [1] * (x.dim() - 2))


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("BatchNormalization")
def batch_norm(ctx, x, scale, bias, mean_, var):
    eps = ctx.attr("epsilon", 1e-5)
    inv = torch.rsqrt(var + eps)
    return (x - _channel(mean_, x)) * _channel(inv * scale, x) + _channel(bias, x)


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("InstanceNormalization")
def instance_norm(ctx, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=ctx.attr("epsilon", 1e-5))


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("LayerNormalization")
def layer_norm(ctx, x, scale, bias=None):
    axis = ctx.attr("axis", -1) % x.dim()
    eps = ctx.attr("epsilon", 1e-5)
    shape = list(x.shape[axis:])
    extra = len([o for o in ctx.node.outputs[1:] if o])
    if not extra and list(scale.shape) == shape and (bias is None or list(bias.shape) == shape):
        return F.layer_norm(x, shape, scale, bias, eps)
    dims = tuple(range(axis, x.dim()))
    mu = x.mean(dims, keepdim=True)
    inv = torch.rsqrt((x - mu).pow(2).mean(dims, keepdim=True) + eps)
    y = (x - mu) * inv * scale
    y = y + bias if bias is not None else y
    return (y, mu, inv) if extra else y


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("GroupNormalization")
def group_norm(ctx, x, scale, bias):
    groups, eps = ctx.attr("num_groups"), ctx.attr("epsilon", 1e-5)
    if scale.numel() == x.shape[1]:
        return F.group_norm(x, groups, scale, bias, eps)
    y = F.group_norm(x, groups, None, None, eps)  # opset 18: scale/bias per group
    per = x.shape[1] // groups
    return y * _channel(scale.repeat_interleave(per), x) + _channel(bias.repeat_interleave(per), x)


@op("LpNormalization")
def lp_norm(ctx, x):
    return F.normalize(x, p=ctx.attr("p", 2), dim=ctx.attr("axis", -1))


@op("LRN")
def lrn(ctx, x):
    size = ctx.attr("size")
    alpha, beta, bias = ctx.attr("alpha", 1e-4), ctx.attr("beta", 0.75), ctx.attr("bias", 1.0)
    n, c = x.shape[:2]
    sq = (x * x).reshape(n, 1, c, -1)  # pool the squares over a window of channels
    lo = (size - 1) // 2
    sq = F.pad(sq, [0, 0, lo, size - 1 - lo])
    summed = F.avg_pool2d(sq, (size, 1), 1) * size
    return x / (bias + alpha / size * summed.reshape(x.shape)) ** beta


# ---------------------------------------------------------------------------------------------
# pooling and reductions
# ---------------------------------------------------------------------------------------------

_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _pool_args(ctx, x):
    kernel = list(ctx.attr("kernel_shape"))
    n = len(kernel)
    strides = ctx.attr("strides") or [1] * n
    dilations = ctx.attr("dilations") or [1] * n
    begin, end = _pads(ctx, x, kernel, strides, dilations)
    return n, kernel, list(strides), list(dilations), begin, end


@op("MaxPool")
def max_pool(ctx, x):
    n, kernel, strides, dilations, begin, end = _pool_args(ctx, x)
    ceil = bool(ctx.attr("ceil_mode", 0))
    if begin != end or any(b > k // 2 for b, k in zip(begin, kernel)):
        x, pad = _pad_input(x, begin, end, value=-math.inf), 0
    else:
        pad = begin
    if len(ctx.node.outputs) > 1 and ctx.node.outputs[1]:
        if pad == 0 and any(begin):
            raise NotImplementedError("MaxPool Indices with asymmetric pads")
        y, idx = _MAXPOOL[n](x, kernel, strides, pad, dilations, ceil_mode=ceil, return_indices=True)
        # torch: flat index within each (N, C) plane; ONNX: within the whole tensor (row-major)
        plane = math.prod(x.shape[2:])
        base = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape(x.shape[0], x.shape[1], *[1] * n)
        if ctx.attr("storage_order", 0):
            raise NotImplementedError("MaxPool Indices with storage_order=1")
        return y, idx + base * plane
    return _MAXPOOL[n](x, kernel, strides, pad, dilations, ceil_mode=ceil)


@op("AveragePool")
def avg_pool(ctx, x):
    n, kernel, strides, dilations, begin, end = _pool_args(ctx, x)
    ceil = bool(ctx.attr("ceil_mode", 0))
    include = bool(ctx.attr("count_include_pad", 0))
    if begin == end and all(b <= k // 2 for b, k in zip(begin, kernel)) and any(dilations) == 1 \
            and set(dilations) == {1}:
        if n == 1:
            return F.avg_pool1d(x, kernel, strides, begin, ceil_mode=ceil, count_include_pad=include)
        return _AVGPOOL[n](x, kernel, strides, begin, ceil_mode=ceil, count_include_pad=include)
    # asymmetric pads or dilations: window sums over the padded input (a convolution with a
    # kernel of ones) divided by the count of real (or all) cells
    if ceil and set(dilations) != {1}:
        raise NotImplementedError("AveragePool with dilations and ceil_mode")

    def window_sum(t):
        flat = _pad_input(t, begin, end).reshape(-1, 1, *[t.shape[2 + i] + begin[i] + end[i] for i in range(n)])
        if set(dilations) == {1}:
            return _AVGPOOL[n](flat, kernel, strides, 0, ceil_mode=ceil) * math.prod(kernel)
        ones = torch.ones([1, 1, *kernel], dtype=t.dtype, device=t.device)
        return _CONV[n](flat, ones, None, strides, 0, dilations)

    total = window_sum(x)
    total = total.reshape(*x.shape[:2], *total.shape[2:])
    if include:
        return total / math.prod(kernel)
    count = window_sum(torch.ones_like(x[:1, :1]))
    return total / count.reshape(1, 1, *count.shape[2:])


@op("GlobalAveragePool")
def global_avg_pool(ctx, x):
    return x.mean(tuple(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def global_max_pool(ctx, x):
    return x.amax(tuple(range(2, x.dim())), keepdim=True)


def _reduce_axes(ctx, x, axes_input, attr_until: int):
    """Reduce axes: an attribute before opset `attr_until`, the second input from it on."""
    axes = ctx.attr("axes") if ctx.opset < attr_until else (ints(axes_input) if axes_input is not None else None)
    if not axes:
        if ctx.attr("noop_with_empty_axes", 0):
            return None
        return tuple(range(x.dim()))
    return tuple(a % x.dim() for a in axes)


def _reduce(fn, attr_until=18):
    def run(ctx, x, axes=None):
        dims = _reduce_axes(ctx, x, axes, attr_until)
        if dims is None:
            return x
        return fn(x, dims, bool(ctx.attr("keepdims", 1)))

    return run


OPS[("", "ReduceMean")] = _reduce(lambda x, d, k: x.mean(d, keepdim=k))
OPS[("", "ReduceSum")] = _reduce(lambda x, d, k: x.sum(d, keepdim=k), attr_until=13)
OPS[("", "ReduceMax")] = _reduce(lambda x, d, k: x.amax(d, keepdim=k))
OPS[("", "ReduceMin")] = _reduce(lambda x, d, k: x.amin(d, keepdim=k))
OPS[("", "ReduceProd")] = _reduce(lambda x, d, k: _prod(x, d, k))
OPS[("", "ReduceL1")] = _reduce(lambda x, d, k: x.abs().sum(d, keepdim=k))
OPS[("", "ReduceL2")] = _reduce(lambda x, d, k: (x * x).sum(d, keepdim=k).sqrt())
OPS[("", "ReduceSumSquare")] = _reduce(lambda x, d, k: (x * x).sum(d, keepdim=k))
OPS[("", "ReduceLogSumExp")] = _reduce(lambda x, d, k: torch.logsumexp(x, d, keepdim=k))
OPS[("", "ReduceLogSum")] = _reduce(lambda x, d, k: x.sum(d, keepdim=k).log())


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = x.prod(d, keepdim=keep)
    return x


def _arg(fn):
    def run(ctx, x):
        axis = ctx.attr("axis", 0)
        keep = bool(ctx.attr("keepdims", 1))
        if ctx.attr("select_last_index", 0):
            flipped = x.flip(axis)
            return x.shape[axis] - 1 - fn(flipped, axis, keep)
        return fn(x, axis, keep)

    return run


OPS[("", "ArgMax")] = _arg(lambda x, a, k: torch.argmax(x, a, keepdim=k))
OPS[("", "ArgMin")] = _arg(lambda x, a, k: torch.argmin(x, a, keepdim=k))


@op("CumSum")
def cumsum(ctx, x, axis):
    axis = int(axis.reshape(-1)[0])
    if ctx.attr("reverse", 0):
        x = x.flip(axis)
    y = x.cumsum(axis)
    if ctx.attr("exclusive", 0):
        y = y - x
    return y.flip(axis) if ctx.attr("reverse", 0) else y


@op("TopK")
def topk(ctx, x, k):
    axis = ctx.attr("axis", -1)
    k = int(k.reshape(-1)[0]) if isinstance(k, torch.Tensor) else ctx.attr("k")
    values, indices = torch.topk(x, k, axis, largest=bool(ctx.attr("largest", 1)), sorted=True)
    return values, indices


# ---------------------------------------------------------------------------------------------
# shapes, indexing, data movement
# ---------------------------------------------------------------------------------------------

def _i64(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


@op("Shape")
def shape(ctx, x):
    dims = list(x.shape)
    start, end = ctx.attr("start", 0), ctx.attr("end", len(dims))
    return _i64(dims[start:end], x.device)


@op("Size")
def size(ctx, x):
    return _i64(x.numel(), x.device)


@op("Reshape")
def reshape(ctx, x, shape_):
    dims = ints(shape_)
    if not ctx.attr("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@op("Flatten")
def flatten(ctx, x):
    axis = ctx.attr("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))


@op("Transpose")
def transpose(ctx, x):
    perm = ctx.attr("perm") or list(reversed(range(x.dim())))
    return x.permute(*perm)


@op("Squeeze")
def squeeze(ctx, x, axes=None):
    axes = ctx.attr("axes") if ctx.opset < 13 else (ints(axes) if axes is not None else None)
    if not axes:
        return x.squeeze()
    dims = sorted((a % x.dim() for a in axes), reverse=True)
    for d in dims:
        x = x.squeeze(d)
    return x


@op("Unsqueeze")
def unsqueeze(ctx, x, axes=None):
    axes = ctx.attr("axes") if ctx.opset < 13 else ints(axes)
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


@op("Concat")
def concat(ctx, *xs):
    axis = ctx.attr("axis")
    xs = [x for x in xs if x is not None]
    if any(x.is_floating_point() for x in xs):
        dtype = next(x.dtype for x in xs if x.is_floating_point())
        xs = [x.to(dtype) for x in xs]
    return torch.cat(xs, axis)


@op("Split")
def split(ctx, x, sizes=None):
    axis = ctx.attr("axis", 0)
    n = len(ctx.node.outputs)
    sizes = ctx.attr("split") if ctx.opset < 13 else (ints(sizes) if sizes is not None else None)
    if not sizes:
        total = x.shape[axis]
        chunk = -(-total // n)
        sizes = [chunk] * (n - 1) + [total - chunk * (n - 1)]
    return tuple(torch.split(x, list(sizes), axis))


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("Slice")
def slice_(ctx, x, starts=None, ends=None, axes=None, steps=None):
    if ctx.opset < 10:
        starts, ends, axes, steps = ctx.attr("starts"), ctx.attr("ends"), ctx.attr("axes"), None
    starts, ends = ints(starts), ints(ends)
    axes = ints(axes) if axes is not None else list(range(len(starts)))
    steps = ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    flips = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        a %= x.dim()
        dim = x.shape[a]
        if st > 0:
            s = max(0, min(dim, s + dim if s < 0 else s))
            e = max(0, min(dim, e + dim if e < 0 else e))
            index[a] = slice(s, max(s, e), st)
        else:  # negative step: slice the flipped axis
            s = max(-1, min(dim - 1, s + dim if s < 0 else s))
            e = max(-1, min(dim - 1, e + dim if e < 0 else e))
            flips.append((a, s, e, -st, dim))
    y = x[tuple(index)]
    for a, s, e, st, dim in flips:
        y = y.flip(a)
        first, stop = dim - 1 - s, dim - 1 - e
        idx = [slice(None)] * y.dim()
        idx[a] = slice(first, max(first, stop), st)
        y = y[tuple(idx)]
    return y


@op("Gather")
def gather(ctx, x, idx):
    axis = ctx.attr("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).long()
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:]))


@op("GatherElements")
def gather_elements(ctx, x, idx):
    axis = ctx.attr("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).long()
    return torch.gather(x, axis, idx)


@op("GatherND")
def gather_nd(ctx, x, idx):
    b = ctx.attr("batch_dims", 0)
    if b:
        raise NotImplementedError("GatherND with batch_dims")
    idx = idx.long()
    k = idx.shape[-1]
    flat = idx.reshape(-1, k)
    out = x[tuple(flat[:, j] for j in range(k))]
    return out.reshape(list(idx.shape[:-1]) + list(x.shape[k:]))


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("ScatterND")
def scatter_nd(ctx, x, idx, updates):
    idx = idx.long()
    k = idx.shape[-1]
    flat = idx.reshape(-1, k)
    out = x.clone()
    upd = updates.reshape([flat.shape[0]] + list(x.shape[k:]))
    reduction = ctx.attr("reduction", "none")
    key = tuple(flat[:, j] for j in range(k))
    if reduction == "none":
        out[key] = upd
    elif reduction == "add":
        out = out.index_put(key, upd, accumulate=True)
    else:
        raise NotImplementedError(f"ScatterND with reduction '{reduction}'")
    return out


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("ScatterElements", "Scatter")
def scatter_elements(ctx, x, idx, updates):
    axis = ctx.attr("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).long()
    reduction = ctx.attr("reduction", "none")
    if reduction == "none":
        return x.scatter(axis, idx, updates)
    return x.scatter_reduce(axis, idx, updates, {"add": "sum", "mul": "prod"}.get(reduction, reduction))


@op("Expand")
def expand(ctx, x, shape_):
    dims = ints(shape_)
    rank = max(len(dims), x.dim())
    dims = [1] * (rank - len(dims)) + dims
    have = [1] * (rank - x.dim()) + list(x.shape)
    target = [h if d == 1 else d for d, h in zip(dims, have)]
    return x.reshape(have).expand(target)


@op("Tile")
def tile(ctx, x, reps):
    return x.repeat(ints(reps))


@op("ConstantOfShape")
def constant_of_shape(ctx, shape_):
    value = ctx.attr("value")
    if value is None:
        value = torch.zeros(1, dtype=torch.float32)
    if value.is_floating_point() and ctx.module.cast_to is not None:
        value = value.to(ctx.module.cast_to)
    return torch.full(ints(shape_), value.reshape(-1)[0].item(), dtype=value.dtype, device=ctx.module.device)


@op("Constant")
def constant(ctx):
    key = ctx.attr("buffer")
    if key is not None:
        return getattr(ctx.module, key)
    a = ctx.attrs
    if "value_float" in a:
        return _float_like(ctx, a["value_float"])
    if "value_floats" in a:
        return _float_like(ctx, list(a["value_floats"]))
    if "value_int" in a:
        return _i64(a["value_int"], ctx.module.device)
    if "value_ints" in a:
        return _i64(list(a["value_ints"]), ctx.module.device)
    raise NotImplementedError("Constant without a tensor, float or int value")


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("Range")
def range_(ctx, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


@op("Cast")
def cast(ctx, x):
    return x.to(ctx.dtype_of(ctx.attr("to")))


@op("CastLike")
def cast_like(ctx, x, like):
    return x.to(like.dtype)


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("Pad")
def pad(ctx, x, pads=None, value=None, axes=None):
    if ctx.opset < 11:
        pads, value = ctx.attr("pads"), ctx.attr("value", 0.0)
    pads = ints(pads)
    value = value.item() if isinstance(value, torch.Tensor) and value.numel() else (value or 0.0)
    rank = x.dim()
    axes = [a % rank for a in ints(axes)] if axes is not None else list(range(rank))
    n = len(axes)
    begin, end = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[i + n]
    mode = ctx.attr("mode", "constant")
    spec = []
    for a in reversed(range(rank)):
        spec += [begin[a], end[a]]
    while len(spec) > 2 and spec[-2:] == [0, 0]:
        spec = spec[:-2]
    if mode == "constant":
        return F.pad(x, spec, value=value)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    lead = rank - len(spec) // 2  # torch pads the trailing axes of a batched tensor
    if lead >= 1:
        return F.pad(x, spec, mode=torch_mode)
    return F.pad(x.unsqueeze(0), spec, mode=torch_mode).squeeze(0)


@op("DepthToSpace")
def depth_to_space(ctx, x):
    b = ctx.attr("blocksize")
    n, c, h, w = x.shape
    if ctx.attr("mode", "DCR") == "CRD":
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    else:
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


@op("SpaceToDepth")
def space_to_depth(ctx, x):
    b = ctx.attr("blocksize")
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@op("NonZero")
def nonzero(ctx, x):
    return torch.stack(torch.nonzero(x, as_tuple=True)) if x.dim() else _i64([[0]] if x else [[]], x.device)


# positional: ONNX operator: the node's inputs arrive positionally, in the node's order
@op("OneHot")
def one_hot(ctx, idx, depth, values):
    axis = ctx.attr("axis", -1)
    d = int(depth.reshape(-1)[0])
    idx = torch.where(idx < 0, idx + d, idx).long()
    hot = F.one_hot(idx.clamp(0, d - 1), d) * ((idx >= 0) & (idx < d)).unsqueeze(-1)
    out = torch.where(hot.bool(), values[1], values[0])
    return out.movedim(-1, axis % out.dim())


@op("Trilu")
def trilu(ctx, x, k=None):
    k = int(k.reshape(-1)[0]) if k is not None else 0
    return torch.triu(x, k) if ctx.attr("upper", 1) else torch.tril(x, k)
