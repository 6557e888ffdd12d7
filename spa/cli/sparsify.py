"""spa sparsify: N:M semi-structured sparsity (2:4), a thin shell over spa.api.sparsify.

    argv ─parser─▶ options ─spa.api.sparsify.sparsify(...)─▶ Result ─▶ --json document | table + summary
"""

from __future__ import annotations

import numpy as np
from rich.table import Table

from spa.api.sparsify import sparsify as sparsify_model
from spa.cli.app import (
    NO_CHECK_HELP,
    add_calib,
    add_common,
    add_max_loss,
    add_shape,
    err,
    output_path,
    progress,
    show_notes,
    show_warnings,
)
from spa.reporting import report

FLAGS = {"method": "--method", "calib": "--calib", "min_size": "--min-size"}  # named by the warnings


def parser(sub) -> None:
    z = sub.add_parser("sparsify", help="N:M semi-structured sparsity (2:4) on Conv/Gemm/MatMul weights")
    z.add_argument("model")
    z.add_argument("--pattern", default="2:4", help="N:M: at most N non-zeros in every M along the reduction (2:4)")
    z.add_argument("--min-size", type=int, default=16, metavar="N",
                   help="smallest reduction/output size a layer needs to be sparsified (16)")
    z.add_argument("--method", default="magnitude", choices=["magnitude", "obs"],
                   help="which weights to keep: magnitude, or obs (calibrated second-order selection with "
                   "compensation, SparseGPT-style; needs --calib)")
    add_calib(z, help=".npz of calibration inputs keyed by input name: --method obs, and the agreement with the "
             "input is measured on it", samples=256)
    z.add_argument("--permute", action="store_true",
                   help="search channel permutations of coupled groups first (as NVIDIA ASP) to keep more magnitude")
    z.add_argument("--permute-budget", type=float, default=2.0, metavar="S",
                   help="seconds of permutation search per channel group (2)")
    add_shape(z)
    add_max_loss(z)
    z.add_argument("--no-check", dest="check", action="store_false", help=NO_CHECK_HELP)
    add_common(z, output="output model (default: MODEL.sparse.onnx beside the input)")


def sparsify(args) -> int:
    result = sparsify_model(args.model, pattern=args.pattern, method=args.method, calib=args.calib,
                            calib_samples=args.calib_samples, min_size=args.min_size, permute=args.permute,
                            permute_budget=args.permute_budget, shape=args.shape, check=args.check,
                            max_loss=args.max_loss,
                            output=output_path(args, "sparse"),
                            progress=progress(args))
    doc = result.to_json()
    if args.json:
        show_warnings(doc, FLAGS)
        return report.print_json(doc)
    report.out.print(_table(doc))
    if doc["permutation"] is not None:
        _print_permutation(doc["permutation"])
    eligible = sum(1 for x in doc["layers"] if x["eligible"])
    show_notes(doc["notes"])
    err.print(f"{eligible} of {len(doc['layers'])} layers sparsified {doc['pattern']}; "
              f"{report.check_line(doc['check'])}", markup=False, highlight=False)
    show_warnings(doc, FLAGS)
    return 0


def _table(doc: dict) -> Table:
    """One row per Conv/Gemm/MatMul: its weight, reduction size, whether and how it was sparsified."""
    table = Table(title=f"{doc['input']} -> {doc['output']} ({doc['pattern']})", title_justify="left")
    for col in ("layer", "op", "weight", "reduction", "sparsified", "retained |w|"):
        table.add_column(col, justify="left" if col in ("layer", "op", "weight", "sparsified") else "right",
                         overflow="fold")
    for x in doc["layers"]:
        how = x["method"] if x["method"] == "obs" or doc["method"] == "magnitude" else f"magnitude ({x['note']})"
        table.add_row(x["node"], x["op"], x["weight"] or "-", str(x["reduction"] or "-"),
                      f"yes, {how}" if x["eligible"] else f"no: {x['reason']}",
                      f"{x['retained']:.3f}" if x["retained"] is not None else "-")
    return table


def _print_permutation(rows: list) -> None:
    moved = [r for r in rows if r["permuted"]]
    err.print(f"permutation: {len(moved)} of {len(rows)} candidate groups permuted"
              + (f"; kept magnitude of their consumers {np.mean([r['retained_before'] for r in moved]):.3f} -> "
                 f"{np.mean([r['retained_after'] for r in moved]):.3f}" if moved else "")
              + "".join(f"; {r['note']}" for r in rows[:1] if r.get("note")), markup=False, highlight=False)


COMMANDS = {"sparsify": sparsify}
