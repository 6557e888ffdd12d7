"""Calibrated N:M selection with second-order compensation (SparseGPT-style OBS).

    calibration data ─ONNX Runtime (layer inputs as extra outputs)─▶ per layer H = Σ x xᵀ
        (Conv: x is the unfolded input patch, ordered (kernel..., Cin/g) like the weight rows)
    W (rows: outputs, columns: reduction) ─column sweep─▶ every M columns: keep the N weights
        of least OBS error w² / [H⁻¹]ᵢᵢ² per row; each column's removed part is pushed onto
        the columns after it through the Cholesky factor of H⁻¹ (the OBS update)

This is the column-by-column reconstruction of Frantar & Alistarh, "SparseGPT: Massive Language
Models Can Be Accurately Pruned in One-Shot" (ICML 2023), with their N:M rule (masks chosen
per M-column run, in the sweep, on the already-updated weights) and lazy block updates. The
statistics come from one calibration pass through the dense model (not layer by layer through
the sparsified one, as SparseGPT does for transformer blocks): one ORT run for all layers.

A weight is compensated only when the layer sees it directly: a weight read through a
DequantizeLinear (its values are on a quantization grid), a batched MatMul weight (rank > 2),
a reduction wider than MAX_COLUMNS, or a layer whose input statistics are missing, falls back
to magnitude and says so in `Layer.reason`-like notes.
"""

from __future__ import annotations

import numpy as np
import onnx

from spa.core.data import fixed_batch_size, model_batches, require_keys, trim
from spa.core.errors import SpaError
from spa.core.runtime import ort_reason, session_with_outputs

DAMP = 0.01  # H + DAMP * mean(diag H) * I, as SparseGPT's percdamp
BLOCK = 128  # columns per lazy update block (rounded to a multiple of M)
MAX_COLUMNS = 8192  # a wider reduction keeps its magnitude mask (H would need > 512 MiB)
CHUNK = 1 << 22  # unfolded rows x columns per matrix product while accumulating H
MAX_ROWS = 4096  # input rows per layer per calibration batch; more are subsampled evenly at random


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _conv_pads(node, x_shape, w_shape) -> list:
    """Begin/end pads per spatial dim (explicit pads, or auto_pad resolved)."""
    a = _attrs(node)
    k = w_shape[2:]
    nd = len(k)
    strides = a.get("strides", [1] * nd)
    dil = a.get("dilations", [1] * nd)
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for i in range(nd):
            size = x_shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (k[i] - 1) * dil[i] + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pads_b.append(small if auto == "SAME_UPPER" else large)
            pads_e.append(large if auto == "SAME_UPPER" else small)
        return pads_b + pads_e
    if auto == "VALID":
        return [0] * (2 * nd)
    return list(a.get("pads", [0] * (2 * nd)))


def unfold(node, x: np.ndarray, w_shape, *, max_rows: int | None = None, rng=None) -> list:
    """Per conv group: rows of the unfolded input [samples*positions, prod(kernel) * Cin/g],
    columns ordered (kernel..., channel) like np.moveaxis(W, 1, -1). With max_rows, a random
    subset of that many (sample, position) rows, picked before anything is copied."""
    a = _attrs(node)
    k = list(w_shape[2:])
    nd = len(k)
    groups = a.get("group", 1)
    strides = a.get("strides", [1] * nd)
    dil = a.get("dilations", [1] * nd)
    pads = _conv_pads(node, x.shape, w_shape)
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[nd + i]) for i in range(nd)])
    span = [(k[i] - 1) * dil[i] + 1 for i in range(nd)]
    win = np.lib.stride_tricks.sliding_window_view(x, span, axis=tuple(range(2, 2 + nd)))
    # win: [N, C, out..., span...] -> stride the outputs, dilate the windows
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
              + tuple(slice(None, None, d) for d in dil)]
    where = (win.shape[0],) + win.shape[2:2 + nd]  # (sample, output position...)
    at = np.unravel_index(_pick(int(np.prod(where)), max_rows, rng), where)
    picked = win[(at[0], slice(None)) + at[1:]]  # [rows, C, kernel...]
    cg = x.shape[1] // groups
    return [np.moveaxis(picked[:, g * cg:(g + 1) * cg], 1, -1).reshape(len(picked), -1) for g in range(groups)]


def _pick(total: int, max_rows: int | None, rng) -> np.ndarray:
    """Row indices: all of them, or max_rows of them in order, drawn without replacement."""
    if max_rows is None or total <= max_rows:
        return np.arange(total)
    return np.sort((rng or np.random.default_rng(0)).choice(total, max_rows, replace=False))


def _input_rows(node, x: np.ndarray, w_shape, max_rows: int | None = None, rng=None) -> list:
    """What the weight multiplies, as rows [samples, reduction] (one entry per conv group),
    at most max_rows of them."""
    if node.op_type == "Conv":
        return unfold(node, x, w_shape, max_rows=max_rows, rng=rng)
    if node.op_type == "Gemm" and _attrs(node).get("transA", 0):
        x = x.T
    x = x.reshape(-1, x.shape[-1])
    return [x[_pick(len(x), max_rows, rng)]]


class _Hessian:
    def __init__(self, d: int, parts: int):
        self.h = [np.zeros((d, d)) for _ in range(parts)]
        self.rows = 0

    def add(self, parts: list) -> None:
        for h, rows in zip(self.h, parts):
            step = max(CHUNK // max(rows.shape[1], 1), 1)
            for s in range(0, len(rows), step):
                r = np.asarray(rows[s:s + step], dtype=np.float64)
                h += r.T @ r
        self.rows += len(parts[0])


def hessians(proto: onnx.ModelProto, targets: dict, dtypes: dict, *, data, max_samples: int = 256,
             batch_size: int = 32, max_rows: int = MAX_ROWS) -> dict:
    """{key: [H per conv group]} for targets {key: (node, consumer-view weight shape)}, from one
    pass of `data` (arrays keyed by input name) through ONNX Runtime. A layer that sees more
    than max_rows input rows in a batch (conv positions, tokens) uses a random max_rows of them:
    H is an average, and a few thousand rows estimate it well while a high-resolution conv
    would otherwise unfold millions."""
    names = list(dict.fromkeys(node.input[0] for node, _ in targets.values()))
    missing = [n for n in names if n not in dtypes]
    if missing:
        raise SpaError(f"no type known for layer input '{missing[0]}'", "run shape inference first")
    sess = session_with_outputs(proto, names, dtypes)
    inputs = [i.name for i in sess.get_inputs()]
    require_keys(data, inputs)
    acc: dict = {}
    seen = 0
    rng = np.random.default_rng(0)
    for feeds in model_batches({k: data[k] for k in inputs}, batch_size, fixed=fixed_batch_size(proto),
                               max_samples=max_samples):
        try:
            got = trim(dict(zip(names, sess.run(names, feeds))), feeds)
        except Exception as exc:  # noqa: BLE001 - ORT's many run errors, as one line
            raise SpaError(f"the calibration data does not run through the model: {ort_reason(exc)}") from None
        for key, (node, shape) in targets.items():
            parts = _input_rows(node, np.asarray(got[node.input[0]]), shape, max_rows, rng)
            acc.setdefault(key, _Hessian(parts[0].shape[1], len(parts))).add(parts)
        seen += 1
    if seen == 0:
        raise SpaError("no samples in the calibration data")
    return {key: [h / max(a.rows, 1) for h in a.h] for key, a in acc.items()}


def prune_columns(w: np.ndarray, h: np.ndarray, n: int, *, m: int, damp: float = DAMP) -> np.ndarray:
    """W [rows, d] (runs of M consecutive columns) made N:M with the OBS update, given H [d, d]."""
    w = np.array(w, dtype=np.float64)
    h = np.array(h, dtype=np.float64)
    d = w.shape[1]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * max(float(np.mean(np.diag(h))), 1e-12) * np.eye(d)
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H⁻¹ = Uᵀ U
    except np.linalg.LinAlgError:
        h += 0.1 * float(np.mean(np.diag(h))) * np.eye(d)
        u = np.linalg.cholesky(np.linalg.inv(h)).T
    block = m * max(BLOCK // m, 1)
    rows = np.arange(len(w))[:, None]
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        w1, u1 = w[:, i1:i2].copy(), u[i1:i2, i1:i2]
        err1 = np.zeros_like(w1)
        drop = np.zeros_like(w1, dtype=bool)
        for i in range(i2 - i1):
            if i % m == 0:  # choose this run's mask on the weights as updated so far
                score = w1[:, i:i + m] ** 2 / np.diag(u1)[i:i + m] ** 2
                worst = np.argsort(score, axis=1, kind="stable")[:, :m - n]
                drop[rows, i + worst] = True
            col = w1[:, i]
            q = np.where(drop[:, i], 0.0, col)
            err = (col - q) / u1[i, i]
            w1[:, i:] -= np.outer(err, u1[i, i:])
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w


def rows_view(w: np.ndarray, axis: int) -> np.ndarray:
    """The stored weight as [outputs, reduction] (reduction last, ordered like mask's runs)."""
    moved = np.moveaxis(w, axis, -1)
    return moved.reshape(-1, moved.shape[-1]) if w.ndim <= 2 else moved.reshape(w.shape[0], -1)


def from_rows(w2: np.ndarray, like: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(like, axis, -1)
    return np.moveaxis(w2.reshape(moved.shape), -1, axis).astype(like.dtype)


def reconstruct(w: np.ndarray, axis: int, hs: list, *, n: int, m: int) -> np.ndarray:
    """The stored weight made N:M with OBS compensation (`hs`: one H per conv group)."""
    w2 = rows_view(w, axis)
    out = np.empty_like(w2, dtype=np.float64)
    per = len(w2) // len(hs)
    for g, h in enumerate(hs):
        out[g * per:(g + 1) * per] = prune_columns(w2[g * per:(g + 1) * per], h, n, m=m)
    return from_rows(out, w, axis)
