"""spa sweep: prune, evaluate and benchmark a grid over models, one results table (spa.api.sweep).

    spa sweep GRID.yaml [-o results.csv|.json|.md] [--executor in-process|processes|ray] [--workers N]
                        [--address auto|HOST:PORT] [--retries N] [--json]

Exit 1 when a task failed after its retries (its row says why; the table is still printed and written).
"""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from spa.api.sweep import cell_text
from spa.api.sweep import sweep as run_sweep
from spa.cli.app import add_common, add_executor, executor_of, failed_tasks, progress
from spa.reporting import report


def parser(sub) -> None:
    p = sub.add_parser("sweep", help="prune/eval/bench over a grid of options and models, one results table")
    p.add_argument("spec", metavar="GRID", help="the sweep: a .yaml/.yml or .json file (docs/sweeps.md)")
    add_executor(p)
    add_common(p, output="also write the table here (.csv, .json or .md)")


def sweep(args) -> int:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with executor_of(args) as ex, Progress(*columns, console=report.err, transient=True, disable=args.json) as bar:
        task = bar.add_task(f"sweep ({ex.describe()})", total=None)
        doc = run_sweep(args.spec, executor=ex, retries=args.retries, output=args.output, progress=progress(args),
                        on_task=lambda done, total: bar.update(task, completed=done, total=total)).to_json()
    if args.json:
        report.print_json(doc)
    else:
        table = Table(title=f"spa sweep {args.spec}: {doc['tasks']} tasks ({doc['executor']})", title_justify="left")
        for c in doc["columns"]:
            table.add_column(c, overflow="fold")
        for r in doc["rows"]:
            table.add_row(*[cell_text(r.get(c)) for c in doc["columns"]])
        report.out.print(table)
        if args.output:
            report.err.print(f"wrote {args.output}", markup=False, highlight=False)
    return failed_tasks([f"{r['model']} {_point(r, doc)}: {r['error']}" for r in doc["rows"] if r.get("error")],
                        "task")


def _point(row: dict, doc: dict) -> str:
    return "(dense)" if row.get("dense") else " ".join(f"{k}={row.get(k)}" for k in doc["grid"])


COMMANDS = {"sweep": sweep}
