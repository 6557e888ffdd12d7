"""spa compress: prune -> sparsify -> quantize as one pipeline, each stage verified.

    MODEL ─spa prune─▶ stage 1 ─spa sparsify─▶ stage 2 ─spa quantize─▶ stage 3 ─▶ OUT
            each stage is exactly the single command (its checks: ONNX checker, ONNX Runtime on
            random inputs, the N:M pattern re-read from the written file), then measured against
            MODEL on calibration samples (and on --eval data): size, parameters, fidelity, accuracy

Stages run in a temporary folder beside OUT; OUT is written only when every stage passed
(`--save-stages` keeps OUT.<stage>.onnx too). Defaults follow the data: with --calib the
pruning criterion is obspa (compensated) and the N:M selection is obs (SparseGPT-style), the
best data-aware choices we measured (docs/benchmarks.md); without it l1 and magnitude.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

from spa.scoring import criteria as importance
from spa.cli.app import _output_path, err, step
from spa.core.data import load_npz
from spa.core.errors import SpaError, first_line
from spa.core.model import check_writable, load, save
from spa.planning.planner import check_ratio

SCHEMA = 1
FIDELITY_SAMPLES = 64


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
    c.add_argument("--calib", metavar="DATA", help=".npz of calibration inputs keyed by input name")
    c.add_argument("--calib-samples", type=int, metavar="N",
                   help="samples of --calib each stage uses (default: each command's own, prune 512, others 256)")
    c.add_argument("--quant-method", default="minmax", choices=["minmax", "entropy", "percentile"],
                   help="INT8 calibration (minmax)")
    c.add_argument("--eval", metavar="DATA", help=".npz of held-out inputs: fidelity (and accuracy with --labels) "
                   "after every stage")
    c.add_argument("--labels", metavar="KEY", help="key of the labels array in --eval")
    c.add_argument("--save-stages", action="store_true", help="also keep OUT.<stage>.onnx of every stage")
    c.add_argument("-o", "--output", help="output model (default: MODEL.compressed.onnx)")
    c.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    c.add_argument("-v", "--verbose", action="store_true")


def _check(args) -> None:
    """Every bad argument fails here, before any slow work."""
    if not Path(args.model).is_file():
        raise SpaError(f"cannot load model '{args.model}': no such file")
    check_ratio(args.ratio)
    if args.sparsify:
        from spa.passes.sparsify import parse_pattern

        parse_pattern(args.sparsify, "sparsify")
    elif args.sparsify_method or args.permute:
        raise SpaError("--sparsify-method and --permute go with --sparsify N:M")
    if not (args.ratio > 0 or args.sparsify or args.int8 or args.fp16):
        raise SpaError("nothing to do", "give --ratio R, --sparsify N:M, --int8 or --fp16")
    if args.criterion is not None and args.criterion not in importance.CRITERIA:
        raise SpaError(f"unknown criterion '{args.criterion}'", f"choose one of: {', '.join(importance.CRITERIA)}")
    needs = importance.NEEDS.get(args.criterion or "l1") in ("calibration", "gradients")
    if not args.calib and (args.int8 or args.sparsify_method == "obs" or (args.ratio > 0 and needs)):
        what = "--int8" if args.int8 else ("--sparsify-method obs" if args.sparsify_method == "obs"
                                          else f"criterion '{args.criterion}'")
        raise SpaError(f"{what} needs calibration data", "pass --calib DATA.npz")
    if args.labels and not args.eval:
        raise SpaError("--labels names a key of --eval", "pass --eval DATA.npz")
    if (args.calib_samples is not None and args.calib_samples < 1) or args.min_size < 1:
        raise SpaError("--calib-samples and --min-size must be positive integers")


def _stages(args) -> list:
    """(name, argv builder) for each requested stage; argv gets (input file, output file)."""
    calib = ["--calib", args.calib] if args.calib else []
    if args.calib and args.calib_samples is not None:
        calib += ["--calib-samples", str(args.calib_samples)]
    stages = []
    if args.ratio > 0:
        criterion = args.criterion or ("obspa" if args.calib else "l1")
        extra = (["--global"] if args.global_rank else []) + (["--prune-hidden"] if args.prune_hidden else [])
        needs = criterion in importance.NEEDS  # data-aware (calibration, moments, gradients): give it the data
        stages.append(("pruned", lambda i, o: ["prune", i, "--ratio", str(args.ratio), "--criterion", criterion,
                                               "-o", o, "--json"] + extra + (calib if needs else [])))
    if args.sparsify:
        method = args.sparsify_method or ("obs" if args.calib else "magnitude")
        stages.append(("sparse", lambda i, o: ["sparsify", i, "--pattern", args.sparsify, "--method", method,
                                               "--min-size", str(args.min_size), "-o", o, "--json"]
                       + (["--permute"] if args.permute else []) + (calib if method == "obs" else [])))
    if args.int8 or args.fp16:
        kind = "int8" if args.int8 else "fp16"
        stages.append((kind, lambda i, o: ["quantize", i, "-o", o, "--json"]
                       + (calib + ["--method", args.quant_method] if args.int8 else ["--fp16"])))
    return stages


def _run_stage(argv: list) -> dict:
    """One spa command in-process, its JSON document back; its error line (if any) is its own."""
    from spa.cli.app import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    if code != 0:
        raise _StageFailed(code)
    return json.loads(buf.getvalue())


class _StageFailed(Exception):
    def __init__(self, code: int):
        self.code = code


def _measure(path: Path, source: Path, calib: dict | None, held_out: dict | None, labels: str | None) -> dict:
    """Size and weights of a stage's file, and its fidelity to the input (and accuracy) on the
    data; a measurement ORT cannot make is recorded as an error, the pipeline goes on."""
    from spa.scoring.evaluate import evaluate_arrays

    params, nonzero = _params(load(path, infer=False))
    doc = {"bytes": _bytes(path), "params": params, "nonzero": nonzero}
    for key, data, lab, limit in (("calib", calib, None, FIDELITY_SAMPLES), ("eval", held_out, labels, None)):
        if data is None:
            continue
        try:
            rep = evaluate_arrays(path, data, lab, reference=str(source), max_samples=limit)
        except SpaError as exc:
            if key == "eval":  # the user's own data must fit the model
                raise
            doc[key] = {"error": str(exc)}
            continue
        except Exception as exc:  # noqa: BLE001 - ORT cannot run the data: say so, go on
            doc[key] = {"error": first_line(exc, limit=200)}
            continue
        doc[key] = _fidelity(rep)
        if "accuracy" in rep:
            doc[key]["accuracy"] = rep["accuracy"]
    return doc


def _fidelity(rep: dict) -> dict:
    fid = rep.get("fidelity") or {}
    return {"samples": rep["samples"], "cosine": min((f["cosine"] for f in fid.values()), default=None),
            "rel_err": max((f["rel_err"] for f in fid.values()), default=None)}


def _params(model) -> tuple[int, int]:
    """(weights, non-zero weights): elements of the numeric initializers of more than one value,
    Q/DQ scales and zero points left out, so a quantized stage counts the same weights."""
    import numpy as np
    from onnx import numpy_helper

    qparams = {i for n in model.proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
               for i in n.input[1:]}
    total = nonzero = 0
    for t in model.proto.graph.initializer:
        if t.name in qparams or int(np.prod(t.dims)) <= 1 or t.data_type not in (1, 2, 3, 10, 11, 16):
            continue
        a = numpy_helper.to_array(t)
        total += a.size
        nonzero += int(np.count_nonzero(a))
    return total, nonzero


def _bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def compress(args) -> int:
    _check(args)
    out = _output_path(args, "compressed")
    check_writable(out, args.model)
    calib = load_npz(args.calib) if args.calib else None
    held_out = load_npz(args.eval) if args.eval else None
    src = Path(args.model)
    load(src, infer=False).refuse_overwrite(out)
    work = Path(tempfile.mkdtemp(prefix=".spa-compress-", dir=out.parent))
    rows = []
    try:
        with step("input: measuring", args.json):
            rows.append({"stage": "input", "file": str(src), **_measure(src, src, calib, held_out, args.labels)})
        current = src
        for k, (name, argv) in enumerate(_stages(args), 1):
            target = work / f"{k}.{name}.onnx"
            with step(f"stage {k}: {name}", args.json):
                try:
                    detail = _run_stage(argv(str(current), str(target)))
                except _StageFailed as exc:
                    err.print(f"error: stage '{name}' failed (above); nothing written", markup=False)
                    return exc.code
                rows.append({"stage": name, "file": str(target), **_measure(target, src, calib, held_out, args.labels),
                             "detail": _summary(name, detail)})
            current = target
        with step("saving", args.json):
            save(load(current, infer=False).proto, out, source=src)
        if args.save_stages:
            for row in rows[1:]:
                kept = out.with_name(f"{out.stem}.{row['stage']}.onnx")
                save(load(Path(row["file"]), infer=False).proto, kept, source=src)
                row["file"] = str(kept)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.save_stages:
        for row in rows[1:]:
            row["file"] = None
    rows[-1]["file"] = str(out)
    doc = {"schema_version": SCHEMA, "input": args.model, "output": str(out), "stages": rows}
    if args.json:
        print(json.dumps(doc))
    else:
        _print(doc)
    return 0


def _summary(name: str, detail: dict) -> dict:
    """The few numbers of a stage's own JSON that the summary shows."""
    if name == "pruned":
        return {"criterion": detail["criterion"], "ratio": detail["ratio"], "channels_removed": detail["channels_removed"],
                "macs_before": detail["before"].get("macs"), "macs_after": detail["after"].get("macs")}
    if name == "sparse":
        return {"pattern": detail["pattern"], "method": detail["method"], "eligible": detail["eligible"],
                "layers": len(detail["layers"]), "retained_magnitude": detail["retained_magnitude"],
                "permuted_groups": sum(r["permuted"] for r in detail["permutation"] or [])}
    return {"coverage": detail.get("coverage"), "fidelity_on_calib": detail.get("fidelity_on_calib")}


def _print(doc: dict) -> None:
    from rich.table import Table

    from spa.reporting.report import out as console

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


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _what(row: dict) -> str:
    d = row.get("detail") or {}
    if row["stage"] == "pruned":
        macs = (f", MACs {d['macs_after'] / d['macs_before']:.2f}x" if d.get("macs_before") and d.get("macs_after")
                else "")
        return f"{d['criterion']} {d['ratio']:g}: {d['channels_removed']} channels removed{macs}"
    if row["stage"] == "sparse":
        return (f"{d['pattern']} {d['method']} on {d['eligible']} of {d['layers']} layers, retained |w| "
                f"{_num(d['retained_magnitude'], '.3f')}" + (f", {d['permuted_groups']} groups permuted"
                                                            if d["permuted_groups"] else ""))
    if row["stage"] in ("int8", "fp16"):
        cov = d.get("coverage") or {}
        return f"{cov.get('quantized', '-')} of {cov.get('layers', '-')} layers quantized" if row["stage"] == "int8" \
            else "float16 weights and math"
    return ""


COMMANDS = {"compress": compress}
