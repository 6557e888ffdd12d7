"""Budgets: how much of each group to remove so the model keeps a fraction of its params or MACs.

    scores ─per group: sorted, divided by the group's mean─▶ q  (a group's scale never meets another's)
    sensitivity: measured (one trial per group at PROBE_RATIO, 1 - cosine of the outputs, on calib or
                 without it on random inputs) or estimated (every group alike, when neither runs);
                 structural protection (stem, head, narrow)
    channel k of group g: cost = w_g * q_k / (1 - k / n)    saving = d_g (params/MACs one channel frees)
    ─▶ priority = cost / saving ─▶ the channels under a threshold, bisected on spa.cost.estimate
       until the model keeps at most the target ─▶ plan + {"protected": [...], "groups": [...]}

The division by the group's mean makes the plan independent of the raw criterion scale of one
layer against another (l1 of a detection head and of a backbone block are not comparable); only
the ranking inside a group and the group's sensitivity `w_g` say where to cut. With calibration
data `w_g` is measured (the output fidelity lost when the group alone loses PROBE_RATIO of its
channels, spa.planning.sensitivity) and scaled so the modelled cost of that cut equals the
measured loss; unmeasured, every group has w_g = 1 and only structure protects. The factor
1 / (1 - k/n) makes the last channels of a group ever dearer, so no group is emptied because it
is cheap per MAC. See docs/budget.md.
"""

from __future__ import annotations

import numpy as np

from spa.core import cost
from spa.core.errors import SpaError, UsageError
from spa.planning import planner

PROBE_RATIO = 0.5  # the one ratio each group is measured at with calibration data
PROTECT_LOSS = 0.5  # measured 1 - cosine at PROBE_RATIO above which a group is protected
NARROW = 0.25  # a group narrower than this fraction of the median group width is a bottleneck
MIN_WIDTH = 4  # and a group this narrow always is
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def check_keep(kind: str, keep) -> None:
    if kind not in ("params", "macs", "latency"):
        raise UsageError(f"unknown target '{kind}'", "choose params, macs or latency")
    if isinstance(keep, bool) or not (isinstance(keep, (int, float)) and 0 < keep <= 1):
        raise UsageError(f"invalid target_{kind}={keep}: it must be in (0, 1], the fraction of {kind} to keep")


# ---------------------------------------------------------------- protection from structure


def _weight_nodes(analysis, group, role_in: bool) -> list:
    """The weight-bearing nodes holding the group's members: consumers (`role_in`) or producers."""
    idx, out = analysis.index, []
    for m in group.members:
        if (m.role == "in") != role_in:
            continue
        out += [n for n in idx.consumers.get(m.tensor, []) if n.op_type in WEIGHT_OPS]
    return list({id(n): n for n in out}.values())


def _reaches_output(analysis, node, depth: int = 0) -> bool:
    """True when `node`'s result reaches a graph output without passing another weight layer."""
    idx = analysis.index
    if any(o in idx.graph_outputs for o in node.output):
        return True
    if depth > 12:
        return False
    nxt = [c for o in node.output for c in idx.consumers.get(o, [])]
    return bool(nxt) and all(c.op_type not in WEIGHT_OPS and _reaches_output(analysis, c, depth + 1) for c in nxt)


def structural(analysis, groups) -> dict[str, str]:
    """{group id: why it is protected} for stems, heads and narrow bottlenecks (no data needed)."""
    widths = sorted(g.size for g in groups)
    median = widths[len(widths) // 2] if widths else 0
    inputs = set(analysis.index.graph_inputs)
    out = {}
    for g in groups:
        producers = _weight_nodes(analysis, g, role_in=False)
        consumers = _weight_nodes(analysis, g, role_in=True)
        if any(n.input and n.input[0] in inputs for n in producers):
            out[g.id] = "stem: produced by a layer reading the model input"
        elif consumers and all(_reaches_output(analysis, n) for n in consumers):
            out[g.id] = "head: read only by the layers that write a model output"
        elif g.size <= MIN_WIDTH or g.size < NARROW * median:
            out[g.id] = f"narrow: {g.size} channels, under {NARROW:g} of the median group width {median}"
    return out


def measured(sens: dict, ratio: float = PROBE_RATIO) -> dict[str, float]:
    """{group id: loss at the measured ratio nearest `ratio`} from a sensitivity document."""
    ratios = sens["ratios"]
    k = int(np.argmin([abs(r - ratio) for r in ratios]))
    return {g["id"]: float(g["loss"][k]) for g in sens["groups"]}, float(ratios[k])


# ---------------------------------------------------------------- the allocation


def _order(group, scores: np.ndarray) -> np.ndarray:
    locked = set(group.locked)
    return np.array([int(i) for i in np.argsort(scores, kind="stable") if int(i) not in locked], dtype=np.int64)


def unit_costs(group, scores) -> tuple[np.ndarray, np.ndarray]:
    """(the unlocked channels, lowest score first; the cost of removing each in turn at weight 1:
    its score over the group's mean, times 1 / (1 - k / n) for the k-th removed)."""
    s = np.asarray(scores, dtype=np.float64)
    q = s / s.mean() if s.mean() > 0 else np.ones_like(s)
    order = _order(group, s)
    k = np.arange(len(order))
    return order, np.maximum(q[order], 1e-12) / (1.0 - k / group.size)


def _priorities(group, scores, weight: float, saving: float, cap: int) -> tuple:
    """(channel order, cost per unit saved of removing the first k of them, k = 1..cap, non-decreasing)."""
    order, costs = unit_costs(group, scores)
    return order[:cap], np.maximum.accumulate(weight * costs[:cap]) / saving


def weights(sens: dict, groups, scores: dict, *, protect: dict) -> tuple[dict, str]:
    """({group id: w_g} from a sensitivity document, how): w_g scales the modelled cost of removing
    the measured ratio to the measured loss; a group over PROTECT_LOSS (or not measured) joins `protect`."""
    losses, at = measured(sens)
    out = {}
    for g in groups:
        loss = losses.get(g.id)
        if loss is None:
            protect.setdefault(g.id, "not measured")
        elif loss > PROTECT_LOSS:
            protect.setdefault(g.id, f"sensitive: output loss {loss:.3g} with {at:g} of it removed "
                                     f"(over {PROTECT_LOSS:g})")
        else:
            n = max(int(g.size * at), 1)
            out[g.id] = max(loss, 1e-6) / float(np.sum(unit_costs(g, scores[g.id])[1][:n]))
    on = f" on {sens['samples']} random inputs (no calib=: a proxy of the real inputs)" \
        if sens.get("inputs") == "random" else ""
    return out, f"measured (1 - cosine of the outputs, each group alone at ratio {at:g}){on}"


LAST_RESORT = 100.0  # how much dearer a protected group's channels are when a target cannot be met without them


def last_resort(groups, weights: dict | None, protect: dict) -> dict:
    """{group id: w_g} with the protected groups LAST_RESORT times dearer than the dearest other."""
    base = {g.id: 1.0 for g in groups} if weights is None else dict(weights)
    top = max(base.values(), default=1.0) * LAST_RESORT
    return {g.id: top if g.id in protect else base.get(g.id, top) for g in groups}


class Allocation:
    """The plan for a target, and why: which groups were protected and how much each lost."""

    def __init__(self, analysis, kind: str, scores: dict, groups, *, weights=None, protect=None,
                 max_group_ratio: float = 0.9, round_to: int = 1, round_min: int = 0):
        self.analysis, self.kind, self.round_to, self.round_min = analysis, kind, round_to, round_min
        self.protected = dict(protect or {})
        self.full = cost.estimate(analysis, {})[kind]
        self.rows = {}
        for g in groups:
            if not g.prunable or g.id not in scores or g.id in self.protected:
                continue
            g0 = _order(g, scores[g.id])[:1]
            saving = self.full - cost.estimate(analysis, {g.id: [int(g0[0])]})[kind] if len(g0) else 0
            cap = min(int(g.size * max_group_ratio), g.size - 1, g.size - len(g.locked))
            if saving <= 0 or cap <= 0:
                continue
            w = 1.0 if weights is None else weights[g.id]
            self.rows[g.id] = (g, *_priorities(g, scores[g.id], w, saving, cap))

    def plan_at(self, threshold: float) -> dict:
        plan = {}
        for gid, (g, order, prio) in self.rows.items():
            n = int(np.searchsorted(prio, threshold, side="right"))
            keep = planner._keep_count(g.size, n, self.round_to if g.size >= self.round_min else 1, len(g.locked),
                                       g.multiple)
            if g.size - keep > 0:
                plan[gid] = sorted(int(i) for i in order[:g.size - keep])
        return plan

    def fraction(self, plan: dict) -> float:
        return cost.estimate(self.analysis, plan)[self.kind] / max(self.full, 1)

    def solve(self, keep: float) -> dict:
        """The plan removing the fewest channels (by priority) that keeps at most `keep`."""
        levels = np.unique(np.concatenate([p for _, _, p in self.rows.values()] or [np.zeros(0)]))
        if not len(levels) or self.fraction(self.plan_at(levels[-1])) > keep:
            most = self.fraction(self.plan_at(levels[-1])) if len(levels) else 1.0
            raise SpaError(f"cannot keep only {keep:g} of the {self.kind}: pruning every unprotected group as far "
                           f"as allowed keeps {most:.3f} ({len(self.protected)} groups protected)",
                           "raise max_group_ratio=, add prune_hidden=True, or aim higher")
        lo, hi = -1, len(levels) - 1  # fraction(levels[hi]) <= keep; lo: not known to meet it
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.fraction(self.plan_at(levels[mid])) <= keep:
                hi = mid
            else:
                lo = mid
        return self.plan_at(levels[hi])

    def to_json(self, plan: dict) -> dict:
        """What the allocation did, for the prune document."""
        groups = [{"id": gid, "size": g.size, "removed": len(plan.get(gid, ()))} for gid, (g, _, _) in
                  self.rows.items()]
        return {"protected": [{"group": gid, "reason": why} for gid, why in self.protected.items()],
                "groups": groups}
