"""spa.finetune and spa.train_sparse: train a model's weights in place (the same graph comes back).

    model + data (+ labels | teacher) ─checks─▶ [prune first] ─fit (spa.training)─▶ best epoch's weights
        ─write back─▶ model' (ONNX Runtime on it == the trained module, re-checked on the written file)

finetune:      AdamW on labels and/or distillation from a teacher; with ratio=, the model is pruned
               first (criterion=) and, unless distill=False, learns from the dense model.
train_sparse:  the HESSO schedule drives target_ratio of every prunable, zero-invariant group's
               channels to exactly zero; `spa.prune(..., zeros)` / `spa prune --zeros` removes them.

A checkpoint after every epoch (checkpoint=, default OUTPUT.ckpt) lets resume=True continue a run.
Every option is a keyword named like the command's flag; bad values raise UsageError before any work.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import onnx

from spa.api.common import arrays as as_arrays
from spa.api.common import require_files
from spa.api.prune import prune, refuse_quantized
from spa.api.result import Result, as_model, model_name, output_target, stepper
from spa.core import cost
from spa.core.analysis import analyze
from spa.core.data import split_labels
from spa.core.errors import SpaError, VerificationError, positive_int, require
from spa.core.model import check_writable, reinfer, save, write_text_atomic
from spa.passes.base import require_finite_weights
from spa.planning.plan import make_plan
from spa.planning.planner import check_ratio, to_json
from spa.scoring import criteria
from spa.scoring.gradients import require_torch
from spa.scoring.measure import compensation, saliency, statistics
from spa.training.train import (
    WRITE_BACK_TOL,
    FitConfig,
    HessoSchedule,
    check_device,
    check_target,
    check_val_split,
    fit,
    split_validation,
    write_back_error,
)

TRAIN_SCHEMA = 1


@dataclass
class _Setup:
    """The options both calls share (names = the commands' flag dests)."""

    data: object
    labels: str | None
    val: object
    val_split: float
    distill_from: object
    epochs: int
    lr: float
    batch: int
    weight_decay: float
    temperature: float
    alpha: float
    logits: str | None
    checkpoint: object
    resume: bool
    device: str
    threads: int | None
    seed: int
    output: object
    keep_sparsity: bool = False

    @classmethod
    def of(cls, names: dict) -> _Setup:
        return cls(**{f.name: names[f.name] for f in fields(cls) if f.name in names})


@dataclass
class _Run:
    """What the checks found: where to write, the fit settings and the data."""

    out: Path | None
    ckpt: Path | None
    cfg: object
    arrays: dict
    val_arrays: dict | None


def _check_values(s: _Setup, teacher: bool):
    """UsageError for bad values and combinations (nothing read yet); the fit settings."""
    cfg = FitConfig(s.epochs, s.lr, s.batch, s.weight_decay, s.temperature, s.alpha, s.seed, s.device, s.logits,
                    s.keep_sparsity)
    cfg.check()
    if s.threads is not None:
        positive_int("threads", s.threads)
    check_target(s.labels, True if teacher else None)
    if s.val is None:
        check_val_split(s.val_split)
    for name in ("data", "val"):
        value = getattr(s, name)
        require(value is None and name == "val" or isinstance(value, (str, os.PathLike, dict)),
                f"invalid {name}={type(value).__name__}: expected a path to an .npz or a dict of arrays")
    require(s.checkpoint is not None or s.output is not None or not s.resume,
            "resume=True needs the checkpoint to resume from", "pass checkpoint=CKPT (or the run's output=)")
    return cfg


def _prepare(s: _Setup, model, teacher: bool) -> _Run:
    """The checks that fail fast (before torch or the model is loaded), then the data."""

    cfg = _check_values(s, teacher)
    check_device(s.device)
    require_files(model, s.distill_from)
    reads = (s.data, s.val, s.distill_from)
    out = output_target(s.output, model, *reads)
    ckpt = Path(s.checkpoint) if s.checkpoint else out.with_name(out.name + ".ckpt") if out else None
    if ckpt is not None:
        check_writable(ckpt, model_name(model), reads=reads)
    if s.resume and not ckpt.is_file():
        raise SpaError(f"cannot resume: no checkpoint '{ckpt}'", "start a new run instead")
    arrays = as_arrays(s.data, "data")
    val_arrays = as_arrays(s.val, "val")
    for name, found in (("data", arrays), ("val", val_arrays)):
        if found is not None and s.labels is not None and s.labels not in found:
            shown = getattr(s, name) if isinstance(getattr(s, name), (str, os.PathLike)) else "(arrays)"
            raise SpaError(f"no labels key '{s.labels}' in {name}={shown} (it has {sorted(found)})")
    require_torch()
    if s.threads is not None:
        import torch

        torch.set_num_threads(s.threads)
    return _Run(out, ckpt, cfg, arrays, val_arrays)


def _split(model, run: _Run, s: _Setup):
    """(train feeds, train labels, (val feeds, val labels)): --val, or a seeded hold-out of the data."""
    feeds, labels = split_labels(run.arrays, model.input_names, s.labels)
    if run.val_arrays is not None:
        vf, vy = split_labels(run.val_arrays, model.input_names, s.labels)
        return feeds, labels, (vf, vy)
    tf, ty, vf, vy = split_validation(feeds, labels, s.val_split, seed=s.seed)
    return tf, ty, (vf, vy)


def _teacher(model):
    """The ModelProto of a teacher argument (a path is read without shape inference), or None."""
    return None if model is None else as_model(model, infer=False).proto


def _fit(run: _Run, s: _Setup, proto, model, teacher, schedule, on_step, log):
    feeds, labels, val = _split(model, run, s)
    result = fit(proto, feeds, labels, val=val, teacher=teacher, cfg=run.cfg, checkpoint=run.ckpt, resume=s.resume,
                 schedule=schedule, progress=on_step,
                 log=log)
    require_finite_weights(model, result.proto, "training")  # never write a NaN/inf weight
    return result, val[0]


@contextlib.contextmanager
def _checkpoint_kept_on_success(ckpt: Path | None):
    """A checkpoint this run created is removed when the run fails (a refusal, a failed check, a
    diverged training): a failed run leaves no file. An interrupted run keeps it (resume= goes on
    from it), and so does a failed resume of an earlier run's checkpoint."""
    fresh = ckpt is not None and not ckpt.exists()
    try:
        yield
    except SpaError:
        if fresh:
            ckpt.unlink(missing_ok=True)
        raise


def _write(proto, out: Path | None, source, feeds: dict, step):
    """(write-back error, verify): ONNX Runtime on the written model (or, without `out`, on the
    proto) against the trained module; over WRITE_BACK_TOL nothing is written."""
    measured = {}

    def verify(target):
        measured["err"] = e = write_back_error(target if isinstance(target, onnx.ModelProto) else str(target), feeds)
        if e > WRITE_BACK_TOL:
            raise VerificationError(f"the written model's outputs differ from the trained module's "
                                    f"(rel. error {e:.2e}); nothing written")

    if out is None:
        with step("checking"):
            verify(proto)
    else:
        with step("saving + checking"):
            save(proto, out, source=source, verify=verify)
    return measured["err"], verify


def _source(model) -> Path | None:
    name = model_name(model)
    return Path(name) if name is not None else None


def _doc(s: _Setup, model, run: _Run, result, write_err: float, before: dict, after: dict) -> dict:
    return {"schema_version": TRAIN_SCHEMA, "input": model_name(model), "output": _text(run.out),
            "checkpoint": _text(run.ckpt), "epochs": s.epochs, "resumed_from_epoch": result.resumed_from,
            "metric": result.metric, "best_epoch": result.best_epoch, "best": result.best, "history": result.history,
            "distill_from": model_name(s.distill_from), "distilled": result.extra.get("distilled"), "labels": s.labels,
            "write_back_max_rel_err": write_err,
            "before": before, "after": after}


def _text(path) -> str | None:
    return None if path is None else str(path)


def finetune(model, *, data, labels=None, val=None, val_split=0.1, distill_from=None, epochs=5, lr=1e-3, batch=64,
             weight_decay=0.0, temperature=4.0, alpha=0.5, logits=None, checkpoint=None, resume=False, device="cpu",
             threads=None, seed=0, ratio=None, criterion="l1", keep_sparsity=False, distill=True, output=None,
             progress=None, on_step=None, log=None) -> Result:
    """Train `model`'s weights on `data` (a path to an .npz or {input: array}, labels under `labels`)
    and/or towards `distill_from`; the same graph comes back with the best epoch's weights.
    `ratio`: prune that fraction of each group first (`criterion`), then learn from the dense model
    (unless distill=False). `output`: where to write it (checked, atomically); `on_step(done, total,
    loss)` after every optimizer step, `log(line)` once per epoch. `.to_json()` is `spa finetune --json`."""
    s = _Setup.of(locals())
    if ratio is not None:
        check_ratio(ratio)
    require(criterion in criteria.CRITERIA,
            f"invalid criterion={criterion!r}: not one of {', '.join(sorted(criteria.CRITERIA))}")
    step = stepper(progress)
    run = _prepare(s, model, distill_from is not None or (ratio is not None and distill))
    with step("load + shape inference"):
        loaded = as_model(model)
    teacher = _teacher(distill_from)
    before = cost.summary(loaded)
    pruned_doc = None
    if ratio is not None:
        loaded, pruned_doc = _prune_first(loaded, model, run, s, ratio, criterion, step)
        if distill and teacher is None:
            teacher = _teacher(model)  # the dense input
    with _checkpoint_kept_on_success(run.ckpt):
        result, val_feeds = _fit(run, s, loaded.proto, loaded, teacher, None, on_step, log)
        write_err, verify = _write(result.proto, run.out, _source(model), val_feeds, step)
    doc = _doc(s, model, run, result, write_err, before, cost.summary(reinfer(result.proto)))
    doc["pruned_first"] = pruned_doc
    return Result(doc, model=result.proto, verify=verify, source=_source(model))


def _prune_first(loaded, model, run: _Run, s: _Setup, ratio: float, criterion: str, step):
    """ratio=: plan with the criterion (on the training data where it needs some), prune."""
    refuse_quantized(loaded)
    with step("analysis"):
        analysis = analyze(loaded)
    if not any(g.prunable for g in analysis.groups):
        raise SpaError(f"nothing to prune in '{model_name(model) or 'the model'}'")
    need = criteria.NEEDS.get(criterion)
    stats = None
    feeds, labels = split_labels(run.arrays, loaded.input_names, s.labels)
    with step(f"scoring ({criterion}) + planning"):
        if need == "gradients":
            stats = saliency(analysis, criterion, feeds, labels=labels)
        elif need:  # calibration and moments criteria: measured on the data
            stats = statistics(analysis, feeds)
        plan = make_plan(analysis, ratio, criterion, seed=s.seed, stats=stats)
    values = None
    if criterion == "obspa":  # as spa prune does by default: refit the consumers (calibrated)
        with step("compensating the consumers (OBS, group by group)"):
            values, _ = compensation(analysis, plan, calib=feeds)
    with step("pruning"):
        pruned = prune(analysis, plan, compensate=values)
    doc = {"ratio": ratio, "criterion": criterion, "channels_removed": int(sum(map(len, plan.values()))),
           "compensated": values is not None}
    return reinfer(pruned), doc


def train_sparse(model, *, data, target_ratio, labels=None, val=None, val_split=0.1, distill_from=None, epochs=5,
                 lr=1e-3, batch=64, weight_decay=0.0, temperature=4.0, alpha=0.5, logits=None, checkpoint=None,
                 resume=False, device="cpu", threads=None, seed=0, periods=5, warmup=0.2, window=0.5, round_to=1,
                 prune_hidden=False, save_plan=None, output=None, progress=None, on_step=None, log=None) -> Result:
    """Train `model` with group sparsity until `target_ratio` of each prunable, zero-invariant
    group's channels is exactly zero (HESSO: after `warmup`, over `window` of the training in
    `periods`); the rest of training fine-tunes. `save_plan`: write the zeroed channels as a plan
    (also `.plan` of the result). Options as for `finetune`; `.to_json()` is `spa train-sparse --json`."""
    s = _Setup.of(locals())
    HessoSchedule.check_options(target_ratio, periods, warmup, window=window, round_to=round_to)
    step = stepper(progress)
    run = _prepare(s, model, distill_from is not None)
    if save_plan:
        check_writable(save_plan, model_name(model), reads=(data, val, distill_from, output))
    with step("load + shape inference"):
        loaded = as_model(model)
    refuse_quantized(loaded)
    with step("analysis"):
        analysis = analyze(loaded)
    schedule = HessoSchedule(analysis, target_ratio, periods, warmup, window, round_to, prune_hidden)
    if not schedule.groups:
        raise SpaError(f"nothing to train sparse in '{model_name(model) or 'the model'}': no prunable "
                       "zero-invariant group")
    teacher = _teacher(distill_from)
    before = cost.summary(loaded)
    with _checkpoint_kept_on_success(run.ckpt):
        result, val_feeds = _fit(run, s, analysis.model.proto, loaded, teacher, schedule, on_step, log)
        plan = schedule.plan()
        write_err, verify = _write(result.proto, run.out, _source(model), val_feeds, step)
        if save_plan:
            write_text_atomic(save_plan, json.dumps(to_json(plan), indent=1))
    doc = _doc(s, model, run, result, write_err, before, before)
    doc["train_sparse"] = {"target_ratio": target_ratio, "groups": len(schedule.groups),
                           "zero_channels": int(sum(map(len, plan.values()))), "notes": schedule.notes,
                           "plan_file": _text(save_plan), "next": f"spa prune {run.out} --zeros" if run.out else None}
    done = Result(doc, model=result.proto, verify=verify, source=_source(model))
    done.plan = plan  # {group: the zeroed channels}, as saved with save_plan
    return done
