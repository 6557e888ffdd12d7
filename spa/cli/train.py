"""`spa finetune` and `spa train-sparse`: the CLI side of spa.train.

    spa finetune MODEL --data TRAIN.npz [--labels KEY] [--val VAL.npz] [--epochs N] [--lr LR]
                       [--distill-from DENSE.onnx] [--ratio R --criterion C] [--resume] -o OUT
    spa train-sparse MODEL --data TRAIN.npz --target-ratio R [...] -o OUT   # then: spa prune OUT --zeros

Both write the same graph with new weights (atomically, after checking that ONNX Runtime
gives the trained module's outputs), print one line per epoch on stderr, and with --json
one document on stdout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from spa import api
from spa.core import cost
from spa.core.analysis import analyze
from spa.cli.app import _notes, _output_path, err, step
from spa.core.data import load_npz, split_labels
from spa.core.errors import SpaError, VerificationError
from spa.core.model import check_writable, load, save, write_text_atomic
from spa.planning.planner import check_ratio, to_json

TRAIN_SCHEMA = 1
WRITE_BACK_TOL = 1e-4  # ORT on the written model vs the torch module it came from


def _prepare(args, what: str, teacher: bool):
    """Checks that fail fast (before loading torch or the model), then the data."""
    from spa.scoring.gradients import require_torch

    out = _output_path(args, what)
    for path in filter(None, (args.model, args.distill_from)):
        if not Path(path).is_file():
            raise SpaError(f"cannot load model '{path}': no such file")
    check_writable(out, args.model)
    ckpt = Path(args.checkpoint) if args.checkpoint else out.with_name(out.name + ".ckpt")
    check_writable(ckpt, args.model)
    if args.resume and not ckpt.is_file():
        raise SpaError(f"cannot resume: no checkpoint '{ckpt}'", "drop --resume to start a new run")
    from spa.training.train import FitConfig

    cfg = FitConfig(args.epochs, args.lr, args.batch, args.weight_decay, args.temperature, args.alpha, args.seed,
                    args.device, args.logits, getattr(args, "keep_sparsity", False))
    cfg.check()
    if args.threads is not None and args.threads < 1:
        raise SpaError(f"invalid --threads {args.threads}: it must be a positive integer")
    if args.labels is None and not teacher:
        raise SpaError("nothing to train towards: no labels and no teacher",
                       "pass --labels KEY (a key of the data), or --distill-from DENSE.onnx")
    if not args.val and not 0 < args.val_split < 1:
        raise SpaError(f"invalid --val-split {args.val_split}: it must be in (0, 1)")
    arrays = load_npz(args.data)
    val_arrays = load_npz(args.val) if args.val else None
    for name, found in (("--data", arrays), ("--val", val_arrays)):
        if found is not None and args.labels is not None and args.labels not in found:
            raise SpaError(f"{name} has no labels key '{args.labels}' (it has {sorted(found)})")
    require_torch()
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    return out, ckpt, cfg, arrays, val_arrays


def _split(model, arrays, val_arrays, args):
    from spa.training.train import split_validation

    feeds, labels = split_labels(arrays, model.input_names, args.labels)
    if val_arrays is not None:
        vf, vy = split_labels(val_arrays, model.input_names, args.labels)
        return feeds, labels, (vf, vy)
    tf, ty, vf, vy = split_validation(feeds, labels, args.val_split, args.seed)
    return tf, ty, (vf, vy)


def _fit(args, proto, feeds, labels, val, teacher, cfg, ckpt, schedule=None):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from spa.training.train import fit

    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total} steps"), TextColumn("loss {task.fields[loss]:.4f}"),
               TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=args.json) as bar:
        task = bar.add_task("training", total=None, loss=float("nan"))
        log = None if args.json else (lambda line: bar.console.print(line, markup=False, highlight=False))
        return fit(proto, feeds, labels, val, teacher, cfg, ckpt, args.resume, schedule,
                   progress=lambda done, total, loss: bar.update(task, completed=done, total=total, loss=loss),
                   log=log)


def write_back_error(proto, feeds: dict, samples: int = 16) -> float:
    """Max rel. error between ONNX Runtime on `proto` and spa.torch on it (float outputs)."""
    import torch

    from spa.backends import ort as ort_backend
    from spa.torch import to_torch

    batch = {k: v[:samples] for k, v in feeds.items()}
    ref = ort_backend.run(proto, batch)
    with torch.no_grad():
        got = to_torch(proto).run(batch)
    worst = 0.0
    for name, r in ref.items():
        if isinstance(r, np.ndarray) and r.dtype.kind == "f":
            o = got[name].float().numpy().astype(np.float64)
            worst = max(worst, float(np.linalg.norm(r - o) / max(np.linalg.norm(r), 1e-12)))
    return worst


def _save(args, proto, out: Path, feeds: dict) -> float:
    measured = {}

    def verify(tmp):
        measured["err"] = e = write_back_error(str(tmp), feeds)
        if e > WRITE_BACK_TOL:
            raise VerificationError(f"the written model's outputs differ from the trained module's "
                                    f"(rel. error {e:.2e}); nothing written")

    with step("saving + checking", args.json):
        save(proto, out, source=Path(args.model), verify=verify)
    return measured["err"]


def _doc(args, out, ckpt, result, write_err, before, after) -> dict:
    return {"schema_version": TRAIN_SCHEMA, "input": args.model, "output": str(out), "checkpoint": str(ckpt),
            "epochs": args.epochs, "resumed_from_epoch": result.resumed_from, "metric": result.metric,
            "best_epoch": result.best_epoch, "best": result.best, "history": result.history,
            "distill_from": args.distill_from, "labels": args.labels, "write_back_max_rel_err": write_err,
            "before": before, "after": after}


def _print(doc: dict) -> None:
    best = doc["best"]
    shown = f"{best:.4f}" if isinstance(best, float) else str(best)
    err.print(f"{doc['input']} -> {doc['output']}: best {doc['metric']} {shown} at epoch {doc['best_epoch']}; "
              f"params {doc['before']['params']:,} -> {doc['after']['params']:,}; written model matches the "
              f"trained module (rel. error {doc['write_back_max_rel_err']:.1e})", markup=False, highlight=False)


def finetune(args) -> int:
    out, ckpt, cfg, arrays, val_arrays = _prepare(args, "finetuned", bool(args.distill_from)
                                                  or (args.ratio is not None and args.distill))
    if args.ratio is not None:
        check_ratio(args.ratio)
    with step("load + shape inference", args.json):
        model = load(args.model)
    teacher = load(args.distill_from, infer=False).proto if args.distill_from else None
    before = cost.summary(model)
    pruned_doc = None
    if args.ratio is not None:
        model, pruned_doc = _prune_first(args, model, arrays)
        if args.distill and teacher is None:
            teacher = load(args.model, infer=False).proto
    feeds, labels, val = _split(model, arrays, val_arrays, args)
    result = _fit(args, model.proto, feeds, labels, val, teacher, cfg, ckpt)
    write_err = _save(args, result.proto, out, val[0])
    doc = _doc(args, out, ckpt, result, write_err, before, cost.summary(api.reinfer(result.proto)))
    doc["pruned_first"] = pruned_doc
    if args.json:
        print(json.dumps(doc))
    else:
        _print(doc)
    return 0


def _prune_first(args, model, arrays):
    """`--ratio`: plan with the criterion (data from --data where it needs some), prune."""
    from spa.scoring import criteria as importance

    api.refuse_quantized(model)
    with step("analysis", args.json):
        analysis = analyze(model)
    if not any(g.prunable for g in analysis.groups):
        raise SpaError(f"nothing to prune in '{args.model}'")
    need = importance.NEEDS.get(args.criterion)
    stats = None
    feeds, labels = split_labels(arrays, model.input_names, args.labels)
    with step(f"scoring ({args.criterion}) + planning", args.json):
        if need == "gradients":
            stats = api.saliency(analysis, args.criterion, feeds, labels)
        elif need:  # calibration and moments criteria: measured on the data
            stats = api.statistics(analysis, feeds)
        plan = api.make_plan(analysis, args.ratio, args.criterion, seed=args.seed, stats=stats)
    values = None
    if args.criterion == "obspa":  # as spa prune does by default: refit the consumers (calibrated)
        with step("compensating the consumers (OBS, group by group)", args.json):
            values, _ = api.compensation(analysis, plan, calib=feeds)
    with step("pruning", args.json):
        pruned = api.prune(analysis, plan, compensate=values)
    doc = {"ratio": args.ratio, "criterion": args.criterion, "channels_removed": int(sum(map(len, plan.values()))),
           "compensated": values is not None}
    return api.reinfer(pruned), doc


def train_sparse(args) -> int:
    from spa.training.train import HessoSchedule

    out, ckpt, cfg, arrays, val_arrays = _prepare(args, "sparse", bool(args.distill_from))
    check_ratio(args.target_ratio, "--target-ratio")
    if args.save_plan:
        check_writable(args.save_plan, args.model)
    with step("load + shape inference", args.json):
        model = load(args.model)
    api.refuse_quantized(model)
    with step("analysis", args.json):
        analysis = analyze(model)
    schedule = HessoSchedule(analysis, args.target_ratio, args.periods, args.warmup, args.window, args.round_to,
                             args.prune_hidden)
    if not schedule.groups:
        raise SpaError(f"nothing to train sparse in '{args.model}': no prunable zero-invariant group")
    teacher = load(args.distill_from, infer=False).proto if args.distill_from else None
    before = cost.summary(model)
    feeds, labels, val = _split(model, arrays, val_arrays, args)
    result = _fit(args, analysis.model.proto, feeds, labels, val, teacher, cfg, ckpt, schedule)
    _notes(schedule.notes, args.json)
    plan = schedule.plan()
    write_err = _save(args, result.proto, out, val[0])
    if args.save_plan:
        write_text_atomic(args.save_plan, json.dumps(to_json(plan), indent=1))
    doc = _doc(args, out, ckpt, result, write_err, before, before)
    doc["train_sparse"] = {"target_ratio": args.target_ratio, "groups": len(schedule.groups),
                           "zero_channels": int(sum(map(len, plan.values()))), "notes": schedule.notes,
                           "plan_file": args.save_plan, "next": f"spa prune {out} --zeros"}
    if args.json:
        print(json.dumps(doc))
    else:
        _print(doc)
        err.print(f"{doc['train_sparse']['zero_channels']} channels in {len(plan)} groups are exactly zero; "
                  f"remove them with: spa prune {out} --zeros", markup=False, highlight=False)
    return 0
