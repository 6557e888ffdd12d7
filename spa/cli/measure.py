"""spa eval and spa sensitivity: parsing and printing around spa.api.measure."""

from __future__ import annotations

from rich.progress import Progress
from rich.table import Table

from spa.api.measure import evaluate, sensitivity
from spa.cli.app import (
    EXCLUDE_HELP,
    SIMPLIFY_HELP,
    add_calib,
    add_common,
    add_executor,
    executor_of,
    failed_tasks,
    progress,
    show_notes,
)
from spa.planning import sensitivity as sens
from spa.reporting import report
from spa.scoring import criteria

FLAGS = {"batch_size": "--batch"}  # spa.evaluate keeps the name it always had


def parser(sub) -> None:
    e = sub.add_parser("eval", help="top-1 accuracy on data, and fidelity to a reference model")
    e.add_argument("model")
    e.add_argument("--data", required=True, help=".npz with one array per model input (first axis: samples)")
    e.add_argument("--labels", help="key of the labels array in --data (prints top-1 accuracy)")
    e.add_argument("--reference", help="model to compare outputs with (cosine, relative error)")
    e.add_argument("--output", help="output holding the class scores (default: the first)")
    e.add_argument("--batch", type=int, default=64, help="samples per run (default 64)")
    add_common(e)
    s = sub.add_parser("sensitivity", help="fidelity loss of each group pruned alone, per ratio")
    s.add_argument("model")
    add_calib(s, required=True)
    s.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9], metavar="R")
    s.add_argument("--criterion", default="l1", choices=sorted(criteria.CRITERIA))
    s.add_argument("--group", action="append", metavar="ID", help="measure only these groups (repeatable)")
    s.add_argument("--output", help="measure only this output (default: all float outputs)")
    s.add_argument("--max-samples", type=int, default=256, help="calibration samples used (256)")
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help=EXCLUDE_HELP)
    s.add_argument("--simplify", action="store_true", help=SIMPLIFY_HELP)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--plot", metavar="OUT", help="loss vs ratio per group (.png or .svg)")
    add_executor(s)
    add_common(s, json_help="print the result as JSON (input of prune --sensitivity)")


def run_eval(args) -> int:
    doc = evaluate(args.model, args.data, args.labels, reference=args.reference, output=args.output,
                   batch_size=args.batch, progress=progress(args)).to_json()
    if args.json:
        return report.print_json(doc)
    report.print_eval(doc)
    return 0


def run_sensitivity(args) -> int:
    options = {k: getattr(args, k) for k in ("ratios", "criterion", "group", "output", "max_samples", "batch",
                                             "exclude", "simplify", "seed", "plot")}
    with executor_of(args) as ex, Progress(console=report.err, transient=True, disable=args.json) as bar:
        task = bar.add_task(f"sensitivity (groups x ratios, {ex.describe()})", total=None)
        doc = sensitivity(args.model, args.calib, progress=progress(args), **options, executor=ex,
                          retries=args.retries,
                          on_trial=lambda done, total: bar.update(task, completed=done, total=total)).to_json()
    failed = [f"{f['id']} at {f['ratio']:g}: {f['error']}" for f in doc["failed"]]
    if args.json:
        report.print_json(doc)
        return failed_tasks(failed, "trial")
    table = Table(title=f"sensitivity of {args.model} (1 - cosine vs the dense model, {doc['samples']} samples)",
                  title_justify="left")
    for i, col in enumerate(sens.table_columns(doc)):
        table.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
    for row in sens.table_rows(doc):
        table.add_row(*row)
    report.out.print(table)
    show_notes(doc["notes"])
    if args.plot:
        report.err.print(f"wrote {args.plot}", markup=False, highlight=False)
    return failed_tasks(failed, "trial")


COMMANDS = {"eval": run_eval, "sensitivity": run_sensitivity}
