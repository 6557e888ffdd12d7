"""The N:M pattern on an array: runs of M along one axis, at most N of them not zero.

    weight ─runs(axis, M)─▶ [runs, M] ─holds(N)─▶ every run has <= N values off the zero (point)

Shared by the sparsify pass (which writes the pattern) and the torch backend (which runs
2:4 weights through sparse kernels)."""

from __future__ import annotations

import numpy as np


def runs(w: np.ndarray, axis: int, m: int) -> np.ndarray:
    """[runs, M] view order: the reduction axis last, cut into runs of M."""
    return np.moveaxis(w, axis, -1).reshape(-1, m)


def holds(w: np.ndarray, axis: int, n: int, *, m: int, zero_point=None) -> bool:
    """Every run of M along `axis` has at most N values that are not zero (or the zero point)."""
    zero = 0 if zero_point is None else np.asarray(zero_point).reshape(()).item()
    return bool(((runs(w, axis, m) != zero).sum(axis=1) <= n).all())
