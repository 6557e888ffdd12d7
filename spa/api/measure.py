"""spa.evaluate and spa.sensitivity: a model measured on data.

    model + data ─ONNX Runtime─▶ top-1 accuracy, fidelity to a reference       (spa eval)
    model + calib ─analyze─▶ groups ─prune one group at a time─▶ loss per ratio  (spa sensitivity)
"""

from __future__ import annotations

import os

import onnx

from spa.api.common import arrays, data_name, require_files
from spa.api.result import Result, as_model, model_name, stepper
from spa.core.analysis import analyze
from spa.core.data import conform
from spa.core.errors import SpaError, positive_int
from spa.core.model import check_writable
from spa.passes.simplify import simplify_model
from spa.planning import planner
from spa.planning import sensitivity as sens
from spa.reporting.report import why_nothing
from spa.scoring.evaluate import evaluate as measure

EVAL_SCHEMA = 1


def _graph(model) -> onnx.ModelProto | None:
    """The model's graph (its inputs are what data is fitted to); a file is read without external
    weights. None when it is not a readable model: opening it in ONNX Runtime then says why."""
    if not isinstance(model, (str, os.PathLike)):
        return model.proto if hasattr(model, "proto") else model
    try:
        return onnx.load(str(model), load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX file: the session's own error is the one to show
        return None


def evaluate(model, data, labels=None, *, reference=None, output=None, batch_size: int = 64, progress=None) -> Result:
    """`spa eval`: top-1 accuracy on `data` (with `labels`: an array, or the key of the labels in
    `data`) and fidelity to `reference`. `data`: an .npz path, arrays keyed by input name, or an
    iterable of feed dicts; `output`: the output holding the class scores (default: the first)."""
    require_files(model, reference)
    positive_int("batch_size", batch_size)
    feeds = conform(arrays(data), _graph(model), "data=")
    with stepper(progress)("evaluating"):
        doc = measure(model if not hasattr(model, "proto") else model.proto, feeds, labels,
                      reference=reference if not hasattr(reference, "proto") else reference.proto, output=output,
                      batch_size=batch_size)
    return Result({"schema_version": EVAL_SCHEMA, "model": model_name(model), "data": data_name(data),
                   "reference": model_name(reference) if reference is not None else None, **doc})


def sensitivity(model, calib, *, ratios=(0.1, 0.3, 0.5, 0.7, 0.9), criterion: str = "l1", group=None,
                output=None, max_samples: int = 256, batch: int = 64, exclude=(), simplify: bool = False,
                seed: int = 0, plot=None, progress=None, on_trial=None, executor=None, retries: int = 1) -> Result:
    """`spa sensitivity`: the fidelity lost (1 - cosine) when each group alone is pruned at each
    ratio, on `calib` (.npz path or arrays). `group`: ids to measure (default: all prunable);
    `plot`: a .png/.svg file of loss vs ratio; `on_trial(done, total)` after each trial.
    `executor`: where the trials run (spa.core.executor: "in-process" (default), "processes",
    "ray", or an Executor such as spa.executor("ray", address="auto")), each tried `retries`
    more times when it fails; the document's "failed" lists those that never succeeded."""
    require_files(model)
    for r in ratios:
        planner.check_ratio(r, "ratios")
    if plot is not None:  # fail before the slow part
        check_writable(plot, model_name(model), reads=(calib,))
        sens.check_plot(plot)
    feeds, step = arrays(calib), stepper(progress)
    with step("load + shape inference"):
        loaded = as_model(model)
    feeds = conform(feeds, loaded.proto, "calib=")
    loaded, simplified = simplify_model(loaded, simplify, step)
    with step("analysis"):
        analysis = analyze(loaded, exclude=list(exclude))
    if not any(g.prunable for g in analysis.groups):
        raise SpaError(f"nothing to measure in '{model_name(model) or '(in memory)'}': {why_nothing(analysis)}")
    doc = sens.sensitivity(analysis, feeds, ratios, criterion=criterion, groups=group, batch_size=batch, seed=seed,
                           max_samples=max_samples, output=output, progress=on_trial, executor=executor,
                           retries=retries)
    doc = {**doc, "model": model_name(model), "calib": data_name(calib), "simplify": simplified}
    if plot is not None:
        sens.plot(doc, plot)
    return Result(doc)
