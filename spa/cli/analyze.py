"""spa analyze: parsing and printing around spa.api.analyze."""

from __future__ import annotations

from spa.api.analyze import analyze
from spa.cli.app import CALIB_HELP, EXCLUDE_HELP, SIMPLIFY_HELP, add_calib, add_common, add_shape, progress
from spa.reporting import report
from spa.scoring import criteria


def parser(sub) -> None:
    a = sub.add_parser("analyze", help="show the channel groups of a model")
    a.add_argument("model")
    a.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help=EXCLUDE_HELP)
    a.add_argument("--simplify", action="store_true", help=SIMPLIFY_HELP)
    a.add_argument("--freeze-io", action="store_true", help="as for prune: a decoder's KV cache keeps its shape")
    preview = a.add_mutually_exclusive_group()
    preview.add_argument("--ratio", type=float,
                         help="preview a plan: attention blocks' sizes before -> after this ratio")
    preview.add_argument("--plan", help="preview a plan file: attention blocks' sizes before -> after")
    a.add_argument("--criterion", default="l1", choices=sorted(criteria.CRITERIA), help="with --ratio")
    a.add_argument("--prune-hidden", action="store_true", help="with --ratio: as for prune")
    add_calib(a, help="with --ratio: " + CALIB_HELP)
    a.add_argument("--seed", type=int, default=0, help="with --ratio and --criterion random")
    add_shape(a)
    add_common(a, json_help="print the analysis as JSON on stdout")


def run(args) -> int:
    analysis = analyze(args.model, args.exclude, simplify=args.simplify, ratio=args.ratio, plan=args.plan,
                       criterion=args.criterion, prune_hidden=args.prune_hidden, freeze_io=args.freeze_io,
                       calib=args.calib, seed=args.seed,
                       shape=args.shape, progress=progress(args))
    doc = analysis.to_json()
    if args.json:
        return report.print_json(doc)
    if (doc["simplify"] or {}).get("status", "ok") != "ok":
        report.note(f"not simplified: {doc['simplify']['reason']}")
    report.print_analysis(analysis, doc)
    what = "plan file" if args.plan else f"ratio {args.ratio}"
    report.print_blocks(doc["attention_blocks"],
                        "attention blocks" + (f" (before -> after, {what})" if "preview" in doc else ""))
    report.print_coverage(doc)
    if not args.simplify and report.shape_locked(analysis):
        report.err.print("hint: some channels are locked by shape arithmetic computed at run time; "
                         "--simplify folds it where sizes are static", markup=False, highlight=False)
    return 0


COMMANDS = {"analyze": run}
