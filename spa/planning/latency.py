"""A latency target: plan for a MACs target, time the pruned model in ONNX Runtime, adjust.

    dense + pruned(plan for MACs t) ─ORT CPU, batch 1, taken in turns (spa.backends.bench)─▶ ratio
    t ← t * target / ratio  (at most TRIES timings) ─▶ the plan with the most MACs whose ratio met it

Latency is not a sum over groups (small layers are bound by memory and dispatch, not MACs), so
the MACs allocation (spa.planning.budget) is steered by measured ratios, not by a latency model.
Each timing runs both models for TIME_S seconds each, in alternating slices, on one input of
batch 1 (the first calibration sample, else random); the ratio of their medians is what is
compared. On a busy machine that ratio moves by a few percent between runs (docs/budget.md).
"""

from __future__ import annotations

from spa.backends import bench
from spa.backends.base import Options, feeds_for, open_session
from spa.passes import prune as prune_pass

TRIES = 4
TIME_S = 0.6
SLACK = 0.02  # a measured ratio this close above the target counts as met (timing noise)


def ratio(dense, pruned, feeds=None) -> float:
    """Median latency of `pruned` over `dense` (both ModelProtos) at batch 1, in turns."""
    sessions = [open_session(m, "ort", Options()) for m in (dense, pruned)]
    if feeds is None:
        feeds = feeds_for(sessions[0].inputs, 1)
    plan = bench.Plan(warmup_ms=100, duration_s=TIME_S, min_iterations=5, slice_s=0.1)
    dense_r, pruned_r = bench.measure([s.runner(feeds) for s in sessions], 1, plan)
    return pruned_r["latency_ms"]["p50"] / dense_r["latency_ms"]["p50"]


def plan_for_latency(analysis, keep: float, plan_macs, *, feeds=None) -> tuple[dict, dict]:
    """(plan, {"timings": [{"macs_target", "latency_ratio"}], "met": bool}): `plan_macs(t)` gives
    (plan, info) keeping at most t of the MACs; the plan kept is the one with the most MACs whose
    measured latency ratio is within `keep` (else the fastest measured)."""
    dense = analysis.model.proto
    target, tried, best = keep, [], None
    for _ in range(TRIES):
        plan, info = plan_macs(target)
        measured = ratio(dense, prune_pass.apply(analysis, plan, None), feeds)
        tried.append({"macs_target": round(target, 4), "latency_ratio": round(measured, 4)})
        met = measured <= keep * (1 + SLACK)
        if best is None or (met and (not best[2] or target > best[3])) or (not best[2] and measured < best[4]):
            best = (plan, info, met, target, measured)
        if met and measured >= keep * (1 - 4 * SLACK):
            break
        target = min(1.0, max(0.02, target * keep / max(measured, 1e-3)))
    plan, info, met = best[:3]
    return plan, {**info, "latency": {"timings": tried, "met": met, "batch": 1, "seconds_each": TIME_S}}
