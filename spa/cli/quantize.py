"""spa quantize: INT8 QDQ or FP16, a thin shell over spa.api.quantize.

    argv ─parser─▶ options ─spa.api.quantize.quantize(...)─▶ Result ─▶ --json document | one summary line
"""

from __future__ import annotations

from spa.api.quantize import quantize as quantize_model
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
from spa.passes.quantize import LAYER_MAX_ERR, TARGETS
from spa.reporting import report

FLAGS = {"method": "--method", "calib_samples": "--calib-samples", "fp16": "--fp16"}  # named by the warnings


def parser(sub) -> None:
    q = sub.add_parser("quantize", help="INT8 QDQ (calibrated, placed where the target runtime fuses it) or FP16, "
                       "with ONNX Runtime's tooling")
    q.add_argument("model")
    how = q.add_mutually_exclusive_group()
    add_calib(q, help=".npz of calibration inputs keyed by input name: INT8", samples=256, into=how)
    how.add_argument("--fp16", action="store_true", help="float16 weights and math, float32 inputs/outputs and "
                     "sensitive ops (normalizations, reductions, exp/log/pow/sqrt); weights listed as graph inputs "
                     "(old IR-3 exports) become constants and are converted; a model with nothing to convert is "
                     "refused (exit 1)")
    q.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"],
                   help="INT8 calibration (minmax)")
    add_target(q)
    q.add_argument("--mode", default="auto", choices=["auto", "static", "dynamic"],
                   help="INT8 for --target ort-cpu: static Q/DQ (needs --calib), dynamic (MatMul/Gemm/Gather weights "
                        "int8, activations quantized at run time; no --calib needed), or auto (default: static, and "
                        "for a transformer also dynamic, keeping whichever runs faster here)")
    q.add_argument("--no-per-channel", dest="per_channel", action="store_false",
                   help="one weight scale per tensor instead of per output channel")
    add_shape(q)
    add_max_loss(q)
    q.add_argument("--no-check", dest="check", action="store_false", help=NO_CHECK_HELP)
    add_common(q, output="output model (default: MODEL.int8.onnx / MODEL.fp16.onnx)")


def quantize(args) -> int:
    result = quantize_model(args.model, calib=args.calib, fp16=args.fp16, method=args.method,
                            per_channel=args.per_channel, calib_samples=args.calib_samples, target=args.target,
                            mode=args.mode,
                            shape=args.shape,
                            check=args.check, max_loss=args.max_loss,
                            output=output_path(args, "fp16" if args.fp16 else "int8"),
                            progress=progress(args))
    doc = result.to_json()
    if args.json:
        show_warnings(doc, FLAGS)
        return report.print_json(doc)
    show_notes(doc["notes"])
    err.print(_summary(doc), markup=False, highlight=False)
    show_warnings(doc, FLAGS)
    return 0


def _summary(doc: dict) -> str:
    """input -> output (kind): bytes, coverage, fidelity on the data, the output check."""
    cov, fidelity = doc["coverage"], doc["fidelity_on_calib"]
    before, after = doc["bytes"]["before"], doc["bytes"]["after"]
    return (f"{doc['input']} -> {doc['output']} ({doc['kind']}): {before:,} -> {after:,} bytes "
            f"({after / max(before, 1):.2f}x); "
            + (f"{cov['quantized']} of {cov['layers']} Conv/Gemm/MatMul layers quantized "
               f"({doc['mode']}) for {doc['target']}; " if doc["kind"] == "int8" else "")
            + (f"ONNX Runtime CPU fuses {_fused(doc['fused_kernels'])}; " if doc.get("fused_kernels") is not None else "")
            + (f"{doc['fallback']} layer(s) lost over {LAYER_MAX_ERR:.0%} each and kept float math with int8 weights "
               f"(worst: {doc['layers'][0]['node']}, {doc['layers'][0]['rel_err']:.2f}); " if doc.get("fallback") else "")
            + (f"{cov['weights_unlisted_from_inputs']} weights listed as graph inputs made constants; "
               if cov.get("weights_unlisted_from_inputs") else "")
            + (f"rel. error on {fidelity['samples']} calibration samples {fidelity['max_rel_err']:.3g}; "
               if fidelity else "")
            + report.check_line(doc["check"]))


def _fused(counts: dict) -> str:
    return ", ".join(f"{n} {op}" for op, n in counts.items()) if counts else "no integer kernel"


def add_target(p, what: str = "INT8") -> None:
    p.add_argument("--target", default="ort-cpu", choices=list(TARGETS),
                   help=f"where the {what} model runs, which decides where Q/DQ go: ort-cpu (ONNX Runtime's CPU "
                        "kernels: QLinearConv, QGemm, ...; default), tensorrt (TensorRT's explicit quantization), "
                        "ort-cuda (no INT8 kernels in ORT's CUDA provider: TensorRT's placement, symmetric)")


COMMANDS = {"quantize": quantize}
