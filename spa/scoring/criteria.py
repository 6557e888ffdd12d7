"""Channel importance criteria: `(group, weights, data, seed) -> scores[group.size]`.

A criterion sees only the group's members (parameter slices, with the roles the rules gave
them), never op types. Magnitude criteria score each weight member (rank >= 2; vectors such
as biases or BatchNorm statistics only when a group has no weight member), normalise each
member's scores to mean 1 so a large layer does not drown a small one, and average over
members. Criteria that need activation statistics (`needs`) get a spa.stats.Stats as `data`:
"calibration" ones only from data, "moments" ones also from the graph alone (data-free).
"gradients" ones get a spa.gradients.Saliency (per-weight scores through spa.torch).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from spa.core.errors import SpaError
from spa.core.sizes import FLOAT_TYPES
from spa.scoring import obspa as obs
from spa.scoring.gradients import channel_scores

CRITERIA: dict[str, Callable] = {}
NEEDS: dict[str, str] = {}  # criterion -> "calibration" | "moments" | "gradients"


def criterion(name: str, needs: str | None = None):
    def deco(fn):
        CRITERIA[name] = fn
        if needs:
            NEEDS[name] = needs
        return fn

    return deco


def get(name: str) -> Callable:
    if name not in CRITERIA:
        raise SpaError(f"unknown criterion '{name}'", f"choose one of: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name]


def _scored_members(group, weights) -> list:
    """The members a weight criterion reads: float (not quantized codes, which carry no magnitude),
    matrices before vectors. Read from the tensors' metadata where `weights` has it (no loading)."""
    meta = getattr(weights, "meta", None) or (lambda name: (weights[name].dtype.kind, weights[name].ndim))
    kinds = {m.tensor: meta(m.tensor) for m in group.members}
    floats = [m for m in group.members if kinds[m.tensor][0] == "f"] or group.members
    return [m for m in floats if kinds[m.tensor][1] >= 2] or floats


def _member_norms(group, weights, power: int) -> list[np.ndarray]:
    members = _scored_members(group, weights)
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


# positional: the criterion contract fn(group, weights, data, seed), called positionally through CRITERIA
@criterion("l1")
def l1(group, weights, data=None, seed=0) -> np.ndarray:
    """Sum of |w| over each channel's slices."""
    return np.mean(_member_norms(group, weights, 1), axis=0)


# positional: the criterion contract fn(group, weights, data, seed), called positionally through CRITERIA
@criterion("l2")
def l2(group, weights, data=None, seed=0) -> np.ndarray:
    """Euclidean norm of each channel's slices."""
    return np.sqrt(np.mean(_member_norms(group, weights, 2), axis=0))


# positional: the criterion contract fn(group, weights, data, seed), called positionally through CRITERIA
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


# positional: the criterion contract fn(group, weights, data, seed), called positionally through CRITERIA
@criterion("fpgm")
def fpgm(group, weights, data=None, seed=0) -> np.ndarray:
    """Filter pruning via geometric median (He et al., CVPR 2019): a channel whose slices lie
    close to all the others (near their geometric median) is replaceable, so it scores low.
    Score = summed Euclidean distance to the other channels, per weight member, normalised
    to mean 1 and averaged over members."""
    members = _scored_members(group, weights)
    out = []
    for m in members:
        v = _channel_vectors(weights[m.tensor], m)
        sq = np.square(v).sum(1)
        dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * v @ v.T, 0.0)).sum(1)
        mean = dist.mean()
        out.append(dist / mean if mean > 0 else dist)
    return np.mean(out, axis=0)


def _fallback(group, weights, data, why: str) -> np.ndarray:
    """l1 scores for a group the criterion cannot score, recorded in `data` (its note, and the
    group's id in `data.fell_back` where the measurement keeps that list)."""
    if data is not None:
        line = f"group '{group.id}' {why}: scored by l1"
        data.note(line)
        if hasattr(data, "fell_back") and group.id not in data.fell_back:
            data.fell_back.append(group.id)
            data.fallback_notes.append(line)
    return l1(group, weights)


# positional: the criterion contract fn(group, weights, data, seed), called positionally through CRITERIA
@criterion("bn-scale")
def bn_scale(group, weights, data=None, seed=0) -> np.ndarray:
    """|gamma| of the group's normalization scales (Network Slimming, Liu et al. 2017); groups
    without one (BatchNorm folded into the conv by the exporter) fall back to l1."""
    scales = [m for m in group.members if m.role == "scale"]
    if not scales:
        return _fallback(group, weights, data, "has no normalization scale")
    out = []
    for m in scales:
        mag = np.abs(weights[m.tensor].astype(np.float64))
        s = np.array([mag[np.asarray(p)].mean() for p in m.positions])
        out.append(s / s.mean() if s.mean() > 0 else s)
    return np.mean(out, axis=0)


def _activation(group, weights, data, stat) -> np.ndarray:
    """Average over the spaces the group's consumers read of `stat(moments)` per channel."""
    out = []
    for space in dict.fromkeys(m.reads for m in group.members if m.role == "in"):
        mom = data.get(space) if space is not None else None
        pos = group.positions.get(space)
        if mom is not None and pos is not None:
            per_pos = stat(mom)
            out.append(np.array([per_pos[np.asarray(p)].mean() for p in pos]))
    if not out:
        return _fallback(group, weights, data, "has no consumer whose input was measured")
    return np.mean(out, axis=0)


# positional: the criterion contract fn(group, weights, data, seed), called positionally through CRITERIA
@criterion("mean-act", needs="calibration")
def mean_activation(group, weights, data=None, seed=0) -> np.ndarray:
    """Mean |activation| of each channel where its consumers read it (calibration data)."""
    return _activation(group, weights, data, lambda m: m.abs_mean)


# positional: the criterion contract fn(group, weights, data, seed), called positionally through CRITERIA
@criterion("apoz", needs="calibration")
def apoz(group, weights, data=None, seed=0) -> np.ndarray:
    """1 - APoZ, the average percentage of zeros of each channel's activations (Hu et al. 2016):
    a channel that is mostly zero after its ReLU scores low."""
    return _activation(group, weights, data, lambda m: 1.0 - m.zeros)


# positional: the criterion contract fn(group, weights, data, seed), called positionally through CRITERIA
@criterion("obspa", needs="moments")
def obspa(group, weights, data=None, seed=0) -> np.ndarray:
    """Optimal Brain Surgeon saliency of each channel on the group's consumers (spa.obspa):
    the reconstruction error their outputs suffer when it goes. Lower = safer to remove."""
    sal = obs.greedy(group, weights, data)
    if sal is None:
        return _fallback(group, weights, data, "has no analysable consumer (no weight reads it with known statistics)")
    return sal


def _gradient(kind: str):
    def fn(group, weights, data=None, seed=0) -> np.ndarray:
        sal = channel_scores(group, data) if data is not None else None
        if sal is None:
            return _fallback(group, weights, data, "has no trainable member (no gradient reaches it)")
        return sal

    fn.__doc__ = f"Gradient criterion '{kind}' summed over each channel's member slices (spa.gradients)."
    return criterion(kind, needs="gradients")(fn)


GRADIENT = ("taylor", "snip", "grasp", "crop")
for _kind in GRADIENT:
    _gradient(_kind)


def score(analysis, name: str, groups=None, *, seed: int = 0, data=None) -> dict[str, np.ndarray]:
    """Scores for every prunable group (or `groups`); `data`: a spa.stats.Stats where the
    criterion needs one."""
    fn = get(name)
    groups = [g for g in analysis.groups if g.prunable] if groups is None else groups
    # weights read as a criterion reaches them, the most recent kept up to HELD_BYTES (neighbours
    # share tensors: a conv's weight is a member of its output group and its input group), so a
    # group spanning every layer (an LLM's hidden size) never holds the whole model at once
    held = _Held(analysis.index)
    return {g.id: fn(g, held, data=data, seed=seed) for g in groups}


HELD_BYTES = 256 << 20


class _Held(dict):
    """{tensor: value} read on first access through the analysis' index; least recently used
    ones dropped beyond HELD_BYTES (a dropped one is read again when asked for)."""

    def __init__(self, index):
        super().__init__()
        self.index = index

    def __missing__(self, name):
        value = self.index.value(name)
        while self and sum(v.nbytes for v in self.values() if v is not None) + getattr(value, "nbytes", 0) > HELD_BYTES:
            del self[next(iter(self))]
        self[name] = value
        return value

    def meta(self, name) -> tuple[str, int]:
        """(numpy dtype kind, rank) of a tensor, from the graph: no data read."""
        kind = "f" if self.index.model.dtypes.get(name) in FLOAT_TYPES else "i"
        return kind, self.index.rank(name) or 0

    def __getitem__(self, name):
        if name in self:
            value = super().pop(name)
            super().__setitem__(name, value)  # most recent last
            return value
        return self.__missing__(name)
