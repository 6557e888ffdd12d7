"""spa quantize: INT8 QDQ or FP16."""

from __future__ import annotations

import json
from pathlib import Path


from spa import api
from spa.cli.app import _output_path, _save_checked, err, step
from spa.core.data import load_npz
from spa.core.errors import SpaError
from spa.core.model import check_writable, load


def parser(sub) -> None:
    q = sub.add_parser("quantize", help="INT8 QDQ (calibrated, placed for TensorRT) or FP16, with ONNX Runtime's "
                       "tooling")
    q.add_argument("model")
    how = q.add_mutually_exclusive_group(required=True)
    how.add_argument("--calib", metavar="DATA", help=".npz of calibration inputs keyed by input name: INT8")
    how.add_argument("--fp16", action="store_true", help="float16 weights and math, float32 inputs/outputs and "
                     "sensitive ops (normalizations, reductions, exp/log/pow/sqrt)")
    q.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"],
                   help="INT8 calibration (minmax)")
    q.add_argument("--calib-samples", type=int, default=256, metavar="N", help="samples of --calib to use (256)")
    q.add_argument("--no-per-channel", dest="per_channel", action="store_false",
                   help="one weight scale per tensor instead of per output channel")
    q.add_argument("-o", "--output", help="output model (default: MODEL.int8.onnx / MODEL.fp16.onnx)")
    q.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    q.add_argument("-v", "--verbose", action="store_true")


def quantize(args) -> int:
    from spa.passes import quantize

    src = Path(args.model)
    kind = "fp16" if args.fp16 else "int8"
    out = _output_path(args, kind)
    if not src.is_file():
        raise SpaError(f"cannot load model '{args.model}': no such file")
    if args.calib_samples < 1:
        raise SpaError(f"invalid --calib-samples {args.calib_samples}: it must be a positive integer")
    check_writable(out, args.model)
    calib = load_npz(args.calib) if args.calib else None
    with step("load + shape inference", args.json):
        model = load(args.model)
    model.refuse_overwrite(out)
    api.refuse_quantized(model, "quantize")
    with step("FP16 conversion" if args.fp16 else f"INT8 calibration ({args.method}) + QDQ", args.json):
        result = quantize.fp16(model.proto) if args.fp16 else \
            quantize.int8(model.proto, calib, args.method, args.per_channel, args.calib_samples)
    check = _save_checked(model, result, out, args.json)
    before, after = src.stat().st_size, out.stat().st_size
    fidelity = None
    if calib is not None:  # random inputs say little about a calibrated range: measure on the data too
        from spa.scoring.evaluate import evaluate_arrays

        rep = evaluate_arrays(out, calib, reference=str(src), max_samples=64)
        errs = [f["rel_err"] for f in (rep.get("fidelity") or {}).values()]
        fidelity = {"samples": rep["samples"], "max_rel_err": max(errs) if errs else 0.0}
    doc = {"schema_version": 1, "input": args.model, "output": str(out), "kind": kind, "fidelity_on_calib": fidelity,
           "method": None if args.fp16 else args.method, "per_channel": None if args.fp16 else args.per_channel,
           "bytes": {"before": before, "after": after}, "coverage": quantize.coverage(result),
           "check": check}
    if args.json:
        print(json.dumps(doc))
        return 0
    cov, check = doc["coverage"], doc["check"] or {}
    err.print(f"{args.model} -> {out} ({kind}): {before:,} -> {after:,} bytes ({after / max(before, 1):.2f}x); "
              + (f"{cov['quantized']} of {cov['layers']} Conv/Gemm/MatMul layers quantized; " if kind == "int8" else "")
              + (f"rel. error on {fidelity['samples']} calibration samples {fidelity['max_rel_err']:.3g}; "
                 if fidelity else "")
              + (f"output check: max relative error vs the input {check['max_rel_err']:.3g} (random inputs)"
                 if check.get("status") == "ok" else f"output check: {check.get('reason', 'skipped')}"),
              markup=False, highlight=False)
    return 0



COMMANDS = {"quantize": quantize}
