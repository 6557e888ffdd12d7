"""OBSPA: group-level Optimal Brain Surgeon saliency and compensation (docs/obspa.md).

    group ─"in" members─▶ consumer weights W (rows: positions along the read axis)
          ─Stats─▶ H = E[x xᵀ] of what they read ─▶ saliency of channel c (positions P):
                   tr(W_Pᵀ [(H⁻¹)_PP]⁻¹ W_P) / tr(Wᵀ H W)        (relative output error)
    plan ─▶ per consumer: R = kept positions ─▶ W_R ← (H_RR)⁻¹ E[x_R xᵀ] W,  W_S ← 0

The update is the least-squares optimum (the OBS update in closed form): the remaining inputs
take over what the removed ones carried, as far as their correlations allow.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np

from spa.core.data import samples_used
from spa.core.graph import attr
from spa.core.values import zeroed
from spa.scoring.stats import calibrate, read_spaces, reference_session

NOT_COMPENSATED = ": not compensated"  # how the note of a consumer left as it was ends
DAMP = 0.01  # H + DAMP * mean(diag H) * I: removed channels may be (near) constant


def hessian(stats, member, d: int) -> np.ndarray | None:
    """E[x xᵀ] of what `member` reads (d x d), or None when unknown, of another width or wider
    than spa.stats.GRAM_MAX (a Flatten into a classifier: no full matrix is kept)."""
    mom = stats.get(member.reads) if stats is not None and member.reads is not None else None
    if mom is None or len(mom.sq) != d or mom.gram is None:
        return None
    return mom.gram


def inverse(h: np.ndarray) -> np.ndarray:
    damp = DAMP * max(float(np.mean(np.diag(h))), 1e-12)
    return np.linalg.inv(h + damp * np.eye(len(h)))


def rows(w: np.ndarray, axis: int) -> np.ndarray:
    """`w` with `axis` first, flattened to (d, rest): each row one position of the read axis."""
    return np.moveaxis(np.asarray(w, dtype=np.float64), axis, 0).reshape(w.shape[axis], -1)


def _energy(w2: np.ndarray, h: np.ndarray) -> float:
    """tr(Wᵀ H W): the consumer's output energy, what saliencies are relative to."""
    return max(float(np.sum((h @ w2) * w2)), 1e-30)


def _block_saliency(w2: np.ndarray, hinv: np.ndarray, pos) -> np.ndarray:
    if isinstance(pos, np.ndarray) and pos.shape[1] == 1:  # one position per channel: no solves
        p = pos[:, 0]
        return np.einsum("ij,ij->i", w2[p], w2[p]) / np.maximum(np.diag(hinv)[p], 1e-30)
    if isinstance(pos, np.ndarray):
        blocks = hinv[pos[:, :, None], pos[:, None, :]]
        wp = w2[pos]
        return np.sum(np.linalg.solve(blocks, wp) * wp, axis=(1, 2))
    return np.array([np.sum(np.linalg.solve(hinv[np.ix_(p, p)], w2[p]) * w2[p]) for p in pos])


GREEDY_BUDGET = 3e8  # multiply-adds: above this a group is scored in one shot


def greedy(group, weights, stats) -> np.ndarray | None:
    """OBS removal order: remove the channel of least summed relative error, apply the OBS
    update to the consumers (weights and inverse Hessians), repeat. Score = the accumulated error
    when the channel went, so redundant channels (copies of each other) are not all dropped.
    Falls back to one-shot `saliency` when the group is too large for the budget."""
    found = _analysable(group, weights, stats)
    if not found:
        return None
    cost = sum(group.size * (len(h) ** 2 + w2.size) for _, w2, h in found)
    if cost * max(np.size(found[0][0].positions[0]), 1) > GREEDY_BUDGET:
        return saliency(group, weights, stats)
    state = [(m.positions, w2.copy(), inverse(h), _energy(w2, h)) for m, w2, h in found]
    alive = np.ones(group.size, dtype=bool)
    scores, total = np.zeros(group.size), 0.0
    for _ in range(group.size):
        err = sum(_block_saliency(w2, hinv, pos) / energy for pos, w2, hinv, energy in state)
        err[~alive] = np.inf
        c = int(np.argmin(err))
        total += float(err[c])
        scores[c], alive[c] = total, False
        for pos, w2, hinv, _ in state:
            p = np.ravel(pos[c])
            step = hinv[:, p] @ np.linalg.inv(hinv[np.ix_(p, p)])
            w2 -= step @ w2[p]
            hinv -= step @ hinv[p, :]
            hinv[p, :], hinv[:, p] = 0.0, 0.0  # removed: decoupled (an identity block keeps the
            hinv[np.ix_(p, p)] = np.eye(len(p))  # solves regular), never chosen again
    return scores


def _analysable(group, weights, stats) -> list:
    """(member, its weight as rows, H) for each consumer of the group with known statistics."""
    found = []
    for m in consumers(group):
        w = weights[m.tensor]
        h = hessian(stats, m, w.shape[m.axis])
        if h is not None:
            found.append((m, rows(w, m.axis), h))
    return found


def unscored(analysis, stats) -> dict[str, list[str]]:
    """{group id: op types producing what its consumers read} for the prunable groups OBSPA cannot
    score from `stats` (no consumer reads a space with known statistics): known before scoring, so
    a run can say up front which groups fall back to l1 and why."""
    found = {}
    for g in analysis.groups:
        if not g.prunable:
            continue
        reads = [m.reads for m in consumers(g) if m.reads is not None]
        if not any(hessian(stats, m, analysis.sizes.get(m.reads, -1)) is not None for m in consumers(g) if m.reads):
            producers = [analysis.index.producer.get(t) for t, _ in reads]
            found[g.id] = sorted({p.op_type for p in producers if p is not None}) or ["a model input"]
    return found


def consumers(group) -> list:
    return [m for m in group.members if m.role == "in"]


def saliency(group, weights, stats) -> np.ndarray | None:
    """Summed relative error over the group's analysable consumers, each channel removed alone
    (one shot); None if it has none."""
    found = _analysable(group, weights, stats)
    if not found:
        return None
    return sum(_block_saliency(w2, inverse(h), m.positions) / _energy(w2, h) for m, w2, h in found)


def _dropped(analysis, plan: dict) -> dict:
    """(tensor, axis) -> (member, set of dropped positions) for every "in" member of the plan."""
    out = {}
    for gid, channels in plan.items():
        for m in consumers(analysis.group(gid)):
            entry = out.setdefault((m.tensor, m.axis), (m, set()))
            for c in channels:
                entry[1].update(int(p) for p in np.ravel(m.positions[c]))
    return out


def compensate(analysis, plan: dict, stats, *, base: dict | None = None) -> dict:
    """{tensor: updated array}: consumer weights with the OBS update for the dropped channels
    (`base`: current arrays of some tensors). Consumers without statistics keep their weights
    (listed in `stats.notes`).

    The update is least squares on the kept positions R: W_R <- (H_RR + damp)⁻¹ E[x'_R xᵀ] W, so
    the layer's output from the kept inputs x' best matches its output from all inputs x (x' = x
    one-shot; with paired statistics x is the reference model's and x' the pruned model's). Where
    the consumer has a bias of its own (`bias_of`), a constant input joins R: the bias takes over
    the mean of what was removed (bias correction), and the weights fit what varies."""
    base = base or {}
    updated = {}
    for (tensor, axis), (member, dropped) in _dropped(analysis, plan).items():
        w = updated.get(tensor, base.get(tensor))
        w = analysis.index.value(tensor) if w is None else w
        h = hessian(stats, member, w.shape[axis])
        if h is None or not dropped:
            if h is None:
                stats.note(f"no statistics for what '{tensor}' reads{NOT_COMPENSATED}")
            continue
        mom = stats.get(member.reads)
        cross = mom.cross if mom.cross is not None else h
        w2 = rows(w, axis)
        keep = np.setdiff1d(np.arange(len(h)), np.array(sorted(dropped)))
        h_rr = h[np.ix_(keep, keep)]
        damp = DAMP * max(float(np.mean(np.diag(h_rr))), 1e-12)
        lhs, rhs = h_rr + damp * np.eye(len(keep)), cross[:, keep].T @ w2
        bias = bias_of(analysis.index, tensor, axis, shape=w.shape) if BIAS_CORRECTION else None
        if bias is not None:  # the constant 1 as one more input: E[x'_R], E[x] in the normal equations
            mean_new = np.asarray(mom.mean, dtype=np.float64)[keep]
            mean_ref = np.asarray(mom.mean if mom.ref_mean is None else mom.ref_mean, dtype=np.float64)
            lhs = np.block([[lhs, mean_new[:, None]], [mean_new[None, :], np.ones((1, 1))]])
            rhs = np.vstack([rhs, mean_ref @ w2])
        solved = np.linalg.solve(lhs, rhs)
        new = np.zeros_like(w2)
        new[keep] = solved[:len(keep)]
        moved = np.moveaxis(np.asarray(w), axis, 0)
        updated[tensor] = np.moveaxis(new.reshape(moved.shape), 0, axis).astype(w.dtype)
        if bias is not None:
            name, fold = bias
            b = updated.get(name, base.get(name))
            b = np.asarray(analysis.index.value(name) if b is None else b)
            updated[name] = (b + fold(solved[len(keep)]).reshape(b.shape)).astype(b.dtype)
    return updated


BIAS_CORRECTION = True  # compensate also corrects the consumers' biases (off: weights only, for comparisons)


def bias_of(index, tensor: str, axis: int, *, shape: tuple):
    """(bias tensor, fold) of the layer whose weight `tensor` reads along `axis`, or None: fold
    maps a row of the weight's row layout (`rows`) to the bias's change. Conv (group 1: a row is
    out channels x taps, summed over the taps; without a bias, the running mean of a
    BatchNormalization that alone reads it), Gemm (scaled by alpha / beta) and MatMul followed
    by an Add of a constant; the bias must be a stored constant of that layer alone."""
    users = index.consumers.get(tensor, [])
    if len(users) != 1 or users[0].domain not in ("", "ai.onnx") or list(users[0].input[1:2]) != [tensor]:
        return None
    node, out = users[0], None
    name = node.input[2] if len(node.input) > 2 else ""
    if node.op_type == "Conv" and axis == 1 and attr(node, "group", 1) == 1:
        out, fold = shape[0], lambda row: row.reshape(shape[0], -1).sum(1)
        norms = index.consumers.get(node.output[0], [])
        if not name and len(norms) == 1 and norms[0].op_type == "BatchNormalization" and len(norms[0].input) > 3:
            # no bias but a BatchNormalization next: its running mean takes the change, negated
            node, name, fold = norms[0], norms[0].input[3], lambda row: -row.reshape(shape[0], -1).sum(1)
    elif node.op_type == "Gemm" and axis == (1 if attr(node, "transB", 0) else 0) and len(shape) == 2:
        beta = attr(node, "beta", 1.0)
        if beta:  # beta 0: the bias is never read
            out, scale = shape[1 - axis], attr(node, "alpha", 1.0) / beta
            fold = lambda row: row * scale
    elif node.op_type == "MatMul" and axis == 0 and len(shape) == 2:
        adds = index.consumers.get(node.output[0], [])
        if len(adds) == 1 and adds[0].op_type == "Add" and adds[0].domain in ("", "ai.onnx"):
            name = next((i for i in adds[0].input if i != node.output[0]), "")
            out, fold, node = shape[1], (lambda row: row), adds[0]
    if out is None or not _own(index, name, node):
        return None
    value = index.value(name)
    if value.size != out or value.shape[-1] != out:
        return None
    return name, fold


def _own(index, name: str, node) -> bool:
    """Whether `name` is a stored constant (initializer or Constant node) that `node` alone reads."""
    if not name or (name not in index.initializers and name not in index.constant_nodes):
        return False
    return index.value(name) is not None and all(n is node for n in index.consumers.get(name, []))


STAGES = 4  # calibrated compensation re-measures the pruned model at most this many times (8: no better
# on the PP-OCR models at twice the cost, docs/benchmarks.md "Third pass")
STAGE_MACS = 4.5e11  # ... more on cheap models: as many as keep samples x MACs x stages under this (one per
# group at most): the PP-OCR classifier's 26 groups one by one, 0.950 at MACs 0.5 against 0.930 in 4 stages


def stage_count(groups: int, samples: int, macs) -> int | None:
    """Stages for the calibrated compensation of `groups` groups on `samples` samples of a model of
    `macs` per sample: STAGES, or more where that stays under STAGE_MACS (None: one per group)."""
    if not macs or samples < 1:
        return STAGES
    n = int(STAGE_MACS // (samples * macs))
    return None if n >= groups else max(STAGES, n)


ROWS = 4096  # rows (positions x samples) of each space drawn per batch for its moments
BATCH = 16  # samples per ONNX Runtime run while compensating: bounds the activations held at once


# calibrated compensation also re-estimates the BatchNormalizations right after its layers: off, as it
# measured no better on PP-OCR (docs/obspa.md, "Re-estimating normalization statistics")
RENORM = False
RENORM_SAMPLES = 64  # calibration samples for that re-estimation (per-channel means and variances)


def norms_after(index, tensors) -> list:
    """The BatchNormalization nodes that alone read the output of a Conv or Gemm whose weight is
    one of `tensors`, with stored statistics of their own (each once, in the order of `tensors`)."""
    found = []
    for tensor in tensors:
        for node in index.consumers.get(tensor, []):
            if node.op_type not in ("Conv", "Gemm") or list(node.input[1:2]) != [tensor]:
                continue
            users = index.consumers.get(node.output[0], [])
            norm = users[0] if len(users) == 1 else None
            if norm is None or norm.op_type != "BatchNormalization" or len(norm.input) < 5 or norm in found:
                continue
            if norm.input[0] == node.output[0] and all(_own(index, name, norm) for name in norm.input[1:5]):
                found.append(norm)
    return found


def renormalize(analysis, norms: list, calib, *, source, max_samples: int = RENORM_SAMPLES,
                batch_size: int = BATCH) -> dict:
    """{running mean/var tensor: array}: each BatchNormalization of `norms` re-estimated on `calib`
    so that it maps what it now reads (in `source`, the model pruned and compensated so far) as it
    mapped the dense model's input: with m, s the dense input's per-channel mean and deviation on
    the data and m', s' the pruned one's, the normalization of x' equals the old one of
    (x' - m') s / s' + m (running mean m' - (m - mu) s'/s, deviation sigma s'/s). Channels with no
    variance left keep their variance and only move their mean. mu, sigma are the dense model's
    (a bias correction of the running mean is replaced, not added to)."""
    spaces = [(norm.input[0], 1) for norm in norms]
    stats = calibrate(analysis, calib, spaces, max_samples=max_samples, batch_size=batch_size, source=source,
                      reference=reference_session(analysis, spaces, only=True), max_rows=ROWS)
    out = {}
    for norm in norms:
        mom = stats.get((norm.input[0], 1))
        names = norm.input[3], norm.input[4]
        mu, var = (np.asarray(analysis.index.value(n), dtype=np.float64) for n in names)  # the dense model's
        eps = attr(norm, "epsilon", 1e-5)
        dev_new = np.sqrt(np.maximum(mom.sq - mom.mean**2, 0.0))
        dev_ref = np.sqrt(np.maximum(mom.ref_sq - mom.ref_mean**2, 0.0))
        live = (dev_new > 1e-6 * max(float(dev_ref.max(initial=0.0)), 1e-12)) & (dev_ref > 0)
        scale = np.where(live, dev_new / np.where(live, dev_ref, 1.0), 1.0)
        sigma = np.sqrt(var + eps) * scale
        dtype = analysis.index.value(names[0]).dtype
        out[names[0]] = (mom.mean - (mom.ref_mean - mu) * scale).astype(dtype)
        out[names[1]] = np.where(live, np.maximum(sigma**2 - eps, 0.0), var).astype(dtype)
    return out


def stages(order: list, count: int | None = STAGES) -> list[list]:
    """`order` cut into at most `count` runs of consecutive groups (None or 0: one group each)."""
    count = len(order) if not count else min(count, len(order))
    bounds = np.linspace(0, len(order), count + 1).round().astype(int)
    return [order[a:b] for a, b in pairwise(bounds) if b > a]


def sequential(analysis, plan: dict, calib, *, max_samples: int = 512, batch_size: int = BATCH, progress=None,
               stages_count: int | None = STAGES, max_rows: int | None = ROWS):
    """Calibrated compensation in graph order, stage by stage: each stage's consumers are measured
    on the model with the earlier stages' groups already removed (zeroed) and compensated, so their
    updates also absorb what the earlier removals changed (errors do not compound); with RENORM,
    after each stage the BatchNormalizations right after its updated layers are re-estimated
    (`renormalize`). A stage is
    `stages_count`-th of the groups (None: one group, the exact sequence); each measurement runs
    only the part of the model, dense and current, that its spaces depend on, and draws at most
    `max_rows` rows of each space per batch. `progress(done, total)` in groups (fractional within
    a stage) after every batch.
    Returns ({tensor: array}, notes)."""
    values, notes = {}, []
    order = [g for g in analysis.groups if plan.get(g.id)]
    done: dict = {}
    for stage in stages(order, stages_count):
        spaces = read_spaces(analysis, stage)
        step = None if progress is None else _within(progress, len(done), len(stage), len(order), calib, max_samples)
        stats = calibrate(analysis, calib, spaces, max_samples=max_samples, batch_size=batch_size, progress=step,
                          source=zeroed(analysis, done, values),
                          reference=reference_session(analysis, spaces, only=True), max_rows=max_rows)
        part = {g.id: plan[g.id] for g in stage}
        changed = compensate(analysis, part, stats, base=values)
        values.update(changed)
        notes += [n for n in stats.notes if n not in notes]
        done.update(part)
        norms = norms_after(analysis.index, changed) if RENORM else []
        if norms:
            values.update(renormalize(analysis, norms, calib, source=zeroed(analysis, done, values),
                                      batch_size=batch_size))
        if progress is not None:
            progress(len(done), len(order))
    return values, notes


def _within(progress, before: int, size: int, total: int, calib, max_samples: int):
    """calibrate's per-batch progress(seen, cap) as progress(groups done, total) (a fraction of the
    stage's groups per sample seen)."""
    samples = max(samples_used(calib, max_samples), 1)
    return lambda seen, _: progress(before + size * min(seen / samples, 1.0), total)
