"""Plans from scores: the same ratio in every group, a global ranking, or a params/MACs budget.

    analysis ─criterion─▶ scores ─uniform | global | target─▶ plan {group id: channels to drop}"""

from __future__ import annotations

from spa.core.analysis import Analysis
from spa.core.errors import SpaError, UsageError, positive_int
from spa.planning import budget, planner
from spa.scoring import criteria
from spa.scoring.measure import statistics


def scores(analysis: Analysis, criterion: str, seed: int = 0, *, stats=None, groups=None) -> dict:
    """{group id: channel scores} of `criterion` for every prunable group (or `groups`); the data
    criteria read `stats`."""
    criteria.get(criterion)
    need = criteria.NEEDS.get(criterion)
    if need == "gradients" and (stats is None or getattr(stats, "kind", None) != criterion):
        raise SpaError(f"criterion '{criterion}' needs data for its gradients",
                       "pass calib=DATA.npz (with labels=KEY if it holds labels; without, the model's own "
                       "predictions are the targets)")
    if need == "calibration" and (stats is None or stats.source != "calibration"):
        raise SpaError(f"criterion '{criterion}' needs calibration data",
                       "pass calib=DATA.npz (arrays keyed by input name)")
    if need and stats is None:
        stats = statistics(analysis)
    return criteria.score(analysis, criterion, [g for g in groups if g.prunable] if groups is not None else None,
                          seed=seed, data=stats)


def _candidates(analysis: Analysis, prune_hidden: bool) -> list:
    """The groups a plan may prune: the hidden size (hidden) only on request."""
    return [g for g in analysis.groups if prune_hidden or not g.hidden]


def make_plan(analysis: Analysis, ratio: float, criterion: str = "l1", *, global_rank: bool = False,
              round_to: int = 1, max_group_ratio: float = 0.9, seed: int = 0,
              prune_hidden: bool = False, stats=None) -> dict:
    """{group id: [channels to drop]} for every prunable group. Groups that are not exact only
    through normalization statistics (a transformer's hidden size) need `prune_hidden`.
    `stats` (from `statistics`) feed the data criteria; `obspa` derives them itself if absent."""
    planner.check_ratio(ratio)
    positive_int("round_to", round_to)
    if ratio == 0:
        return {}
    groups = _candidates(analysis, prune_hidden)  # the hidden size is not scored unless it may go
    ranked = scores(analysis, criterion, seed, stats=stats, groups=groups)
    if global_rank:
        return planner.global_(groups, ranked, ratio, round_to=round_to, max_group_ratio=max_group_ratio)
    return planner.uniform(groups, ranked, ratio, round_to=round_to)


def plan_for_target(analysis: Analysis, kind: str, keep: float, *, criterion: str = "l1", round_to: int = 1,
                    max_group_ratio: float = 0.9, seed: int = 0, prune_hidden: bool = False, stats=None,
                    sens=None) -> dict:
    """The plan that keeps at most `keep` of the model's params or MACs (`kind`), removal allocated
    across groups by spa.planning.budget (scores normalised within each group, the group's
    sensitivity from `sens` (a sensitivity document) or estimated, stems/heads/narrow groups
    protected), found by bisection on spa.cost.estimate."""
    return allocate(analysis, kind, keep, criterion=criterion, round_to=round_to, max_group_ratio=max_group_ratio,
                    seed=seed, prune_hidden=prune_hidden, stats=stats, sens=sens)[0]


def allocate(analysis: Analysis, kind: str, keep: float, *, criterion: str = "l1", round_to: int = 1,
             max_group_ratio: float = 0.9, seed: int = 0, prune_hidden: bool = False, stats=None,
             sens=None, round_min: int = 0) -> tuple[dict, dict]:
    """(plan, what the allocation did: {"sensitivity", "protected", "groups"}) for `plan_for_target`;
    `round_to` applies to groups of `round_min` channels or more."""
    if kind not in ("params", "macs"):
        raise UsageError(f"unknown target '{kind}'", "choose params or macs")
    budget.check_keep(kind, keep)
    planner.check_ratio(max_group_ratio, "max_group_ratio")
    ranked = scores(analysis, criterion, seed, stats=stats, groups=_candidates(analysis, prune_hidden))
    groups = [g for g in _candidates(analysis, prune_hidden) if g.prunable and g.id in ranked]
    protect = budget.structural(analysis, groups)
    weights, how = None, "estimated (no data: every group alike, structure protects)"
    if sens is not None:
        weights, how = budget.weights(sens, groups, ranked, protect=protect)
    shared = {"max_group_ratio": max_group_ratio, "round_to": round_to, "round_min": round_min}
    alloc = budget.Allocation(analysis, kind, ranked, groups, weights=weights, protect=protect, **shared)
    try:
        plan = alloc.solve(keep)
    except SpaError:
        if not protect:
            raise
        # the target needs the protected groups too: they join, at a cost far above every other group's
        alloc = budget.Allocation(analysis, kind, ranked, groups, weights=budget.last_resort(groups, weights, protect),
                                  **shared)
        plan = alloc.solve(keep)
        alloc.protected = {gid: f"{why}; pruned anyway, last, as the target needs it" for gid, why in protect.items()
                           if plan.get(gid)} | {gid: why for gid, why in protect.items() if not plan.get(gid)}
    return plan, {"sensitivity": how, **alloc.to_json(plan)}

