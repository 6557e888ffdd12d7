"""Scores of erasable units (spa.core.depth): how much each residual branch changes the stream.

    batches ─ONNX Runtime (x, f(x), y as extra outputs)─▶ per unit:
        influence = 1 - cos(x, y)           ShortGPT's block influence (Men et al. 2024), per token
        relative  = |f(x)| / |x|            the branch's size against the stream it adds to

A unit whose output is nearly its input (low influence) is the first to erase. On calibration
data this is the measured block influence; without it the same quantities are measured on
random inputs at the model's shapes (the check's inputs: decoders get a consistent mask and
cache), which ranks branches by what their weights do to a generic stream. Vectors are the last
axis of a rank-3 tensor (a transformer's tokens) and whole samples otherwise (a CNN's maps).
"""

from __future__ import annotations

import numpy as np

from spa.core.checks import agreement_batches
from spa.core.runtime import outputs, session_with_outputs


def influence(model, units: list, calib=None, *, seed: int = 0, shapes=None) -> tuple[dict, str]:
    """({unit id: {"influence", "relative"}}, "calibration" | "random") for `units` of the spa
    Model `model`, measured on the first samples of `calib` (arrays keyed by input name) or on
    random inputs."""
    if not units:
        return {}, "none"
    batches, source = agreement_batches(model.proto, calib, seed, shapes=shapes)
    names = list(dict.fromkeys(n for u in units for n in (u.skip, u.branch, u.id)))
    sess = session_with_outputs(model.proto, names, model.dtypes)
    sums = {u.id: np.zeros(2) for u in units}
    for feeds in batches:
        got = outputs(sess, feeds)
        for u in units:
            sums[u.id] += (_influence(got[u.skip], got[u.id]), _relative(got[u.skip], got[u.branch]))
    n = max(len(batches), 1)
    return {uid: {"influence": float(s[0] / n), "relative": float(s[1] / n)} for uid, s in sums.items()}, source


def branch_means(model, units: list, calib) -> dict[str, np.ndarray]:
    """{unit id: the mean of its branch output over the first samples of `calib`, per channel (axis
    1 of an image-like map, the last axis of a rank-2/3 tensor), shaped to broadcast against it}:
    the constant that best stands in for an erased branch (least squares), so the stream keeps
    its offset (a BatchNorm's shift, a projection's bias)."""
    batches, _ = agreement_batches(model.proto, calib)
    sess = session_with_outputs(model.proto, [u.branch for u in units], model.dtypes)
    sums, counts, dtypes = {}, {}, {}
    for feeds in batches:
        got = outputs(sess, feeds)
        for u in units:
            dtypes[u.id] = np.asarray(got[u.branch]).dtype
            f = np.asarray(got[u.branch], np.float64)
            axis = f.ndim - 1 if f.ndim <= 3 else 1
            other = tuple(k for k in range(f.ndim) if k != axis)
            sums[u.id] = sums.get(u.id, 0) + f.sum(axis=other, keepdims=f.ndim > 3)
            counts[u.id] = counts.get(u.id, 0) + f.size // max(f.shape[axis], 1)
    return {uid: (total / max(counts[uid], 1)).astype(dtypes[uid]) for uid, total in sums.items()}


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return a.reshape(-1, a.shape[-1]) if a.ndim == 3 else a.reshape(a.shape[0] if a.ndim else 1, -1)


def _influence(x: np.ndarray, y: np.ndarray) -> float:
    a, b = _rows(x), _rows(y)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, np.sum(a * b, axis=1) / np.maximum(norms, 1e-30), 1.0)
    return float(np.mean(1.0 - cos))


def _relative(x: np.ndarray, f: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(f, np.float64)) / max(np.linalg.norm(np.asarray(x, np.float64)), 1e-30))


def choose(units: list, scores: dict, count: int, *, key: str = "influence") -> list[str]:
    """The `count` units of lowest `key` score (ties: the later unit first), in graph order."""
    if count <= 0:
        return []
    order = {u.id: k for k, u in enumerate(units)}
    ranked = sorted(units, key=lambda u: (scores[u.id][key], -order[u.id]))
    picked = {u.id for u in ranked[:count]}
    return [u.id for u in units if u.id in picked]
