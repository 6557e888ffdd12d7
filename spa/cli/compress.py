"""spa compress: parsing and printing around spa.api.compress (prune -> sparsify -> quantize)."""

from __future__ import annotations

from rich.table import Table

from spa.api.compress import compress
from spa.cli.app import NO_CHECK_HELP, add_calib, add_common, add_shape, output_path, progress
from spa.cli.quantize import add_target
from spa.core.errors import with_flags
from spa.reporting import report
from spa.reporting.report import out as console

OPTIONS = ("ratio", "criterion", "global_rank", "prune_hidden", "sparsify", "sparsify_method", "permute", "min_size",
           "int8", "fp16", "calib", "calib_samples", "quant_method", "target", "eval", "labels", "distill_epochs",
           "save_stages", "shape", "check")


def parser(sub) -> None:
    c = sub.add_parser("compress", help="prune -> sparsify (N:M) -> quantize (INT8/FP16) in one verified pipeline")
    c.add_argument("model")
    c.add_argument("--ratio", type=float, default=0.0, help="fraction of each prunable group's channels to remove")
    c.add_argument("--criterion", help="pruning criterion (obspa with --calib, else l1)")
    c.add_argument("--global", dest="global_rank", action="store_true", help="rank channels across groups")
    c.add_argument("--prune-hidden", action="store_true", help="also prune a transformer's hidden size")
    c.add_argument("--sparsify", metavar="N:M", help="N:M semi-structured sparsity, e.g. 2:4")
    c.add_argument("--sparsify-method", choices=["magnitude", "obs"], help="(obs with --calib, else magnitude)")
    c.add_argument("--permute", action="store_true", help="channel permutation search before N:M masking")
    c.add_argument("--min-size", type=int, default=16, metavar="N", help="smallest layer to sparsify (16)")
    prec = c.add_mutually_exclusive_group()
    prec.add_argument("--int8", action="store_true", help="INT8 QDQ (needs --calib)")
    prec.add_argument("--fp16", action="store_true", help="float16 with float32 I/O and sensitive ops")
    add_calib(c, help=".npz of calibration inputs keyed by input name",
              samples_help="samples of --calib each stage uses (default: each command's own, prune 512, others 256)")
    c.add_argument("--quant-method", default="minmax", choices=["minmax", "entropy", "percentile"],
                   help="INT8 calibration (minmax)")
    add_target(c, "--int8")
    c.add_argument("--eval", metavar="DATA", help=".npz of held-out inputs: fidelity (and accuracy with --labels) "
                   "after every stage")
    c.add_argument("--labels", metavar="KEY", help="key of the labels array in --eval")
    c.add_argument("--distill-epochs", type=int, default=0, metavar="N",
                   help="after pruning, recover for N epochs by distillation from the input model on the --calib "
                        "inputs (no labels; needs the torch extra)")
    c.add_argument("--save-stages", action="store_true", help="also keep OUT.<stage>.onnx of every stage "
                   "(written with OUT, only when every stage passed: a failed run leaves no file)")
    add_shape(c)
    c.add_argument("--no-check", dest="check", action="store_false", help=NO_CHECK_HELP)
    add_common(c, output="output model (default: MODEL.compressed.onnx)")


def run(args) -> int:
    doc = compress(args.model, output=output_path(args, "compressed"), progress=progress(args),
                   **{k: getattr(args, k) for k in OPTIONS}).to_json()
    if args.json:
        return report.print_json(doc)
    _print(doc)
    return 0


def _print(doc: dict) -> None:
    rows = doc["stages"]
    table = Table(title=f"{doc['input']} -> {doc['output']}", title_justify="left")
    has_calib = any("calib" in r for r in rows)
    has_eval = any("eval" in r for r in rows)
    has_acc = any("accuracy" in r.get("eval", {}) for r in rows)
    cols = ["stage", "bytes", "x input", "weights", "non-zero"] + (["cosine (calib)", "rel. err (calib)"] if has_calib else []) \
        + (["cosine (eval)", "rel. err (eval)"] if has_eval else []) + (["accuracy"] if has_acc else []) + ["what"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("stage", "what") else "right", overflow="fold")
    base = rows[0]["bytes"]
    for r in rows:
        cells = [r["stage"], f"{r['bytes']:,}", f"{r['bytes'] / max(base, 1):.2f}", f"{r['params']:,}", f"{r['nonzero']:,}"]
        for key, on in (("calib", has_calib), ("eval", has_eval)):
            if on:
                f = r.get(key) or {}
                cells += [_num(f.get("cosine"), ".5f"), _num(f.get("rel_err"), ".3g")]
        if has_acc:
            cells.append(_num((r.get("eval") or {}).get("accuracy"), ".2%"))
        cells.append(_what(r))
        table.add_row(*cells)
    console.print(table)
    for r in rows[1:]:
        report.out.print(f"{r['stage']}: {report.check_line(r['check'])}", markup=False, highlight=False)
    for r in rows[1:]:
        for line in (r.get("detail") or {}).get("warnings") or ():
            report.warn(f"{r['stage']}: {with_flags(line, WARNING_FLAGS)}")


WARNING_FLAGS = {"calib": "--calib", "criterion": "--criterion", "ratio": "--ratio"}  # named by stage warnings


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _what(row: dict) -> str:
    d = row.get("detail") or {}
    if row["stage"] == "pruned":
        macs = (f", MACs {d['macs_after'] / d['macs_before']:.2f}x" if d.get("macs_before") and d.get("macs_after")
                else "")
        rounded = f", widths multiples of {d['round_to']} (for N:M)" if d.get("round_to", 1) > 1 else ""
        return f"{d['criterion']} {d['ratio']:g}: {d['channels_removed']} channels removed{macs}{rounded}"
    if row["stage"] == "sparse":
        return (f"{d['pattern']} {d['method']} on {d['eligible']} of {d['layers']} layers, retained |w| "
                f"{_num(d['retained_magnitude'], '.3f')}" + (f", {d['permuted_groups']} groups permuted"
                                                            if d["permuted_groups"] else ""))
    if row["stage"] == "distilled":
        kept = f"best epoch {d['best_epoch']}" if d["best_epoch"] else "no epoch beat the pruned weights: kept"
        return f"{d['epochs']} epochs from the input on --calib ({kept})"
    if row["stage"] in ("int8", "fp16"):
        cov = d.get("coverage") or {}
        return f"{cov.get('quantized', '-')} of {cov.get('layers', '-')} layers quantized" if row["stage"] == "int8" \
            else "float16 weights and math"
    return ""


COMMANDS = {"compress": run}
