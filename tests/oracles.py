"""The correctness oracles of DESIGN.md, as functions every model test calls.

1. zero-invariance: zeroing the member slices of dropped channels in the original gives
   the pruned model's outputs (rel. err <= 1e-4) for zero-invariant groups;
2. ratio 0 is the identity;
3. every output passes onnx.checker(full_check) (or fails it no worse than its input)
   and runs in ONNX Runtime with the same output names, dtypes and shapes.
"""

from __future__ import annotations

import numpy as np
from spa.backends import ort as ort_backend

import spa
from spa import api

TOL = 1e-4


def feeds_for(model, entry: dict | None = None, seed: int = 0) -> dict:
    """Random feeds; corpus entries may name their feed shapes or need real values."""
    feeds = ort_backend.random_feeds(model.proto, seed=seed)
    rng = np.random.default_rng(seed)
    for name, shape in ((entry or {}).get("ort_feed_shapes") or {}).items():
        if name in feeds and list(feeds[name].shape) != shape:
            feeds[name] = rng.standard_normal(shape).astype(feeds[name].dtype)
    if entry and "silero" in entry["file"]:
        feeds = {"input": rng.standard_normal((1, 512)).astype(np.float32),
                 "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, dtype=np.int64)}
    return feeds


def random_zi_plan(analysis, seed: int = 0, fraction: float = 0.5) -> dict:
    """A random drop set in every prunable zero-invariant group (never all channels)."""
    rng = np.random.default_rng(seed)
    plan = {}
    for g in analysis.groups:
        if not (g.prunable and g.zero_invariant):
            continue
        free = [i for i in range(g.size) if i not in g.locked]
        k = max(1, min(len(free) - (0 if g.locked else 1), round(g.size * fraction)))
        plan[g.id] = sorted(int(i) for i in rng.choice(free, size=k, replace=False))
    return plan


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(a64), 1e-12))


def assert_zero_invariance(model, feeds: dict, seed: int = 0, tol: float = TOL) -> dict:
    """Prune random drop sets of every zero-invariant group; outputs equal the zeroed original."""
    analysis = spa.analyze(model)
    plan = random_zi_plan(analysis, seed)
    pruned = api.prune(analysis, plan)
    zero = ort_backend.run(api.zeroed(analysis, plan), feeds)
    got = ort_backend.run(pruned, feeds)
    assert set(zero) == set(got)
    for name, ref in zero.items():
        if isinstance(ref, np.ndarray) and np.issubdtype(ref.dtype, np.floating):
            assert got[name].shape == ref.shape, name
            assert rel_err(ref, got[name]) <= tol, (name, rel_err(ref, got[name]))
    return plan


def assert_identity_at_ratio_zero(model, feeds: dict) -> None:
    analysis = spa.analyze(model)
    plan = api.make_plan(analysis, 0.0)
    assert plan == {}
    pruned = api.prune(analysis, plan)
    ref, got = ort_backend.run(model.proto, feeds), ort_backend.run(pruned, feeds)
    for name, r in ref.items():
        if isinstance(r, np.ndarray):
            np.testing.assert_array_equal(got[name], r)


def assert_valid_output(model, pruned, feeds: dict) -> None:
    """Same input/output names and dtypes, non-channel dims unchanged, runs in ORT."""
    assert [i.name for i in pruned.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in pruned.graph.output] == [o.name for o in model.graph.output]
    for a, b in zip(model.graph.input, pruned.graph.input):
        assert a.type.tensor_type.elem_type == b.type.tensor_type.elem_type
    ref, got = ort_backend.run(model.proto, feeds), ort_backend.run(pruned, feeds)
    for name, r in ref.items():
        if isinstance(r, np.ndarray):
            assert got[name].shape == r.shape and got[name].dtype == r.dtype, name
