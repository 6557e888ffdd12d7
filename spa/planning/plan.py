"""Plans from scores: the same ratio in every group, a global ranking, or a params/MACs budget.

    analysis ─criterion─▶ scores ─uniform | global | target─▶ plan {group id: channels to drop}"""

from __future__ import annotations

from spa.core import cost
from spa.core.analysis import Analysis
from spa.core.errors import SpaError, UsageError, positive_int
from spa.planning import planner
from spa.scoring import criteria
from spa.scoring.measure import statistics


def scores(analysis: Analysis, criterion: str, seed: int = 0, *, stats=None) -> dict:
    """{group id: channel scores} of `criterion`; the data criteria read `stats`."""
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
    return criteria.score(analysis, criterion, seed=seed, data=stats)


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
    ranked = scores(analysis, criterion, seed, stats=stats)
    groups = _candidates(analysis, prune_hidden)
    if global_rank:
        return planner.global_(groups, ranked, ratio, round_to=round_to, max_group_ratio=max_group_ratio)
    return planner.uniform(groups, ranked, ratio, round_to=round_to)


def plan_for_target(analysis: Analysis, kind: str, keep: float, *, criterion: str = "l1", round_to: int = 1,
                    max_group_ratio: float = 0.9, seed: int = 0, prune_hidden: bool = False, stats=None) -> dict:
    """The plan that keeps at most `keep` of the model's params or MACs (`kind`), channels
    ranked globally (scores normalised per group, each group capped at `max_group_ratio`): the
    smallest global ratio that meets the budget, found by bisection on spa.cost.estimate."""
    if kind not in ("params", "macs"):
        raise UsageError(f"unknown target '{kind}'", "choose params or macs")
    if not (isinstance(keep, (int, float)) and 0 < keep <= 1):
        raise UsageError(f"invalid target_{kind}={keep}: it must be in (0, 1], the fraction of {kind} to keep")
    ranked = scores(analysis, criterion, seed, stats=stats)
    groups = _candidates(analysis, prune_hidden)
    full = cost.estimate(analysis, {})[kind]
    fraction = lambda plan: cost.estimate(analysis, plan)[kind] / max(full, 1)
    plan_at = lambda r: planner.global_(groups, ranked, r, round_to=round_to, max_group_ratio=max_group_ratio)
    best = plan_at(0.999)
    if fraction(best) > keep:
        raise SpaError(f"cannot keep only {keep:g} of the {kind}: pruning every prunable group as far as allowed "
                       f"keeps {fraction(best):.3f}", "raise max_group_ratio=, add prune_hidden=True, or aim higher")
    lo, hi = 0.0, 0.999
    for _ in range(30):
        mid = (lo + hi) / 2
        plan = plan_at(mid)
        if fraction(plan) <= keep:
            hi, best = mid, plan
        else:
            lo = mid
        if hi - lo < 1e-4:
            break
    return best
