"""Planning: how many channels of each group to drop, and which.

    scores ─▶ per group: keep = round_up(size * (1 - ratio), round_to) ─▶ drop the lowest
    scores ─▶ --global: one ranking over all groups (scores normalised per group), each
              group capped at `max_group_ratio`, then rounded as above

A plan is `{group id: [channel indices to drop]}`; no group ever drops all its channels,
locked channels are never dropped.
"""

from __future__ import annotations

import math

import numpy as np

from spa.core.errors import SpaError, UsageError

PLAN_SCHEMA = 1


def _keep_count(size: int, drop: int, round_to: int, locked: int, multiple: int = 1) -> int:
    """Channels a group keeps: at least one and its locked ones, rounded up to `round_to` (where
    the group is that wide) and to the `multiple` its ops need (spa.core.analysis.Group.multiple)."""
    keep = max(size - drop, 1, locked)
    step = math.lcm(round_to if round_to > 1 and size >= round_to else 1, multiple)
    if step > 1:
        keep = min(size, math.ceil(keep / step) * step)
    return keep


def _lowest(scores: np.ndarray, n: int, locked: list[int]) -> list[int]:
    order = [int(i) for i in np.argsort(scores, kind="stable") if int(i) not in set(locked)]
    return sorted(order[:n])


def check_ratio(ratio: float, what: str = "ratio") -> None:
    if not (isinstance(ratio, (int, float)) and 0 <= ratio < 1) or math.isnan(ratio):
        hint = "e.g. ratio=0.5 removes half the channels" if what == "ratio" else None
        raise UsageError(f"invalid {what}={ratio}: it must be in [0, 1)", hint)


def uniform(groups, scores: dict, ratio: float, *, round_to: int = 1) -> dict[str, list[int]]:
    """Drop `ratio` of every prunable group's channels (lowest scores first)."""
    check_ratio(ratio)
    plan = {}
    for g in groups:
        if not g.prunable or g.id not in scores:
            continue
        keep = _keep_count(g.size, int(g.size * ratio), round_to, len(g.locked), g.multiple)
        drop = _lowest(scores[g.id], g.size - keep, g.locked)
        if drop:
            plan[g.id] = drop
    return plan


def global_(groups, scores: dict, ratio: float, *, round_to: int = 1, max_group_ratio: float = 0.9):
    """Drop `ratio` of all prunable channels, ranked together; each group capped."""
    check_ratio(ratio)
    check_ratio(max_group_ratio, "max_group_ratio")
    cands = []
    for g in groups:
        if g.prunable and g.id in scores:
            s = np.asarray(scores[g.id], dtype=np.float64)
            norm = s / s.mean() if s.mean() > 0 else s
            cands += [(float(norm[i]), g.id, i) for i in range(g.size) if i not in g.locked]
    total = sum(g.size for g in groups if g.prunable and g.id in scores)
    budget = int(total * ratio)
    by_id = {g.id: g for g in groups}
    counts: dict[str, int] = {}
    for _, gid, _ in sorted(cands):
        if budget <= 0:
            break
        g = by_id[gid]
        if counts.get(gid, 0) + 1 <= min(int(g.size * max_group_ratio), g.size - 1):
            counts[gid] = counts.get(gid, 0) + 1
            budget -= 1
    plan = {}
    for gid, n in counts.items():
        g = by_id[gid]
        keep = _keep_count(g.size, n, round_to, len(g.locked), g.multiple)
        drop = _lowest(scores[gid], g.size - keep, g.locked)
        if drop:
            plan[gid] = drop
    return plan


def to_json(plan: dict, erase: list | None = None) -> dict:
    """A plan file's document; `erase`: the ids of the erasable units it removes (spa.core.depth)."""
    doc = {"schema_version": PLAN_SCHEMA, "groups": {k: [int(i) for i in v] for k, v in plan.items()}}
    if erase:
        doc["erase"] = list(erase)
    return doc


def erase_from(doc) -> list[str]:
    """The unit ids a plan document erases (its optional "erase" list)."""
    erase = doc.get("erase", []) if isinstance(doc, dict) else []
    if not isinstance(erase, list) or not all(isinstance(u, str) for u in erase):
        raise SpaError("a plan's 'erase' must be a list of unit ids (spa analyze --json: erasable)")
    return list(dict.fromkeys(erase))


def from_json(doc) -> dict:
    version = doc.get("schema_version") if isinstance(doc, dict) else None
    if type(version) is not int or version != PLAN_SCHEMA or not isinstance(doc.get("groups"), dict):
        raise SpaError(f"not a spa plan file (expected schema_version {PLAN_SCHEMA} and a 'groups' object)",
                       "write one with: spa prune MODEL --ratio R --save-plan PLAN")
    plan = {}
    for gid, chans in doc["groups"].items():
        if not isinstance(chans, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in chans):
            raise SpaError(f"plan entry for group '{gid}' must be a list of channel indices")
        plan[gid] = sorted(set(chans))
    return plan
