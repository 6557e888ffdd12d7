"""The correctness oracles of DESIGN.md, as functions every model test calls.

1. zero-invariance: zeroing the member slices of dropped channels in the original gives
   the pruned model's outputs (rel. err <= 1e-4) for zero-invariant groups;
2. ratio 0 is the identity;
3. every output passes onnx.checker(full_check) (or fails it no worse than its input)
   and runs in ONNX Runtime with the same output names, dtypes and shapes;
5. erasure: removing an exact erasable unit equals zeroing its last contraction (`zero`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from spa.backends import ort as ort_backend
from spa.passes.erase import erase_with_io

import spa
from spa import api
from spa.core import depth, kvcache
from spa.core.model import constant_node_value

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


def _zeroed_units(proto, units) -> onnx.ModelProto:
    """`proto` with each unit's `zero` tensors zeroed as its branch reads them (a zero copy the
    branch's nodes read instead: the exporter may share a tensor with other nodes)."""
    out = type(proto)()
    out.CopyFrom(proto)
    values = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    values.update({n.output[0]: constant_node_value(n) for n in out.graph.node if n.op_type == "Constant"})
    for k, u in enumerate(units):
        copies = {n: f"{n}.zero{k}" for n in u.zero}
        out.graph.initializer.extend(numpy_helper.from_array(np.zeros_like(values[n]), c) for n, c in copies.items())
        branch = set(u.nodes)
        for node in out.graph.node:
            if (node.name or node.output[0]) in branch:
                node.input[:] = [copies.get(i, i) for i in node.input]
    return out


def assert_erasure(model, feeds: dict, tol: float = TOL, single: int = 4) -> int:
    """Every exact erasable unit removed at once equals them all zeroed, and so does each of the
    first and last `single` ones alone (outputs within `tol`; same names and shapes). Returns the
    number of exact units."""
    units = [u for u in depth.find(model)[0] if u.exact]
    picks = [units] + [[u] for u in (units[:single] + units[-single:] if len(units) > 2 * single else units)]
    for chosen in picks if units else ():
        cut = type(model.proto)()
        cut.CopyFrom(model.proto)
        erased, io = erase_with_io(cut, [u.id for u in chosen])
        ports = {kvcache.RENAMED: io} if io else None
        if not io:
            assert [o.name for o in erased.graph.output] == [o.name for o in model.graph.output]
        zero = kvcache.fit(ort_backend.run(_zeroed_units(model.proto, chosen), feeds), ports)
        got = ort_backend.run(erased, kvcache.fit(feeds, ports))
        assert set(got) == set(zero)
        for name, ref in zero.items():
            if isinstance(ref, np.ndarray) and np.issubdtype(ref.dtype, np.floating):
                assert got[name].shape == ref.shape, name
                assert rel_err(ref, got[name]) <= tol, ([u.id for u in chosen][:3], name, rel_err(ref, got[name]))
    return len(units)
