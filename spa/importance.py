"""Channel importance criteria: `(group, weights) -> scores[group.size]`.

A criterion sees only the group's members (parameter slices), never op types. Magnitude
criteria score each weight member (rank >= 2; vectors such as biases or BatchNorm
statistics only when a group has no weight member), normalise each member's scores to
mean 1 so a large layer does not drown a small one, and average over members.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CRITERIA: dict[str, Callable] = {}


def criterion(name: str):
    def deco(fn):
        CRITERIA[name] = fn
        return fn

    return deco


def get(name: str) -> Callable:
    from .errors import SpaError

    if name not in CRITERIA:
        raise SpaError(f"unknown criterion '{name}'", f"choose one of: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name]


def _member_norms(group, weights, power: int) -> list[np.ndarray]:
    members = [m for m in group.members if weights[m.tensor].ndim >= 2] or group.members
    out = []
    for m in members:
        w = weights[m.tensor]
        axes = tuple(a for a in range(w.ndim) if a != m.axis)
        mag = np.abs(w) if power == 1 else np.square(w, dtype=np.float64 if w.dtype == np.float16 else None)
        per_pos = mag.sum(axis=axes, dtype=np.float64) if axes else mag.astype(np.float64)
        if isinstance(m.positions, np.ndarray):  # (channels, positions): one gather
            scores = per_pos[m.positions].sum(axis=1)
        else:
            scores = np.array([per_pos[np.asarray(ix)].sum() for ix in m.positions])
        mean = scores.mean()
        out.append(scores / mean if mean > 0 else scores)
    return out


@criterion("l1")
def l1(group, weights, data=None, seed=0) -> np.ndarray:
    """Sum of |w| over each channel's slices."""
    return np.mean(_member_norms(group, weights, 1), axis=0)


@criterion("l2")
def l2(group, weights, data=None, seed=0) -> np.ndarray:
    """Euclidean norm of each channel's slices."""
    return np.sqrt(np.mean(_member_norms(group, weights, 2), axis=0))


@criterion("random")
def random(group, weights, data=None, seed=0) -> np.ndarray:
    """Uniform random scores (a baseline), seeded per group id so runs repeat."""
    rng = np.random.default_rng([seed, *group.id.encode()])
    return rng.random(group.size)


def _channel_vectors(w: np.ndarray, m) -> np.ndarray:
    """(channels, features): each channel's slices of `w` along the member axis, flattened."""
    moved = np.moveaxis(w.astype(np.float64), m.axis, 0)
    if isinstance(m.positions, np.ndarray):
        return moved[m.positions].reshape(len(m.positions), -1)
    flat = [moved[np.asarray(ix)].ravel() for ix in m.positions]
    width = max(len(f) for f in flat)
    return np.stack([np.pad(f, (0, width - len(f))) for f in flat])


@criterion("fpgm")
def fpgm(group, weights, data=None, seed=0) -> np.ndarray:
    """Filter pruning via geometric median (He et al., CVPR 2019): a channel whose slices lie
    close to all the others (near their geometric median) is replaceable, so it scores low.
    Score = summed Euclidean distance to the other channels, per weight member, normalised
    to mean 1 and averaged over members."""
    members = [m for m in group.members if weights[m.tensor].ndim >= 2] or group.members
    out = []
    for m in members:
        v = _channel_vectors(weights[m.tensor], m)
        sq = np.square(v).sum(1)
        dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * v @ v.T, 0.0)).sum(1)
        mean = dist.mean()
        out.append(dist / mean if mean > 0 else dist)
    return np.mean(out, axis=0)


def score(analysis, name: str, groups=None, seed: int = 0) -> dict[str, np.ndarray]:
    """Scores for every prunable group (or `groups`)."""
    fn = get(name)
    groups = [g for g in analysis.groups if g.prunable] if groups is None else groups
    # one group's weights at a time (peak memory near two groups, not the model); neighbours
    # share tensors (a conv's weight is a member of its output group and its input group)
    scores, held = {}, {}
    for g in groups:
        held = {m.tensor: held[m.tensor] if m.tensor in held else analysis.index.value(m.tensor) for m in g.members}
        scores[g.id] = fn(g, held, seed=seed)
    return scores
