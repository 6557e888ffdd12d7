"""Data-free activation moments: what the graph itself says about its channels.

    model input          ─▶ N(0, I) along axis 1
    BatchNorm / LayerNorm ─▶ N(beta, diag(gamma) R diag(gamma))   (R: correlations of its input)
    Conv / Gemm / MatMul  ─▶ N(W mean + b, W C Wᵀ)                  (spatial positions independent)
    elementwise chains    ─▶ quadrature nodes pushed through the ops (onnx.reference)
    pooling, Flatten, Transpose, Concat ─▶ the same channels, moved

A normalization is where the truth re-enters: its running statistics (BatchNorm) or its
definition (LayerNorm) fix each channel's mean and scale, whatever came before. Between two
normalizations the channels are tracked as functions of one Gaussian (its quadrature nodes,
per channel); off-diagonal covariances after a nonlinearity f use Stein's lemma,
cov(f(a), f(b)) ~ E[f'(a)] E[f'(b)] cov(a, b). An op none of this covers ends the trail:
tensors after it have no moments (criteria fall back and say so).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from onnx.reference import ReferenceEvaluator

from spa.core.graph import attr

GRAM_MAX = 4096  # a space wider than this keeps only the diagonal of E[x xᵀ]


@dataclass
class Moments:
    """Statistics of one space along its axis (d channels)."""

    mean: np.ndarray  # (d,)
    gram: np.ndarray | None  # (d, d) = E[x xᵀ], None when d > GRAM_MAX
    sq: np.ndarray  # (d,) = E[x²]
    abs_mean: np.ndarray | None = None  # (d,) E|x| (calibration only)
    zeros: np.ndarray | None = None  # (d,) fraction of exact zeros (calibration only)
    cross: np.ndarray | None = None  # (d, d) = E[x_ref x'ᵀ]: reference model's x with this model's x'
    ref_mean: np.ndarray | None = None  # (d,) = E[x_ref] when paired (else `mean` is the reference's too)
    ref_sq: np.ndarray | None = None  # (d,) = E[x_ref²] when paired


# a fine grid under the standard normal, not Gauss-Hermite: activations have kinks (Relu, Clip)
# that polynomial quadrature integrates poorly
NODES = np.linspace(-6.0, 6.0, 121)
WEIGHTS = np.exp(-NODES**2 / 2) / np.exp(-NODES**2 / 2).sum()
ELEMENTWISE = {"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Erf",
               "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "Neg", "Abs", "Add", "Sub", "Mul", "Div", "Max",
               "Min", "Identity", "Dropout", "Cast", "Sqrt", "Pow", "Exp"}
SAME_CHANNELS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Resize", "Upsample"}
MAX_FLOPS = 2e9  # beyond this a full covariance through a linear layer keeps only variances
_basis = itertools.count()


@dataclass
class Dist:
    """A tensor's channels along `axis` as functions of one Gaussian N(mean0, cov0): their
    values at the quadrature nodes (`samples`, K x d)."""

    axis: int
    rank: int
    mean0: np.ndarray
    cov0: np.ndarray
    samples: np.ndarray
    basis: int

    @classmethod
    def gaussian(cls, axis: int, rank: int, mean: np.ndarray, *, cov: np.ndarray) -> Dist | None:
        if len(mean) > GRAM_MAX:
            return None  # too wide to carry a covariance: the trail ends
        std = np.sqrt(np.maximum(np.diag(cov), 0.0))
        return cls(axis, rank, mean, cov, mean + std * NODES[:, None], next(_basis))

    @property
    def mean(self) -> np.ndarray:
        return WEIGHTS @ self.samples

    def cov(self) -> np.ndarray:
        mean = self.mean
        var = WEIGHTS @ np.square(self.samples - mean)
        std0 = np.sqrt(np.maximum(np.diag(self.cov0), 0.0))
        gain = np.divide((WEIGHTS * NODES) @ self.samples, std0, out=np.zeros_like(std0), where=std0 > 0)
        cov = np.outer(gain, gain) * self.cov0
        np.fill_diagonal(cov, var)
        return cov

    def moments(self) -> Moments:
        mean, cov = self.mean, self.cov()
        gram = cov + np.outer(mean, mean)
        return Moments(mean, gram if len(mean) <= GRAM_MAX else None, np.diag(gram).copy())

    def layout(self) -> np.ndarray:
        """Samples as a tensor of this rank: K on axis 0, the channels on `axis`, 1 elsewhere."""
        shape = [1] * self.rank
        shape[0], shape[self.axis] = len(NODES), self.samples.shape[1]
        return self.samples.reshape(shape) if self.axis else None

    def moved(self, axis: int, rank: int) -> Dist:
        return Dist(axis, rank, self.mean0, self.cov0, self.samples, self.basis)


def _correlation(dist: Dist | None, d: int) -> np.ndarray:
    if dist is None:
        return np.eye(d)
    cov = dist.cov()
    std = np.sqrt(np.maximum(np.diag(cov), 1e-12))
    return cov / np.outer(std, std)


def _normalized(dist, gamma, beta, axis, rank) -> Dist:
    d = len(gamma)
    corr = _correlation(dist, d) if dist is not None and dist.samples.shape[1] == d else np.eye(d)
    beta = np.zeros(d) if beta is None else beta
    return Dist.gaussian(axis, rank, beta.astype(np.float64), cov=corr * np.outer(gamma, gamma))


def _value(index, name):
    v = index.value(name) if name else None
    return None if v is None else np.asarray(v, dtype=np.float64)


def _linear(dist: Dist, w: np.ndarray, bias, axis: int, rank: int) -> Dist | None:
    """y = x @ w + bias along the channel axis (w: d_in x d_out)."""
    if w.shape[1] > GRAM_MAX:
        return None
    mean, cov = dist.mean, dist.cov()
    out_mean = mean @ w + (0.0 if bias is None else bias)
    if w.shape[0] * w.shape[1] * max(w.shape) > MAX_FLOPS:
        out_cov = np.diag(np.diag(cov) @ np.square(w))
    else:
        out_cov = w.T @ cov @ w
    return Dist.gaussian(axis, rank, out_mean, cov=out_cov)


def _conv(node, dist, index, rank) -> Dist | None:
    w, b = _value(index, node.input[1]), _value(index, node.input[2] if len(node.input) > 2 else "")
    if w is None or dist.axis != 1:
        return None
    g, m, c = attr(node, "group", 1), w.shape[0], w.shape[1]
    if m > GRAM_MAX:
        return None
    taps = w.reshape(m, c, -1)
    mean, cov = dist.mean, dist.cov()
    if g == 1 and c == len(mean):
        out_mean = np.einsum("mck,c->m", taps, mean) + (0.0 if b is None else b)
        if m * c * c * taps.shape[2] > MAX_FLOPS:
            out_cov = np.diag(np.einsum("mck,c->m", np.square(taps), np.diag(cov)))
        else:
            out_cov = np.einsum("mck,cd,ndk->mn", taps, cov, taps, optimize=True)
        return Dist.gaussian(1, rank, out_mean, cov=out_cov)
    if g == m == len(mean) and c == 1:  # depthwise
        taps = taps[:, 0, :]
        out_mean = mean * taps.sum(1) + (0.0 if b is None else b)
        return Dist.gaussian(1, rank, out_mean, cov=cov * (taps @ taps.T))
    return None


def _gemm(node, dist, index, rank) -> Dist | None:
    w = _value(index, node.input[1])
    if w is None or attr(node, "transA", 0) or dist.axis != 1:
        return None
    w = w.T if attr(node, "transB", 0) else w
    bias = _value(index, node.input[2] if len(node.input) > 2 else "")
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    return _linear(dist, alpha * w, None if bias is None else beta * bias, 1, rank)


def _matmul(node, dist, index, rank) -> Dist | None:
    w = _value(index, node.input[1])
    if w is None or w.ndim != 2 or dist.axis != rank - 1 or node.input[0] not in index.shapes:
        return None
    return _linear(dist, w, None, dist.axis, rank)


def _elementwise(node, dists, index, rank) -> Dist | None:
    tracked = [dists[i] for i in node.input if i in dists]
    if len({(t.basis, t.axis, t.rank) for t in tracked}) != 1:
        if node.op_type in ("Add", "Sub") and len(tracked) == 2 and tracked[0].axis == tracked[1].axis:
            a, b = tracked
            sign = 1.0 if node.op_type == "Add" else -1.0
            return Dist.gaussian(a.axis, rank, a.mean + sign * b.mean, cov=a.cov() + b.cov())
        return None
    first = tracked[0]
    feeds = {}
    for name in node.input:
        if not name:
            continue
        if name in dists:
            dtype = np.float32 if index.model.dtypes.get(name) != 10 else np.float16
            feeds[name] = dists[name].layout().astype(dtype)
        else:
            value = index.value(name)
            if value is None:
                return None
            feeds[name] = value
    out = np.asarray(ReferenceEvaluator(node).run(None, feeds)[0], dtype=np.float64)
    if out.ndim != first.rank:
        return None
    extra = tuple(k for k in range(1, out.ndim) if k != first.axis and out.shape[k] != 1)
    if extra:  # a constant varying along other axes (position embeddings): averaged over them
        out = out.mean(axis=extra, keepdims=True)
    samples = np.moveaxis(out, first.axis, 1).reshape(len(NODES), -1)
    return Dist(first.axis, first.rank, first.mean0, first.cov0, samples, first.basis)


def _reshaped(node, dist, index) -> Dist | None:
    """Flatten/Reshape/Squeeze/Unsqueeze that keep the channel axis whole (its leading dims alike)."""
    shape_in, shape_out = index.shapes.get(node.input[0]), index.shapes.get(node.output[0])
    if shape_in is None or shape_out is None:
        return None
    d = shape_in[dist.axis]
    for j, size in enumerate(shape_out):
        if j and size == d and list(shape_in[:dist.axis]) == list(shape_out[:j]) \
                and all(s == 1 for s in shape_in[dist.axis + 1:]) and all(s == 1 for s in shape_out[j + 1:]):
            return dist.moved(j, len(shape_out))
    return None


def _reduced(node, dist, index, rank) -> Dist | None:
    """A mean/max over axes other than the channel axis (global pooling written as ReduceMean)."""
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1:
        axes = index.value(node.input[1])
    if axes is None:
        return None
    axes = {int(a) % dist.rank for a in np.ravel(axes)}
    if dist.axis in axes or 0 in axes:
        return None
    keep = attr(node, "keepdims", 1)
    return dist if keep else dist.moved(dist.axis - sum(a < dist.axis for a in axes), rank)


def _transpose(node, dist) -> Dist | None:
    perm = attr(node, "perm") or list(range(dist.rank))[::-1]
    return dist.moved(list(perm).index(dist.axis), dist.rank) if perm[0] == 0 else None


def _concat(node, dists, rank) -> Dist | None:
    parts = [dists.get(i) for i in node.input]
    axis = attr(node, "axis", 0) % rank
    if any(p is None or p.axis != axis for p in parts):
        return None
    mean = np.concatenate([p.mean for p in parts])
    cov = np.zeros((len(mean), len(mean)))
    o = 0
    for p in parts:
        n = len(p.mean)
        cov[o:o + n, o:o + n] = p.cov()
        o += n
    return Dist.gaussian(axis, rank, mean, cov=cov)


def _step(node, dists, index) -> Dist | None:
    out = node.output[0] if node.output else ""
    rank = index.rank(out)
    dist = dists.get(node.input[0]) if node.input else None
    op = node.op_type
    if rank is None or node.domain not in ("", "ai.onnx"):
        return None
    if op in ELEMENTWISE:  # the tracked operand may be in any slot (Add(bias, x))
        return _elementwise(node, dists, index, rank) if any(i in dists for i in node.input) else None
    if op in ("BatchNormalization", "InstanceNormalization"):
        gamma, beta = _value(index, node.input[1]), _value(index, node.input[2])
        return None if gamma is None else _normalized(dist if dist and dist.axis == 1 else None, gamma, beta, 1, rank)
    if op == "LayerNormalization" and attr(node, "axis", -1) % rank == rank - 1:
        gamma, beta = _value(index, node.input[1]), _value(index, node.input[2] if len(node.input) > 2 else "")
        ok = gamma is not None and gamma.ndim == 1
        return _normalized(dist if dist and dist.axis == rank - 1 else None, gamma, beta, rank - 1, rank) if ok else None
    if op == "Concat":
        return _concat(node, dists, rank)
    if dist is None:
        return None
    if op in SAME_CHANNELS:
        return dist if dist.axis == 1 else None
    handlers = {"Conv": _conv, "Gemm": _gemm, "MatMul": _matmul}
    if op in handlers:
        return handlers[op](node, dist, index, rank)
    if op in ("ReduceMean", "ReduceMax"):
        return _reduced(node, dist, index, rank)
    if op in ("Flatten", "Reshape", "Squeeze", "Unsqueeze"):
        return _reshaped(node, dist, index)
    if op == "Transpose":
        return _transpose(node, dist)
    return None


def propagate(analysis, wanted: set | None = None) -> dict:
    """{tensor: Dist} for every tensor the walk reaches (stops once `wanted` are all known)."""
    index = analysis.index
    dists = {}
    for name in index.graph_inputs:
        shape = index.shapes.get(name)
        if shape and len(shape) >= 2 and shape[1] and index.model.dtypes.get(name) in (1, 10, 11, 16):
            dists[name] = Dist.gaussian(1, len(shape), np.zeros(shape[1]), cov=np.eye(shape[1]))
    for node in index.graph.node:
        if wanted is not None and wanted <= dists.keys():
            break
        try:
            dist = _step(node, dists, index)
        except Exception:  # noqa: BLE001 - an op the reference evaluator cannot run ends the trail
            dist = None
        if dist is not None and node.output[0] in index.shapes:
            dists[node.output[0]] = dist
    return dists
