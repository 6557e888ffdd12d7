"""Measurements the criteria and compensation read: activation statistics, gradient saliency,
and the OBS update of the consumers of removed channels."""

from __future__ import annotations

from spa.core.analysis import Analysis
from spa.core.data import samples_used
from spa.scoring import gradients, obspa, stats


def statistics(analysis: Analysis, calib=None, max_samples: int = 512, *, batch_size: int = obspa.BATCH,
               progress=None, max_rows: int | None = obspa.ROWS):
    """Activation statistics of what the prunable groups' consumers read: measured on `calib`
    (arrays keyed by input name, or an iterable of feed dicts; at most `max_rows` rows of each
    space per batch, drawn at random), or without it derived from the graph alone (data-free:
    spa.moments)."""
    if calib is None:
        return stats.data_free(analysis)
    return stats.calibrate(analysis, calib, max_samples=max_samples, batch_size=batch_size, progress=progress,
                           max_rows=max_rows)


def saliency(analysis: Analysis, criterion: str, data, *, labels=None, max_samples: int = 512, batch_size: int = 64,
             output: str | None = None, device: str = "cpu", progress=None):
    """Per-weight saliency of a gradient criterion (taylor, snip, grasp, crop) on `data`
    ({input: array}), with `labels` or, without them, the model's own predictions as targets."""
    return gradients.measure(analysis, data, criterion, labels=labels, output=output, max_samples=max_samples,
                             batch_size=batch_size, device=device, progress=progress)


def compensation(analysis: Analysis, plan: dict, calib=None, *, stats=None, max_samples: int = 512,
                 batch_size: int = obspa.BATCH, progress=None, macs=None) -> tuple[dict, list[str]]:
    """({tensor: updated weights}, notes): the OBS update of the consumers of the planned
    channels (spa.obspa). With `calib`: stage by stage in graph order, each measured on the
    model with the earlier stages' groups already removed and compensated (`progress(done, total)`
    in groups after each; `macs`: the model's MACs per sample, for the number of stages,
    obspa.stage_count). Without: one shot, from `stats` or the graph's own moments (data-free)."""
    if calib is not None:
        count = obspa.stage_count(sum(1 for c in plan.values() if c), samples_used(calib, max_samples), macs)
        return obspa.sequential(analysis, plan, calib, max_samples=max_samples, batch_size=batch_size, progress=progress,
                                stages_count=count)
    stats = statistics(analysis) if stats is None else stats
    values = obspa.compensate(analysis, plan, stats)
    return values, list(stats.notes)
