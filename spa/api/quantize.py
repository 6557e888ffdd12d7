"""spa.quantize: INT8 QDQ (calibrated, placed for TensorRT) or FP16, verified and measured.

    model ─load─▶ Int8Pass (calib=) | Fp16Pass (fp16=True) ─ensures: ONNX checker, ONNX Runtime vs the input─▶
          quantized model ─measured: bytes before/after, QDQ coverage, fidelity on the calibration data─▶ Result

The Result's document is `spa quantize --json`'s: schema_version, input, output, kind,
fidelity_on_calib, method, per_channel, target, mode, cpu_s_per_run, fused_kernels, elementwise: {int8, float?}, layers, fallback, speed: {float_cpu_s, int8_cpu_s, speedup}, bytes, coverage, check, agreement, warnings. `bytes` are file sizes where
there is a file (the input's path, `output`); a model only in memory counts its serialized size.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from spa.api.common import arrays, saver
from spa.api.prune import refuse_quantized
from spa.api.result import Result, as_model, model_name, output_target, stepper
from spa.core import shapes
from spa.core.checks import QUANTIZE_ADVICE, Gate, check_max_loss, check_notes, gate_fields
from spa.core.data import conform
from spa.core.errors import positive_int, require
from spa.core.model import Model
from spa.passes.quantize import CUDA_NOTE, METHODS, MODES, TARGETS, Fp16Pass, Int8Pass
from spa.scoring.evaluate import evaluate_arrays

SCHEMA = 1
FIDELITY_SAMPLES = 64  # calibration samples the fidelity on the data is measured on


def quantize(model, *, calib=None, fp16: bool = False, method: str = "minmax", per_channel: bool = True,
             calib_samples: int = 256, target: str = "ort-cpu", mode: str = "auto", shape=None, check: bool = True,
             max_loss: float | None = None, output=None, progress=None) -> Result:
    """INT8 QDQ calibrated on `calib` (a path to an .npz or arrays keyed by input name; `method`
    minmax, entropy or percentile over `calib_samples` samples; weight scales per output channel
    unless `per_channel=False`), or FP16 with `fp16=True`: exactly one of the two. INT8's Q/DQ are
    placed where `target`'s runtime fuses them into integer kernels: "ort-cpu" (ONNX Runtime's CPU
    provider: QLinearConv, QGemm, ...), "tensorrt" (TensorRT's explicit quantization) or
    "ort-cuda" (see spa.passes.quantize; the document's `fused_kernels` counts what ONNX
    Runtime's CPU optimizer fused). `mode` (ort-cpu): "static" QDQ, "dynamic" (MatMul/Gemm/Gather
    weights int8, activations quantized at run time; needs no `calib`), or "auto": static, and for
    a transformer (MatMul layers, no convolution) also dynamic, keeping whichever runs faster here
    (the document's `mode` and `cpu_s_per_run` say which and why). Static INT8 measures each
    model's tail (softmax, reshapes before an output) stays float; for ort-cpu, where the result's
    outputs agree less than COSINE_FLOOR (cosine) with the input's on `calib`, the elementwise ops
    (Add, Mul, Concat) go float if that agrees better (`elementwise`: the cosine of each). Each
    layer's own error on `calib` (`layers`: [{node, op, output, rel_err, kept}], worst first); a layer off
    by more than LAYER_MAX_ERR keeps a weight-only INT8 weight and float math (`fallback`: how
    many). For ort-cpu, `speed` is float32 against the result on one sample (a warning where INT8
    is slower). `output`: write there (checked on the written file before it is renamed into
    place), else checked in memory.
    `check=False`: no run in ONNX Runtime against the input (the ONNX checker only). `shape`: the
    input shapes the output check runs at (default: the first sample of `calib`). With `check`, the
    result's agreement with the input is measured on `calib` (FP16: random inputs) and warned
    about below AGREEMENT_WARN; `max_loss`: the most it may lose (else VerificationError, nothing
    written)."""
    _check_options(calib is not None, fp16, method, target, mode)
    positive_int("calib_samples", calib_samples)
    check_max_loss(max_loss, check)
    shapes.parse(shape)
    out = output_target(output, model, calib)
    data = arrays(calib)
    step = stepper(progress)
    with step("load + shape inference"):
        loaded = as_model(model)
    loaded.refuse_overwrite(out)
    refuse_quantized(loaded, "quantize")
    data = conform(data, loaded.proto, "calib=")
    shapes.bind(loaded, shape, data)
    rewrite = Fp16Pass() if fp16 else Int8Pass(data or {}, method, per_channel, calib_samples, target, mode)
    rewrite.run_check = check
    rewrite.gate = Gate(data, 0, max_loss, QUANTIZE_ADVICE) if check else None
    done = rewrite.run(loaded, out, step=step,
                    what="FP16 conversion" if fp16 else f"INT8 calibration ({method}) + QDQ")
    produced = out if out is not None else done.model
    doc = {"schema_version": SCHEMA, "input": model_name(model), "output": None if out is None else str(out),
           "kind": rewrite.name, "fidelity_on_calib": _fidelity(produced, loaded, data),
           "method": None if fp16 else method, "per_channel": None if fp16 else per_channel,
           "target": None if fp16 else target, **{k: done.stats.get(k) for k in INT8_STATS},
           "bytes": {"before": _bytes(loaded.path or loaded.proto), "after": _bytes(produced)},
           "coverage": done.stats["coverage"], "check": done.check,
           "notes": check_notes(done.check) + ([CUDA_NOTE] if not fp16 and target == "ort-cuda" else []),
           **gate_fields(done.check, QUANTIZE_ADVICE), **shapes.record(loaded)}
    doc["warnings"] = list(doc.get("warnings") or []) + _slower(doc["speed"])
    return Result(doc, done.model, saver(rewrite, loaded, done), loaded.path)


INT8_STATS = ("mode", "cpu_s_per_run", "fused_kernels", "elementwise", "layers", "fallback", "speed")  # Int8Pass's, into the document


def _check_options(calib: bool, fp16: bool, method: str, target: str, mode: str) -> None:
    require(not (calib and fp16), "give exactly one of calib=DATA (INT8) and fp16=True (FP16)")
    require(calib or fp16 or mode == "dynamic", "INT8 needs calib=DATA",
            "give calib=DATA, or mode='dynamic' (no calibration), or fp16=True")
    require(mode in MODES, f"invalid mode={mode!r}", f"choose one of: {', '.join(MODES)}")
    require(mode != "dynamic" or target == "ort-cpu", f"mode='dynamic' is for target='ort-cpu', not {target!r}",
            "TensorRT and ORT's CUDA provider run static Q/DQ")
    require(method in METHODS, f"invalid method={method!r}", f"choose one of: {', '.join(METHODS)}")
    require(target in TARGETS, f"invalid target={target!r}", f"choose one of: {', '.join(TARGETS)}")


def _slower(speed: dict | None) -> list[str]:
    """The warning when INT8 did not make the model faster on ONNX Runtime's CPU provider."""
    if not speed or not speed.get("speedup") or speed["speedup"] >= 1.0:
        return []
    return [(f"INT8 runs {speed['speedup']:.2f}x as fast as float32 here (ONNX Runtime CPU, one thread, one sample: "
             f"{speed['int8_cpu_s'] * 1e3:.2f} vs {speed['float_cpu_s'] * 1e3:.2f} ms): its layers are too small "
             "for the integer kernels to pay for the Q/DQ work; keep the float32 model (or try --fp16)")]


def _fidelity(produced, original: Model, data: dict | None) -> dict | None:
    """Relative error against the input on the calibration data (random inputs say little about a
    calibrated range); None for FP16."""
    if data is None:
        return None
    reference = str(original.path) if original.path is not None else original.proto
    rep = evaluate_arrays(produced, data, reference=reference, max_samples=FIDELITY_SAMPLES)
    errs = [f["rel_err"] for f in (rep.get("fidelity") or {}).values()]
    return {"samples": rep["samples"], "max_rel_err": max(errs) if errs else 0.0}


def _bytes(model) -> int:
    """Size of a model file (as `ls` shows it), or of a ModelProto serialized."""
    return model.ByteSize() if isinstance(model, onnx.ModelProto) else Path(model).stat().st_size
