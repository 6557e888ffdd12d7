"""Command line: a thin shell over spa's public API.

    spa analyze MODEL [--json] [--ratio R | --plan PLAN] [--criterion C] [--prune-hidden]
    spa prune MODEL --ratio R [-o OUT] [--criterion C] [--global] [--round-to N] [--prune-hidden]
                    [--simplify] [--exclude PATTERN] [--save-plan PLAN] [--json]
    spa prune MODEL --plan PLAN -o OUT
    spa prune MODEL --ratio R --criterion obspa [--calib DATA.npz] [--no-compensate]
    spa prune MODEL --target-params F | --target-macs F [--criterion C]
    spa eval MODEL --data DATA.npz [--labels KEY] [--reference REF] [--json]

Exit codes: 0 success, 1 a clear error (one line; traceback with -v), 2 usage error,
3 a requested verification failed. `--json` prints one document on stdout; progress
and logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path

from rich.console import Console

from spa import __version__
from spa import api
from spa.core import cost
from spa.scoring import criteria as importance
from spa.reporting import report
from spa.core.analysis import analyze
from spa.core.blocks import attention_blocks
from spa.core.data import load_npz
from spa.core.checks import output_check
from spa.core.errors import SpaError, VerificationError, first_line
from spa.core.model import check_writable, load, read_json, save, write_text_atomic
from spa.planning.planner import check_ratio, from_json, to_json

ZEROS_TOL = 1e-5  # spa prune --zeros: removing all-zero channels must leave the outputs as they were
ANALYZE_SCHEMA = 1
PRUNE_SCHEMA = 1
EVAL_SCHEMA = 1

err = Console(stderr=True)
SIMPLIFY_HELP = ("fold shape arithmetic over static sizes first (onnxslim), which frees axes that dynamic-axes "
                 "exports compute at run time; group ids then refer to the simplified graph")


@contextlib.contextmanager
def step(what: str, quiet: bool = False):
    """A spinner on stderr while a step runs, then one line with its time."""
    start = time.perf_counter()
    if quiet:
        yield
        return
    with err.status(f"{what}..."):
        yield
    err.print(f"[dim]{what}: {time.perf_counter() - start:.2f} s[/dim]")


CALIB_HELP = ".npz of calibration inputs keyed by input name: activation statistics for the criteria and --compensate"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spa", description="Structured pruning of ONNX models.")
    p.add_argument("--version", action="version", version=f"spa {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("analyze", help="show the channel groups of a model")
    a.add_argument("model")
    a.add_argument("--json", action="store_true", help="print the analysis as JSON on stdout")
    a.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="protect nodes/initializers whose name matches (glob; repeatable)")
    a.add_argument("--simplify", action="store_true", help=SIMPLIFY_HELP)
    preview = a.add_mutually_exclusive_group()
    preview.add_argument("--ratio", type=float,
                         help="preview a plan: attention blocks' sizes before -> after this ratio")
    preview.add_argument("--plan", help="preview a plan file: attention blocks' sizes before -> after")
    a.add_argument("--criterion", default="l1", choices=sorted(importance.CRITERIA), help="with --ratio")
    a.add_argument("--prune-hidden", action="store_true", help="with --ratio: as for prune")
    a.add_argument("--calib", metavar="DATA", help="with --ratio: " + CALIB_HELP)
    a.add_argument("--seed", type=int, default=0, help="with --ratio and --criterion random")
    a.add_argument("-v", "--verbose", action="store_true")

    e = sub.add_parser("eval", help="top-1 accuracy on data, and fidelity to a reference model")
    e.add_argument("model")
    e.add_argument("--data", required=True, help=".npz with one array per model input (first axis: samples)")
    e.add_argument("--labels", help="key of the labels array in --data (prints top-1 accuracy)")
    e.add_argument("--reference", help="model to compare outputs with (cosine, relative error)")
    e.add_argument("--output", help="output holding the class scores (default: the first)")
    e.add_argument("--batch", type=int, default=64, help="samples per run (default 64)")
    e.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    e.add_argument("-v", "--verbose", action="store_true")

    r = sub.add_parser("prune", help="remove channels and write a smaller model")
    r.add_argument("model")
    how = r.add_mutually_exclusive_group(required=True)
    how.add_argument("--ratio", type=float, help="fraction of each group's channels to remove, in [0, 1)")
    how.add_argument("--plan", help="apply an explicit plan file (from --save-plan)")
    how.add_argument("--target-params", type=float, metavar="F",
                     help="keep at most this fraction of the parameters, channels ranked globally")
    how.add_argument("--target-macs", type=float, metavar="F",
                     help="keep at most this fraction of the MACs, channels ranked globally")
    how.add_argument("--zeros", action="store_true",
                     help="remove exactly the channels whose weights are all zero (after spa train-sparse); "
                          "the outputs must not change (else exit 3)")
    r.add_argument("-o", "--output", help="output model (default: MODEL.pruned.onnx beside the input)")
    r.add_argument("--criterion", default="l1", choices=sorted(importance.CRITERIA),
                   help="channel scores (default l1); obspa, mean-act and apoz use activation statistics")
    r.add_argument("--calib", metavar="DATA", help=CALIB_HELP)
    r.add_argument("--calib-samples", type=int, default=512, metavar="N", help="samples of --calib to use (512)")
    r.add_argument("--labels", metavar="KEY", help="key of the labels in --calib for the gradient criteria (taylor, "
                   "snip, grasp, crop); without it the model's own predictions are the targets")
    r.add_argument("--compensate", action=argparse.BooleanOptionalAction, default=None,
                   help="update the consumers of removed channels (OBS) so no fine-tuning is needed "
                        "(default: on for obspa); calibrated with --calib, else data-free")
    r.add_argument("--global", dest="global_rank", action="store_true",
                   help="rank channels across all groups instead of the same ratio in each")
    r.add_argument("--max-group-ratio", type=float, default=0.9,
                   help="with --global: the most any one group may lose (default 0.9)")
    r.add_argument("--round-to", type=int, default=1, metavar="N", help="keep channel counts multiples of N")
    r.add_argument("--prune-hidden", action="store_true",
                   help="also prune groups that are not exact only through normalization statistics "
                        "(a transformer's hidden size: LayerNorm/RMSNorm); the output check shows the cost")
    r.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="protect nodes/initializers whose name matches (glob; repeatable)")
    r.add_argument("--simplify", action="store_true", help=SIMPLIFY_HELP)
    r.add_argument("--sensitivity", metavar="SENS", help="with --ratio: a `spa sensitivity --json` result; each "
                   "group is pruned at most as far as its measured loss stays within --max-loss")
    r.add_argument("--max-loss", type=float, default=0.01, help="with --sensitivity: 1 - cosine allowed per group")
    r.add_argument("--save-plan", metavar="PLAN", help="write the plan as JSON")
    r.add_argument("--seed", type=int, default=0, help="seed for --criterion random and check inputs")
    r.add_argument("--no-check", dest="check", action="store_false",
                   help="skip running the pruned model in ONNX Runtime before writing it")
    r.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    r.add_argument("-v", "--verbose", action="store_true")
    s = sub.add_parser("sensitivity", help="fidelity loss of each group pruned alone, per ratio")
    s.add_argument("model")
    s.add_argument("--calib", required=True, help=CALIB_HELP)
    s.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9], metavar="R")
    s.add_argument("--criterion", default="l1", choices=sorted(importance.CRITERIA))
    s.add_argument("--group", action="append", metavar="ID", help="measure only these groups (repeatable)")
    s.add_argument("--output", help="measure only this output (default: all float outputs)")
    s.add_argument("--max-samples", type=int, default=256, help="calibration samples used (256)")
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--exclude", action="append", default=[], metavar="PATTERN")
    s.add_argument("--simplify", action="store_true", help=SIMPLIFY_HELP)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--plot", metavar="OUT", help="loss vs ratio per group (.png or .svg)")
    s.add_argument("--json", action="store_true", help="print the result as JSON (input of prune --sensitivity)")
    s.add_argument("-v", "--verbose", action="store_true")
    for module in _extensions():
        module.parser(sub)
    return p


# each: parser(sub), COMMANDS {name: fn}
EXTENSIONS = ("sparsify", "quantize", "compress", "bench", "build", "report", "train")


def _extensions() -> list:
    import importlib

    return [importlib.import_module(f"spa.cli.{name}") for name in EXTENSIONS]


def _statistics(args, analysis, calib, quiet: bool):
    """Activation statistics when the criterion needs them, else None (compensation measures its
    own group by group with --calib, or derives them from the graph without)."""
    need = importance.NEEDS.get(args.criterion)
    if not need:
        return None
    if need == "gradients":
        from spa.core.data import split_labels
        from spa.scoring.gradients import require_torch

        require_torch()
        feeds, labels = split_labels(calib, analysis.model.input_names, args.labels)
        with step(f"gradients ({args.criterion}, {min(args.calib_samples, len(next(iter(feeds.values()))))} "
                  "samples)", quiet):
            return api.saliency(analysis, args.criterion, feeds, labels, max_samples=args.calib_samples)
    what = f"calibration, {args.calib_samples} samples" if calib is not None else "data-free"
    with step(f"activation statistics ({what})", quiet):
        return api.statistics(analysis, calib, max_samples=args.calib_samples)


def _plan(args, analysis, stats, quiet: bool) -> dict:
    with step(f"scoring ({args.criterion}) + planning", quiet):
        if args.sensitivity:
            from spa.planning import sensitivity

            ratios = sensitivity.protect(args.sensitivity_doc, args.ratio, args.max_loss)
            scores = api._scores(analysis, args.criterion, args.seed, stats)
            return sensitivity.plan_with_ratios(analysis, scores, ratios, args.round_to)
        if args.target_params is not None or args.target_macs is not None:
            kind = "params" if args.target_params is not None else "macs"
            keep = args.target_params if kind == "params" else args.target_macs
            return api.plan_for_target(analysis, kind, keep, args.criterion, args.round_to, args.max_group_ratio,
                                       args.seed, args.prune_hidden, stats)
        return api.make_plan(analysis, args.ratio, args.criterion, args.global_rank, args.round_to,
                             args.max_group_ratio, args.seed, prune_hidden=args.prune_hidden, stats=stats)


def _compensation(args, analysis, plan, calib, stats, quiet: bool):
    if not args.compensate or not plan:
        return None, []
    with step("compensating the consumers (OBS" + (", group by group)" if calib is not None else ", data-free)"),
              quiet):
        return api.compensation(analysis, plan, calib, stats, max_samples=args.calib_samples)


def _notes(notes: list, quiet: bool) -> None:
    if quiet or not notes:
        return
    for line in notes[:5]:
        err.print(f"note: {line}", markup=False, highlight=False, soft_wrap=True)
    if len(notes) > 5:
        err.print(f"note: ... and {len(notes) - 5} more (--json lists them all)", markup=False, highlight=False)


def _sensitivity(args) -> int:
    from rich.progress import Progress
    from rich.table import Table

    from spa.planning import sensitivity

    if not Path(args.model).is_file():
        raise SpaError(f"cannot load model '{args.model}': no such file")
    for r in args.ratios:
        check_ratio(r)
    if args.plot:  # fail before the slow part
        check_writable(args.plot, args.model)
        sensitivity.check_plot(args.plot)
    arrays = load_npz(args.calib)
    with step("load + shape inference", args.json):
        model = load(args.model)
    model, simplified = _simplify(model, args.simplify, args.json)
    with step("analysis", args.json):
        analysis = analyze(model, exclude=args.exclude)
    if not any(g.prunable for g in analysis.groups):
        raise SpaError(f"nothing to measure in '{args.model}': {report.why_nothing(analysis)}")
    with Progress(console=err, transient=True, disable=args.json) as bar:
        task = bar.add_task("sensitivity (groups x ratios)", total=None)
        doc = sensitivity.sensitivity(
            analysis, arrays, args.ratios, args.criterion, groups=args.group, batch_size=args.batch,
            seed=args.seed, max_samples=args.max_samples, output=args.output,
            progress=lambda done, total: bar.update(task, completed=done, total=total))
    doc = {**doc, "model": args.model, "calib": args.calib, "simplify": simplified}
    if args.plot:
        sensitivity.plot(doc, args.plot)
    if args.json:
        print(json.dumps(doc))
        return 0
    table = Table(title=f"sensitivity of {args.model} (1 - cosine vs the dense model, {doc['samples']} samples)",
                  title_justify="left")
    for i, col in enumerate(sensitivity.table_columns(doc)):
        table.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
    for row in sensitivity.table_rows(doc):
        table.add_row(*row)
    report.out.print(table)
    _notes(doc["notes"], False)
    return 0


def _analyze(args) -> int:
    with step("load + shape inference", args.json):
        model = load(args.model)
    model, simplified = _simplify(model, args.simplify, args.json)
    plan = _read_plan(args.plan) if args.plan else None
    if args.ratio is not None:
        check_ratio(args.ratio)
    with step("analysis", args.json):
        analysis = analyze(model, exclude=args.exclude)
    if args.ratio is not None:
        stats = None
        if args.calib and importance.NEEDS.get(args.criterion):
            with step("activation statistics (calibration)", args.json):
                stats = api.statistics(analysis, load_npz(args.calib))
        with step(f"scoring ({args.criterion}) + planning", args.json):
            plan = api.make_plan(analysis, args.ratio, args.criterion, seed=args.seed, prune_hidden=args.prune_hidden,
                                 stats=stats)
    blocks = attention_blocks(analysis, plan)
    doc = report.analysis_json(analysis, ANALYZE_SCHEMA, blocks)
    doc["simplify"] = simplified
    from spa.passes import sparsify as sp

    doc["sparsity"] = sp.report(model.proto)
    from spa.passes.quantize import coverage

    doc["quantization"] = coverage(model.proto)
    if plan is not None:
        doc["preview"] = {"ratio": args.ratio, "plan_file": args.plan,
                          "channels_removed": int(sum(len(c) for c in plan.values()))}
    if args.json:
        print(json.dumps(doc))
    else:
        report.print_analysis(analysis, doc)
        what = "plan file" if args.plan else f"ratio {args.ratio}"
        report.print_blocks(blocks, "attention blocks" + (f" (before -> after, {what})" if plan is not None else ""))
        sparsity = doc["sparsity"]
        err.print(f"{sparsity['pattern']} sparsity: {sparsity['holding']} of {sparsity['eligible']} eligible layers "
                  f"hold the pattern ({sparsity['layers']} Conv/Gemm/MatMul layers)", markup=False, highlight=False)
        quant = doc["quantization"]
        if quant["qdq_nodes"] or quant["float16_initializers"]:
            err.print(f"quantization: {quant['quantized']} of {quant['layers']} layers read QDQ inputs "
                      f"({quant['qdq_nodes']} Q/DQ nodes); {quant['float16_initializers']} float16 initializers",
                      markup=False, highlight=False)
        if not args.simplify and report.shape_locked(analysis):
            err.print("hint: some channels are locked by shape arithmetic computed at run time; "
                      "--simplify folds it where sizes are static", markup=False, highlight=False)
    return 0


def _simplify(model, wanted: bool, quiet: bool):
    """The simplified model and the pass's stats (None when not asked for)."""
    if not wanted:
        return model, None
    from spa.passes.simplify import simplify

    with step("simplify (onnxslim)", quiet):
        model, stats = simplify(model)
    if stats["status"] != "ok" and not quiet:
        err.print(f"note: not simplified: {stats['reason']}", markup=False, highlight=False)
    return model, stats


def _eval(args) -> int:
    from spa.core.data import load_npz
    from spa.scoring.evaluate import evaluate

    for path in filter(None, (args.model, args.reference)):
        if not Path(path).is_file():
            raise SpaError(f"cannot load model '{path}': no such file")
    if args.batch < 1:
        raise SpaError(f"invalid --batch {args.batch}: it must be a positive integer")
    arrays = load_npz(args.data)
    with step("evaluating", args.json):
        doc = evaluate(args.model, arrays, args.labels, args.reference, args.output, args.batch)
    doc = {"schema_version": EVAL_SCHEMA, "model": args.model, "data": args.data, "reference": args.reference, **doc}
    if args.json:
        print(json.dumps(doc))
    else:
        report.print_eval(doc)
    return 0


def _output_path(args, what: str = "pruned") -> Path:
    """-o, or MODEL.<what>.onnx beside the input."""
    if args.output:
        return Path(args.output)
    src = Path(args.model)
    return src.with_name(f"{src.stem}.{what}.onnx")


def _save_checked(model, proto, out: Path, quiet: bool, also=None) -> dict | None:
    """Write `proto` to `out` once the written file passes the checker (no worse than the
    input) and runs in ONNX Runtime like the input on random inputs (`also(tmp)`: one more
    check); nothing is left behind when a check fails. Returns the output check."""
    checked = {}

    def verify(tmp):
        api.check_against(tmp, model.path)
        checked["result"] = output_check(model, proto, pruned_file=tmp)
        if also is not None:
            also(tmp)

    with step("saving + checking", quiet):
        save(proto, out, source=Path(model.path), verify=verify)
    return checked.get("result")


def _read_plan(path: str) -> dict:
    return from_json(read_json(path, "plan"))


def _prune(args) -> int:
    out = _output_path(args)
    if not Path(args.model).exists():
        raise SpaError(f"cannot load model '{args.model}': no such file")
    check_writable(out, args.model)
    if args.save_plan:
        check_writable(args.save_plan, args.model)
        if Path(args.save_plan).resolve() == out.resolve():
            raise SpaError(f"--save-plan and -o both name '{out}'", "write the plan to another file")
    plan = _read_plan(args.plan) if args.plan else None
    targeted = args.target_params is not None or args.target_macs is not None
    if plan is None and not args.zeros:  # bad numbers fail before any slow work
        if not targeted:
            check_ratio(args.ratio)
        check_ratio(args.max_group_ratio, "--max-group-ratio")
        if args.round_to < 1:
            raise SpaError(f"invalid --round-to {args.round_to}: it must be a positive integer")
    if args.sensitivity and (plan is not None or targeted or args.zeros):
        raise SpaError("--sensitivity goes with --ratio (the most any group is pruned)")
    if args.calib_samples < 1:
        raise SpaError(f"invalid --calib-samples {args.calib_samples}: it must be a positive integer")
    if args.compensate is None:
        args.compensate = plan is None and not args.zeros and args.criterion == "obspa"
    if args.zeros and args.compensate:
        raise SpaError("--zeros removes channels that carry nothing: there is nothing to compensate")
    if plan is None and importance.NEEDS.get(args.criterion) in ("calibration", "gradients") and not args.calib:
        raise SpaError(f"criterion '{args.criterion}' needs calibration data", "pass --calib DATA.npz"
                       + (" (with --labels KEY when it holds labels)" if args.criterion in importance.GRADIENT else ""))
    if args.labels and not args.calib:
        raise SpaError("--labels names a key of --calib", "pass --calib DATA.npz")
    calib = load_npz(args.calib) if args.calib else None
    if args.sensitivity:  # a bad file fails before any slow work
        from spa.planning.sensitivity import read

        args.sensitivity_doc = read(args.sensitivity)
    quiet = args.json
    with step("load + shape inference", quiet):
        model = load(args.model)
    model.refuse_overwrite(out, args.save_plan)
    api.refuse_quantized(model)
    before = cost.summary(model)  # of the input, whatever the pre-pass does
    model, simplified = _simplify(model, args.simplify, quiet)
    with step("analysis", quiet):
        analysis = analyze(model, exclude=args.exclude)
    stats = None
    if args.zeros:
        from spa.training.train import zero_plan

        plan = zero_plan(analysis)
        if not plan and not args.json:
            err.print("note: no prunable channel is all zero; the output equals the input", markup=False)
    if plan is None:
        if (targeted or args.ratio > 0) and not any(g.prunable for g in analysis.groups):
            raise SpaError(f"nothing to prune in '{args.model}': {report.why_nothing(analysis)}")
        stats = _statistics(args, analysis, calib, quiet)
        plan = _plan(args, analysis, stats, quiet)
    values, notes = _compensation(args, analysis, plan, calib, stats, quiet)
    notes = list(dict.fromkeys((stats.notes if stats else []) + notes))
    _notes(notes, quiet)
    with step("pruning", quiet):
        pruned = api.prune(analysis, plan, check=False, compensate=values)  # checked below, from the written file
    blocks = attention_blocks(analysis, plan)
    counts = (len(analysis.groups), sum(g.prunable for g in analysis.groups))
    del analysis  # it holds the input's weights; the checks read the input from its file
    model.drop_weights()
    checked = {}

    def verify(tmp_file):  # runs on the written temp file, before it is renamed into place
        api.check_against(tmp_file, model.path)
        if args.check or args.zeros:
            checked["result"] = check = output_check(model, pruned, args.seed, pruned_file=tmp_file)
            if args.zeros and check.get("status") == "ok" and check["max_rel_err"] > ZEROS_TOL:
                raise VerificationError(f"removing the zero channels changed the outputs (max rel. error "
                                        f"{check['max_rel_err']:.2e} > {ZEROS_TOL:g}); nothing written")

    with step("saving + checking" if args.check or args.zeros else "saving + ONNX checker", quiet):
        save(pruned, out, source=Path(args.model), verify=verify)
    check = checked.get("result")
    if args.save_plan:
        write_text_atomic(args.save_plan, json.dumps(to_json(plan), indent=1))
    doc = report.prune_json(args, counts, before, pruned, plan, out, check, PRUNE_SCHEMA, blocks)
    doc["simplify"] = simplified
    doc["compensated"] = values is not None
    doc["statistics"] = None if stats is None else {"source": stats.source, "samples": stats.samples}
    if stats is not None and stats.source == "gradients":
        doc["statistics"]["labels"] = "data" if stats.labels else "own predictions"
    doc["notes"] = notes
    if args.json:
        print(json.dumps(doc))
    else:
        report.print_prune(doc)
        report.print_blocks(blocks, "attention blocks (before -> after)")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = {"analyze": _analyze, "prune": _prune, "eval": _eval, "sensitivity": _sensitivity}
        for module in _extensions():
            commands.update(module.COMMANDS)
        return commands[args.command](args)
    except SpaError as exc:
        if args.verbose:
            traceback.print_exc()
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        return 1
    except Exception as exc:  # a bug: still one line unless -v  # noqa: BLE001
        if args.verbose:
            traceback.print_exc()
        err.print(f"error: internal error ({type(exc).__name__}: {first_line(exc)}); rerun with -v for the traceback",
                  markup=False, highlight=False, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
