"""spa sparsify: N:M semi-structured sparsity (2:4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from spa.cli.app import _output_path, _save_checked, err, step
from spa.core.analysis import analyze
from spa.core.data import load_npz
from spa.core.errors import SpaError, VerificationError
from spa.core.model import check_writable, load
from spa.reporting import report


def parser(sub) -> None:
    z = sub.add_parser("sparsify", help="N:M semi-structured sparsity (2:4) on Conv/Gemm/MatMul weights")
    z.add_argument("model")
    z.add_argument("--pattern", default="2:4", help="N:M: at most N non-zeros in every M along the reduction (2:4)")
    z.add_argument("--min-size", type=int, default=16, metavar="N",
                   help="smallest reduction/output size a layer needs to be sparsified (16)")
    z.add_argument("--method", default="magnitude", choices=["magnitude", "obs"],
                   help="which weights to keep: magnitude, or obs (calibrated second-order selection with "
                   "compensation, SparseGPT-style; needs --calib)")
    z.add_argument("--calib", metavar="DATA", help=".npz of calibration inputs keyed by input name (--method obs)")
    z.add_argument("--calib-samples", type=int, default=256, metavar="N", help="samples of --calib to use (256)")
    z.add_argument("--permute", action="store_true",
                   help="search channel permutations of coupled groups first (as NVIDIA ASP) to keep more magnitude")
    z.add_argument("--permute-budget", type=float, default=2.0, metavar="S",
                   help="seconds of permutation search per channel group (2)")
    z.add_argument("-o", "--output", help="output model (default: MODEL.sparse.onnx beside the input)")
    z.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    z.add_argument("-v", "--verbose", action="store_true")


def sparsify(args) -> int:
    from rich.table import Table

    from spa.passes import sparsify as sp

    n, m = sp.parse_pattern(args.pattern)
    if args.min_size < 1:
        raise SpaError(f"invalid --min-size {args.min_size}: it must be a positive integer")
    if args.method == "obs" and not args.calib:
        raise SpaError("--method obs needs calibration data", "pass --calib DATA.npz")
    if args.calib and args.method != "obs":
        raise SpaError("--calib is for --method obs", "add --method obs, or leave out --calib")
    if args.calib_samples < 1 or args.permute_budget <= 0:
        raise SpaError("--calib-samples and --permute-budget must be positive")
    src = Path(args.model)
    out = _output_path(args, "sparse")
    if not src.is_file():
        raise SpaError(f"cannot load model '{args.model}': no such file")
    check_writable(out, args.model)
    with step("load + shape inference", args.json):
        model = load(args.model)
    model.refuse_overwrite(out)
    calib = load_npz(args.calib) if args.calib else None
    analysis = None
    if args.permute:
        with step("analysis", args.json):
            analysis = analyze(model)
    what = f"masking {n}:{m}" + (" (calibrated OBS)" if args.method == "obs" else "") + \
        (" + permutation search" if args.permute else "")
    with step(what, args.json):
        sparse, found, permuted = sp.sparsify(model.proto, n, m, args.min_size, args.method, calib, model.dtypes,
                                              args.calib_samples, analysis, args.permute_budget)

    def pattern_holds(tmp):
        again = {x.node: x.holds for x in sp.layers(load(tmp, infer=False).proto, n, m, args.min_size)
                 if x.eligible}
        if not all(again.values()):
            raise VerificationError(f"the {n}:{m} pattern does not hold on the written weights; nothing written")

    check = _save_checked(model, sparse, out, args.json, pattern_holds)
    eligible = [x for x in found if x.eligible]
    doc = {"schema_version": 1, "input": args.model, "output": str(out), "pattern": f"{n}:{m}",
           "min_size": args.min_size, "layers": [x.to_json() for x in found], "eligible": len(eligible),
           "retained_magnitude": (float(np.mean([x.retained for x in eligible])) if eligible else None),
           "method": args.method, "permutation": permuted if args.permute else None, "check": check}
    if args.json:
        print(json.dumps(doc))
        return 0
    table = Table(title=f"{args.model} -> {out} ({n}:{m})", title_justify="left")
    for col in ("layer", "op", "weight", "reduction", "sparsified", "retained |w|"):
        table.add_column(col, justify="left" if col in ("layer", "op", "weight", "sparsified") else "right",
                         overflow="fold")
    for x in found:
        how = (x.method if x.method == "obs" or args.method == "magnitude" else f"magnitude ({x.note})")
        table.add_row(x.node, x.op, x.weight or "-", str(x.reduction or "-"),
                      f"yes, {how}" if x.eligible else f"no: {x.reason}",
                      f"{x.retained:.3f}" if x.retained is not None else "-")
    report.out.print(table)
    if args.permute:
        moved = [r for r in permuted if r["permuted"]]
        err.print(f"permutation: {len(moved)} of {len(permuted)} candidate groups permuted"
                  + (f"; kept magnitude of their consumers {np.mean([r['retained_before'] for r in moved]):.3f} -> "
                     f"{np.mean([r['retained_after'] for r in moved]):.3f}" if moved else "")
                  + "".join(f"; {r['note']}" for r in permuted[:1] if r.get("note")), markup=False, highlight=False)
    check = doc["check"] or {}
    err.print(f"{len(eligible)} of {len(found)} layers sparsified {n}:{m}"
              + (f"; output check: max relative error vs the input {check['max_rel_err']:.3g} (random inputs)"
                 if check.get("status") == "ok" else ""), markup=False, highlight=False)
    return 0



COMMANDS = {"sparsify": sparsify}
