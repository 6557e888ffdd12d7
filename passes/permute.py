"""Channel permutations that raise the magnitude an N:M mask keeps (as in NVIDIA's ASP).

    group (coupled channels, spa.analysis) ─▶ its "in" members that will be masked N:M
        ─▶ V[c] = |weights| channel c feeds (all such consumers, concatenated)
        ─greedy channel swaps between M-runs─▶ order (position c takes channel order[c])
        ─▶ every constant member of the group gathered in that order (weights, biases,
           norm parameters, on their producer and consumer sides alike)

Permuting a whole coupled group is exact: the producer writes channel order[c] where the
consumer now expects it, so the outputs do not change (up to float summation order), while
the N:M runs along the consumers' reduction axis group different channels. This is the idea of
Pool & Yu, "Channel Permutations for N:M Sparsity" (NeurIPS 2021), which ASP implements by
tracing the torch graph; here spa's channel groups give the coupling for any ONNX model.

Only groups whose every tensor is touched by order-agnostic ops (SAFE: no Split, Slice,
Gather, Reshape, grouped Conv, ...) and whose consumers read the channels as one aligned
block are permuted; `apply` is checked against the input on random inputs by the caller.
"""

from __future__ import annotations

import time

import numpy as np

SAFE = {
    "Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization",
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu",
    "Gelu", "Erf", "Softplus", "Mish", "Identity", "Cast", "Dropout", "Neg", "Abs", "Exp", "Sqrt", "Reciprocal",
    "Add", "Sub", "Mul", "Div", "Max", "Min", "Pow",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten",
}


def _safe(analysis, group) -> bool:
    index = analysis.index
    for tensor, _axis in group.positions:
        if index.is_const(tensor):
            continue
        nodes = list(index.consumers.get(tensor, [])) + ([index.producer[tensor]] if tensor in index.producer else [])
        if tensor in index.graph_outputs or tensor in index.graph_inputs:
            return False
        for node in nodes:
            if node.op_type not in SAFE or node.domain not in ("", "ai.onnx"):
                return False
            if node.op_type == "Conv":
                group_attr = next((a.i for a in node.attribute if a.name == "group"), 1)
                channels = index.shape(node.input[1])
                if group_attr != 1 and (channels is None or group_attr != channels[0]):
                    return False  # grouped (not depthwise): the groups' channel ranges are fixed
    return all(isinstance(p, np.ndarray) for p in group.positions.values())


def _consumers(group, eligible: dict, m: int) -> list:
    """(member, stored weight, aligned offset) of the group's "in" members masked N:M along
    their member axis, with one position per channel forming an M-aligned block."""
    out = []
    for member in group.members:
        layer = eligible.get(member.tensor)
        if member.role != "in" or layer is None or layer.axis != member.axis % len(layer.shape):
            continue
        pos = member.positions
        if not isinstance(pos, np.ndarray) or pos.shape[1] != 1:
            return []
        start = int(pos[0, 0])
        if start % m or not np.array_equal(pos[:, 0], start + np.arange(len(pos))):
            return []
        out.append((member, layer, start))
    return out


def _vectors(consumers, weights, size: int) -> np.ndarray:
    """V [channels, values]: |w| each channel contributes to its consumers' runs."""
    parts = []
    for member, layer, start in consumers:
        w = np.abs(np.asarray(weights.value(layer.weight), dtype=np.float32))
        moved = np.moveaxis(w, layer.axis, 0)[start:start + size]
        parts.append(moved.reshape(size, -1))
    return np.concatenate(parts, axis=1)


def _kept(v: np.ndarray, n: int) -> np.ndarray:
    """Σ over values of the N largest of each run: v [..., M, values] -> [...]."""
    return np.sort(v, axis=-2)[..., -n:, :].sum(axis=(-2, -1))


def search(v: np.ndarray, n: int, m: int, *, budget_s: float = 2.0, seed: int = 0) -> np.ndarray:
    """A channel order that raises the kept magnitude, by greedy swaps of two channels in two
    runs (the best swap for each run in turn), until no swap helps or the time budget ends."""
    size = len(v)
    order = np.arange(size)
    runs = size // m
    if runs < 2:
        return order
    deadline = time.perf_counter() + budget_s
    rng = np.random.default_rng(seed)
    cur = v.reshape(runs, m, -1).copy()  # the runs in the current order, swapped along with `order`
    least = 1e-6 * max(float(cur.sum()), 1e-30)
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        for a in rng.permutation(runs):
            if time.perf_counter() > deadline:
                break
            gain, others = _gains(cur, a, n, m)
            b, i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
            if gain[b, i, j] > least:
                b = others[b]
                order[a * m + i], order[b * m + j] = order[b * m + j], order[a * m + i]
                cur[[a, b], [i, j]] = cur[[b, a], [j, i]]
                improved = True
    return order


def _gains(cur: np.ndarray, a: int, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Gain in kept magnitude of swapping slot i of run `a` with slot j of each other run b:
    ([B, M, M], the runs b), in chunks of runs so memory stays bounded."""
    base = _kept(cur, n)
    others = np.array([b for b in range(len(cur)) if b != a])
    va = cur[a]
    chunk = max(CHUNK // (m ** 3 * va.shape[-1]), 1)
    gains = []
    for s in range(0, len(others), chunk):
        part = others[s:s + chunk]
        vb = cur[part]  # [B, M, R]
        new_a = np.broadcast_to(va, (len(part), m, m, m, va.shape[-1])).copy()  # [B, i, j, M, R]
        new_b = np.broadcast_to(vb[:, None, None], new_a.shape).copy()
        for i in range(m):
            new_a[:, i, :, i] = vb
            new_b[:, :, i, i] = va[None]
        gains.append(_kept(new_a, n) + _kept(new_b, n) - base[a] - base[part][:, None, None])
    return np.concatenate(gains), others


CHUNK = 1 << 23  # float32 values per candidate batch in the swap search


def plan(analysis, found: list, n: int, *, m: int, weights, budget_s: float = 2.0) -> tuple[dict, list]:
    """({group id: order}, per-group report) for the groups worth permuting."""
    eligible = {x.weight: x for x in found if x.eligible}
    orders, rows = {}, []
    for group in analysis.groups:
        if not group.prunable or group.size < 2 * m:
            continue
        consumers = _consumers(group, eligible, m)
        if not consumers or not _safe(analysis, group):
            continue
        if group.size % m:
            continue
        v = _vectors(consumers, weights, group.size)
        before = float(_kept(v.reshape(group.size // m, m, -1), n).sum())
        order = search(v, n, m, budget_s=budget_s)
        after = float(_kept(v[order].reshape(group.size // m, m, -1), n).sum())
        total = max(float(v.sum()), 1e-30)
        rows.append({"group": group.id, "channels": group.size, "retained_before": before / total,
                     "retained_after": after / total, "permuted": after > before})
        if after > before:
            orders[group.id] = order
    return orders, rows


def apply(analysis, orders: dict, weights) -> None:
    """Gather every constant member of each permuted group in its order (in place, on `weights`)."""
    index = analysis.index
    for gid, order in orders.items():
        group = analysis.group(gid)
        for (tensor, axis), per_channel in group.positions.items():
            if not index.is_const(tensor) or weights.value(tensor) is None:
                continue
            w = weights.value(tensor)
            idx = np.arange(w.shape[axis])
            idx[per_channel.reshape(-1)] = per_channel[order].reshape(-1)
            weights.set(tensor, np.take(w, idx, axis=axis))
