"""spa report: one self-contained HTML page for a compression run.

    DENSE + PRUNED... (+ bench.json from `spa bench --json`, + data.npz) ─▶ report.html

The page (spa.api.report, spa/reporting/html.py) shows size, parameters and MACs, output channels per layer,
costs per op type, fidelity to DENSE and measured latency, each as a plot and a table, with
the environment and the command line (as typed, or rebuilt from the arguments). The default
output is DENSE.report.html beside DENSE.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from spa.api.report import report as run_report
from spa.cli.app import add_common, add_shape, err, progress
from spa.reporting import html as html_report


def parser(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page for a compression run (plots and tables)")
    p.add_argument("dense", metavar="DENSE", help="the original model")
    p.add_argument("pruned", metavar="PRUNED", nargs="+", help="models made from DENSE (spa prune, spa compress)")
    p.add_argument("--bench", metavar="BENCH", help="latency measured by `spa bench DENSE PRUNED... --json`")
    p.add_argument("--data", metavar="DATA", help=".npz keyed by input name for the fidelity section "
                   "(default: random inputs)")
    p.add_argument("--samples", type=int, metavar="N", help=f"fidelity samples (default {html_report.DATA_SAMPLES} "
                   f"of --data, or {html_report.RANDOM_SAMPLES} random inputs)")
    p.add_argument("--title", help="page title (default: spa report: DENSE)")
    add_shape(p, help="input shape MACs and the random inputs are at, e.g. --shape x:1x3x736x736 (repeatable; "
                      "default: --data's, else every dynamic dim 1)")
    add_common(p, output="the page (default: DENSE.report.html beside DENSE)",
               json_help="also print the page's data as JSON on stdout")


def _command(args) -> str:
    """The command line as typed when run as `spa report ...`, else rebuilt from the arguments."""
    if Path(sys.argv[0]).name == "spa" and sys.argv[1:2] == ["report"]:
        return shlex.join(["spa", *sys.argv[1:]])
    argv = ["spa", "report", args.dense, *args.pruned]
    for flag in ("bench", "data", "samples", "title", "output"):
        if getattr(args, flag) is not None:
            argv += ["-o" if flag == "output" else f"--{flag}", str(getattr(args, flag))]
    for spec in args.shape or ():
        argv += ["--shape", spec]
    return shlex.join(argv + (["--json"] if args.json else []))


def report(args) -> int:
    src = Path(args.dense)
    out = Path(args.output) if args.output else src.with_name(f"{src.stem}.report.html")
    result = run_report(args.dense, args.pruned, bench=args.bench, data=args.data, samples=args.samples,
                        title=args.title, command=_command(args), output=out,
                        progress=progress(args), shape=args.shape)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        err.print(f"wrote {out} ({len(result.html):,} bytes)", markup=False, highlight=False)
    return 0


COMMANDS = {"report": report}
