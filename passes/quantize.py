"""INT8 (QDQ) and FP16 as graph passes, on ONNX Runtime's own tooling.

INT8 (`int8`): ONNX Runtime's `quantize_static` in QDQ format, calibrated on the given data
(MinMax, Entropy or Percentile), weights signed int8, symmetric, per output channel; the Q/DQ
placement depends on where the model will run (`target`, TARGETS), because each runtime fuses
a different pattern into its integer kernels:

- `ort-cpu` (the default): the pattern ONNX Runtime's CPU graph optimizer fuses into
  QLinearConv, QGemm, QLinearMatMul, QLinearAdd, QLinearSoftmax, ...: Q/DQ on the inputs *and*
  the output of every op ORT has an integer kernel for (its QDQ and QLinear registries), and
  activations uint8 with a zero point (U8S8: the combination ORT's x86 kernels fuse for every
  convolution; signed activations leave some convolutions in float). Normalizations stay float.
  Measured here on ResNet-50: 53 of 53 convolutions fused, 3.4x faster than float32 on one
  thread; the TensorRT placement below fuses none there and is slower than float32.
- `tensorrt`: the way TensorRT's explicit quantization expects it: activations symmetric
  (zero point 0; TensorRT needs symmetric scales and fuses per-channel weight scales into
  kernels); Q/DQ on the *inputs* of Conv/ConvTranspose/Gemm/MatMul and not on their outputs
  (`OpTypesToExcludeOutputQuantization`): TensorRT fuses DQ -> Conv -> (bias, activation) -> Q
  of the next layer itself, and a Q/DQ pair after a conv would block that; both inputs of
  residual `Add`s quantized, then one taken off (`fuse_residuals`) so the shortcut's Q/DQ fuses
  into the conv that adds it; biases stay float (TensorRT folds them).
- `ort-cuda`: ONNX Runtime's CUDA provider has no integer convolution or GEMM kernel (its
  FAQ: QuantizeLinear, DequantizeLinear and MatMulInteger only), so no placement makes INT8
  faster there; the model gets the symmetric S8S8 placement with output Q/DQ that ORT's
  TensorRT provider runs in INT8, and the result says that FP16 is the faster choice on CUDA.

`fused_kernels` counts what ONNX Runtime's CPU optimizer made of a model (it saves the
optimized graph with `optimized_model_filepath`): the proof that a placement fuses.

FP16 (`fp16`): ONNX Runtime's `convert_float_to_float16` with the graph's inputs and outputs
kept float32 (Cast at the edges) and numerically sensitive ops kept in float32
(normalizations, reductions, exp/log/pow/sqrt), since TensorRT 10.12+ builds strongly typed
networks from the precisions written in the ONNX.

The pass forms (passes/base.Pass): `Int8Pass` and `Fp16Pass`, rewrite = the conversion above,
ensures = the base promises (ONNX checker, ONNX Runtime on random inputs like the input);
stats = {"coverage": coverage(result)}.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper, version_converter
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
from spa.backends.ort import load_error_isolated
from spa.passes.base import Pass

from spa.core.data import fixed_batch_size, model_batches
from spa.core.errors import SpaError, UsageError, first_line
from spa.core.model import Model
from spa.core.runtime import ort_reason, random_feeds, run, run_with_outputs, session
from spa.core.sizes import TWO_GB, weight_bytes
from spa.core.tensors import reads

METHODS = ("minmax", "entropy", "percentile")
TARGETS = ("ort-cpu", "ort-cuda", "tensorrt")
# ops ORT's CPU optimizer turns into integer kernels (counted in its optimized graph: fused_kernels)
FUSED_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
             "DynamicQuantizeMatMul", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul", "QLinearSoftmax",
             "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid",
             "QLinearLeakyRelu", "QAttention", "QEmbedLayerNormalization", "QLinearWhere")
# normalizations keep float32 inputs for ORT: no integer kernel, and the most range-sensitive ops
ORT_FLOAT_OPS = ("LayerNormalization", "InstanceNormalization", "BatchNormalization", "EmbedLayerNormalization")
MODES = ("auto", "static", "dynamic")
DYNAMIC_OPS = ("MatMul", "Gemm", "Gather", "Attention")  # not Conv: ConvInteger is slower than float on ORT's CPU
TIMED_RUNS = 10  # runs per candidate when mode="auto" times static against dynamic
CUDA_NOTE = ("ONNX Runtime's CUDA provider has no INT8 convolution or GEMM kernel, so this model is not faster "
             "there than float32: use --fp16 for the CUDA provider; this placement runs in INT8 under ORT's "
             "TensorRT provider")
# layers that compute in integers (dynamic quantization, QOperator format): no float weight, no MACs counted
INTEGER_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "QGemm")
QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")
NO_OUTPUT_QDQ = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")
FP32_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
            "SkipSimplifiedLayerNormalization", "InstanceNormalization", "GroupNormalization", "BatchNormalization",
            "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "Pow", "Sqrt",
            "Reciprocal", "Exp", "Log", "Erf")


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over arrays keyed by input name."""

    def __init__(self, feeds: dict, batch: int, fixed: int | None):
        # a fixed-batch model's last batch is padded with copies of a real sample: min/max ranges are
        # unchanged by them (histogram methods count that sample a few times more)
        self._it = iter(model_batches(feeds, batch, fixed=fixed))

    def get_next(self):  # all ORT's calibrators call: None ends the data
        return next(self._it, None)


def int8(proto: onnx.ModelProto, feeds: dict, method: str = "minmax", *, per_channel: bool = True,
         max_samples: int = 256, batch: int = 32, percentile: float = 99.999, target: str = "ort-cpu",
         exclude: tuple = ()) -> onnx.ModelProto:
    """The QDQ INT8 model of `proto`, calibrated on `feeds` ({input: [N, ...]}), its Q/DQ placed
    for `target` (TARGETS); the nodes named in `exclude` stay float."""
    if method not in METHODS:
        raise SpaError(f"unknown calibration method '{method}'", f"choose one of: {', '.join(METHODS)}")
    check_target(target)
    inputs = {i.name for i in proto.graph.input} - {t.name for t in proto.graph.initializer}
    missing = sorted(inputs - set(feeds))
    if missing:
        raise SpaError(f"calibration data has no array for model input(s) {missing} (it has {sorted(feeds)})")
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer):
        raise SpaError("cannot quantize a float16 model to INT8", "quantize the float32 model")
    feeds = {k: (np.asarray(v)[:max_samples] if np.ndim(v) else np.asarray(v)) for k, v in feeds.items() if k in inputs}
    fixed = fixed_batch_size(proto)
    proto, given = _named(_opset_13(proto))
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    ops, activations, extra = _placement(target, proto)
    extra.update({"WeightSymmetric": True, "CalibPercentile": percentile, "CalibMovingAverage": method == "minmax"})
    with tempfile.TemporaryDirectory(prefix="spa-quant-") as tmp:
        out = Path(tmp) / "int8.onnx"
        cwd = os.getcwd()
        os.chdir(tmp)  # the calibrator writes its augmented model to the working directory
        work = onnx.ModelProto()
        work.CopyFrom(proto)  # the tooling rewrites the proto it is given (weights to external data)
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # the tooling's "consider pre-processing" advice
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)  # overflowing ranges: the error below says it
                quantize_static(work, str(out), _Reader(feeds, batch, fixed), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=ops, per_channel=per_channel, nodes_to_exclude=list(exclude),
                                activation_type=activations, weight_type=QuantType.QInt8,
                                calibrate_method=calib, extra_options=extra)
        except SpaError:
            raise
        except Exception as exc:  # noqa: BLE001 - ORT's tooling fails in many ways; one line
            raise SpaError(f"INT8 quantization failed in onnxruntime.quantization: {ort_reason(exc)}",
                           "activations beyond the float32 range (inf or NaN on the calibration data) give no "
                           "scale; check the data's value range" if "scale" in str(exc) else None) from None
        finally:
            os.chdir(cwd)
            logging.getLogger().setLevel(quiet)
        result = _unnamed(float_outputs(onnx.load(str(out))), given)
        result = toposort(fuse_residuals(result) if target == "tensorrt" else result)
    # opset 13 needs IR version 7 (and initializers no longer have to be graph inputs)
    result.ir_version = max(result.ir_version, 7)
    return result


def int8_dynamic(proto: onnx.ModelProto, *, exclude: tuple = ()) -> onnx.ModelProto:
    """Dynamic INT8 (`quantize_dynamic`): MatMul/Gemm/Gather weights int8, activations quantized
    at run time by ONNX Runtime (DynamicQuantizeMatMul, MatMulIntegerToFloat on its CPU
    provider); the word-embedding table is stored int8 too. No calibration data."""
    proto = _opset_13(proto)
    with tempfile.TemporaryDirectory(prefix="spa-quant-") as tmp:
        out = Path(tmp) / "int8.onnx"
        work = onnx.ModelProto()
        work.CopyFrom(proto)
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            quantize_dynamic(work, str(out), op_types_to_quantize=list(DYNAMIC_OPS), per_channel=False,
                             weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude))
        except Exception as exc:  # noqa: BLE001 - ORT's tooling fails in many ways; one line
            raise SpaError(f"dynamic INT8 quantization failed in onnxruntime.quantization: {ort_reason(exc)}") \
                from None
        finally:
            logging.getLogger().setLevel(quiet)
        result = toposort(onnx.load(str(out)))
    result.ir_version = max(result.ir_version, 7)
    return result


def dynamic_candidate(proto: onnx.ModelProto) -> bool:
    """Whether dynamic INT8 may beat static on ORT's CPU: MatMul/Gemm layers with constant weights
    and no convolution (a transformer; ConvInteger is slow)."""
    consts = {t.name for t in proto.graph.initializer}
    ops = {n.op_type for n in proto.graph.node}
    layers = [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
              and n.input[1] in consts]
    return bool(layers) and not ops & {"Conv", "ConvTranspose"}


def cpu_seconds(model, feeds: dict, runs: int = TIMED_RUNS) -> float:
    """Median CPU seconds of one run of `model` (a ModelProto or a path) on `feeds` in ONNX Runtime's
    CPU provider, one thread, after two untimed runs."""
    sess = session(model, threads=1)
    for _ in range(2):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.process_time()
        sess.run(None, feeds)
        times.append(time.process_time() - start)
    return float(np.median(times))


LAYER_MAX_ERR = 0.1  # a layer whose INT8 output is off by more than this (relative, on the data) falls back
SENSITIVITY_SAMPLES = 8  # calibration samples the per-layer errors are measured on


def layer_errors(float_proto: onnx.ModelProto, q_proto: onnx.ModelProto, feeds: dict) -> list[dict]:
    """How much each quantized layer alone loses: its output with its input activation and weight
    passed through their Q/DQ (the scales calibrated into `q_proto`), against its float output, on
    `feeds` (its float input captured from `float_proto`). [{node, op, output, rel_err}], worst first
    (`node`: its name, or the one spa gave it when it had none; `output`: its output tensor);
    layers ONNX Runtime cannot run alone are left out."""
    producer = {o: n for n in q_proto.graph.node for o in n.output}
    consts = {t.name: t for t in q_proto.graph.initializer}
    cases = []
    for layer in q_proto.graph.node:
        if layer.op_type not in LAYERS or not layer.name or len(layer.input) < 2:
            continue
        act, weight = producer.get(layer.input[0]), producer.get(layer.input[1])
        if act is None or weight is None or act.op_type != "DequantizeLinear" or weight.op_type != "DequantizeLinear":
            continue
        source = producer.get(act.input[0])
        if source is None or source.op_type != "QuantizeLinear" or weight.input[0] not in consts:
            continue
        cases.append((layer, source.input[0], act, weight))
    if not cases:
        return []
    captured = run_with_outputs(float_proto, sorted({c[1] for c in cases}), feeds)
    floats = {t.name: t for t in float_proto.graph.initializer}
    by_name = {n.name: n for n in float_proto.graph.node if n.name}
    value = lambda name: numpy_helper.to_array(consts[name]) if name in consts else None
    out = []
    for layer, x_name, act, weight in cases:
        original, x = by_name.get(layer.name), captured.get(x_name)
        if original is None or x is None or original.input[1] not in floats:
            continue
        x_hat = _fake_quant(x, value(act.input[1]), value(act.input[2]) if len(act.input) > 2 else None)
        try:
            want = _run_alone(original, x, numpy_helper.to_array(floats[original.input[1]]), floats)
            got = _run_alone(original, x_hat, _dequantized(weight, value), floats)
        except Exception:  # noqa: BLE001, S112 - a layer ORT cannot run alone (a shape it needs from elsewhere)
            continue
        err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))
        out.append({"node": layer.name, "op": layer.op_type, "output": original.output[0], "rel_err": err})
    return sorted(out, key=lambda e: -e["rel_err"])


def _dequantized(dq: onnx.NodeProto, value) -> np.ndarray:
    """The float weight a weight's DequantizeLinear gives (per-axis scale and zero point)."""
    q = value(dq.input[0]).astype(np.float32)
    scale = value(dq.input[1]).astype(np.float32)
    zero = value(dq.input[2]).astype(np.float32) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale)
    if scale.size > 1:
        shape = [1] * q.ndim
        shape[next((a.i for a in dq.attribute if a.name == "axis"), 1)] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q - zero) * scale).astype(np.float32)


def _fake_quant(x: np.ndarray, scale, zero) -> np.ndarray:
    zero = np.zeros((), np.int8) if zero is None else zero
    info = np.iinfo(zero.dtype)
    q = np.clip(np.round(x / scale) + zero.astype(np.float32), info.min, info.max)
    return ((q - zero.astype(np.float32)) * scale).astype(np.float32)


def _run_alone(layer: onnx.NodeProto, x: np.ndarray, w: np.ndarray, floats: dict) -> np.ndarray:
    """`layer` alone in ONNX Runtime on activation `x` and weight `w` (its other inputs as they are)."""
    node = onnx.NodeProto()
    node.CopyFrom(layer)
    node.input[0], node.input[1], node.output[0] = "x", "w", "y"
    del node.output[1:]
    inits = [numpy_helper.from_array(w, "w")] + [floats[n] for n in node.input[2:] if n in floats]
    graph = onnx.helper.make_graph([node], "layer", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                         None)],
                                   [onnx.ValueInfoProto(name="y")], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 7
    return run(model, {"x": x})["y"]


def weight_only(proto: onnx.ModelProto, nodes: set) -> onnx.ModelProto:
    """Weight-only INT8 for the float layers named in `nodes`: the weight stored int8 (symmetric,
    per output channel) behind a DequantizeLinear, the inputs of every node in `nodes` (the layers
    and the ops that feed them, feeding_ops) read in float (their Q/DQ bypassed): the file shrinks
    as much, the layer computes in float (the fallback for layers whose activations lose too much)."""
    consts = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:  # the float nodes read their float inputs again (not through Q/DQ)
        for slot, name in enumerate(node.input if node.name in nodes else ()):
            node.input[slot] = unquantized(producer, name) or name
    _drop_unread_qdq(proto)
    readers = collections.Counter(i for n in proto.graph.node for i in n.input)
    at = 0
    while at < len(proto.graph.node):
        node = proto.graph.node[at]
        at += 1
        if node.name not in nodes or node.op_type not in LAYERS or len(node.input) < 2:
            continue
        name = node.input[1]
        if name not in consts or readers.get(name, 0) != 1 or consts[name].data_type != onnx.TensorProto.FLOAT:
            continue
        w = numpy_helper.to_array(consts[name])
        axis = _out_axis(node, w.ndim)
        others = tuple(a for a in range(w.ndim) if a != axis)
        scale = (np.abs(w).max(axis=others) / 127.0).astype(np.float32)
        scale[scale == 0] = 1.0
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        proto.graph.initializer.remove(consts[name])
        proto.graph.initializer.extend([numpy_helper.from_array(q, f"{name}_int8"),
                                        numpy_helper.from_array(scale, f"{name}_scale"),
                                        numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_zero")])
        dq = onnx.helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero"], [name],
                                   name=f"{name}_DequantizeLinear", axis=axis)
        proto.graph.node.insert(at - 1, dq)
        at += 1
    return proto


def _out_axis(node: onnx.NodeProto, rank: int) -> int:
    """The weight axis of a layer's output channels: Conv 0, ConvTranspose 1, MatMul the last,
    Gemm 0 with transB else 1."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return rank - 1


PASS_THROUGH = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
                "MaxPool", "AveragePool", "GlobalAveragePool", "Resize", "Pad", "Slice", "Split", "Identity")


def feeding_ops(proto: onnx.ModelProto, layers: set) -> set:
    """The names of the single-input ops (activations, reshapes, pooling) that feed the named
    layers from the previous layer: their Q/DQ would still coarsen a float fallback's input."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    found = set()
    for node in proto.graph.node:
        if node.name not in layers or not node.input:
            continue
        source = producer.get(node.input[0])
        while source is not None and source.op_type in PASS_THROUGH and source.name and source.input:
            found.add(source.name)
            source = producer.get(source.input[0])
    return found


def _named(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, set]:
    """(`proto`, or a copy whose unnamed nodes got names, the names given): layers are excluded
    and reported by name; the result gets its unnamed nodes back (`_unnamed`)."""
    if all(n.name for n in proto.graph.node):
        return proto, set()
    named = onnx.ModelProto()
    named.CopyFrom(proto)
    taken, given = {n.name for n in named.graph.node}, set()
    for i, node in enumerate(named.graph.node):
        if not node.name:
            node.name = next(f"{node.op_type}_{k}" for k in itertools.count(i) if f"{node.op_type}_{k}" not in taken)
            taken.add(node.name)
            given.add(node.name)
    return named, given


def _unnamed(proto: onnx.ModelProto, given: set) -> onnx.ModelProto:
    """The names `_named` gave taken off again: the model keeps the names it came with."""
    for node in proto.graph.node:
        if node.name in given:
            node.ClearField("name")
    return proto


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise UsageError(f"unknown target '{target}'", f"choose one of: {', '.join(TARGETS)}")


def _placement(target: str, proto: onnx.ModelProto) -> tuple[list, QuantType, dict]:
    """(op types to quantize, activation type, quantize_static's extra options) for `target`."""
    if target == "tensorrt":
        return list(QUANTIZED_OPS), QuantType.QInt8, {
            "ActivationSymmetric": True, "QuantizeBias": False,
            "OpTypesToExcludeOutputQuantization": list(NO_OUTPUT_QDQ)}
    present = {n.op_type for n in proto.graph.node}
    ops = sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) & present - set(ORT_FLOAT_OPS))
    if target == "ort-cuda":
        return ops, QuantType.QInt8, {"ActivationSymmetric": True}
    return ops, QuantType.QUInt8, {"ActivationSymmetric": False}


def fused_kernels(model) -> dict:
    """{op: count} of the integer kernels in the graph ONNX Runtime's CPU provider runs for `model`
    (a ModelProto or a path) after its optimizer (extended level, saved to a temp file and read back)."""
    with tempfile.TemporaryDirectory(prefix="spa-fused-") as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        source = str(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
        ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath, load_external_data=False).graph
    counts = {}
    for node in graph.node:
        if node.op_type in FUSED_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _opset_13(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Per-channel QDQ needs opset 13: older models are converted first (or refused)."""
    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    if version >= 13:
        return proto
    try:
        return version_converter.convert_version(proto, 13)
    except Exception as exc:  # noqa: BLE001 - the converter's assertion messages, as one line
        raise SpaError(f"cannot quantize an opset {version} model: converting it to opset 13 (needed for "
                       f"per-channel Q/DQ) failed ({first_line(exc)})", "export the model at opset 13 or later") \
            from None


COSINE_FLOOR = 0.99  # agreement (cosine of the outputs, on the data) below which the elementwise ops go float
ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Concat", "Sum")
TAIL_OPS = ("Softmax", "LogSoftmax") + PASS_THROUGH


def tail_ops(proto: onnx.ModelProto) -> set:
    """Names of the nodes between the last layers and the graph outputs (softmax, reshapes,
    activations): kept float. An 8-bit softmax over 1000 classes of about 0.001 each is zeros."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    found, stack = set(), [producer.get(o.name) for o in proto.graph.output]
    while stack:
        node = stack.pop()
        if node is None or node.op_type not in TAIL_OPS or not node.name or node.name in found:
            continue
        found.add(node.name)
        stack.extend(producer.get(i) for i in node.input[:1])
    return found


def output_cosine(reference, candidate, feeds: dict) -> float:
    """The lowest cosine similarity over the float outputs of `candidate` against `reference`
    (ModelProtos or files)."""
    want, got = run(reference, feeds), run(candidate, feeds)
    worst = 1.0
    for name, a in want.items():
        b = got[name]
        if np.issubdtype(np.asarray(a).dtype, np.floating):
            a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
            worst = min(worst, float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
    return worst


def float_outputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Graph outputs computed in float: a Q/DQ pair right before an output goes (an Identity of the
    float tensor takes its name). Quantizing what the model hands back gains nothing, and ruins
    probabilities: a softmax over 1000 classes, each near 0.001, is all zeros in steps of 1/255."""
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        float_name = unquantized(producer, node.output[0]) if node.output and node.output[0] in outputs else None
        if float_name in producer:
            node.CopyFrom(onnx.helper.make_node("Identity", [float_name], [node.output[0]],
                                                name=f"{node.output[0]}_float"))
    return _drop_unread_qdq(proto)


def unquantized(producer: dict, name: str) -> str | None:
    """The float tensor that `name` is a QuantizeLinear -> DequantizeLinear copy of, else None."""
    dq = producer.get(name)
    q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None


def fuse_residuals(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Take the Q/DQ pair off one layer-fed input of every residual Add (ORT quantizes both):
    TensorRT fuses the Add into that layer and reads the other, quantized, input as the
    residual. Q/DQ pairs left without readers are removed."""
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type != "Add":
            continue
        for i, name in enumerate(node.input):
            float_name = unquantized(producer, name)
            src = producer.get(float_name) if float_name is not None else None
            if src is not None and src.op_type in LAYERS:
                node.input[i] = float_name  # the layer's float output, straight into the Add
                break
    return _drop_unread_qdq(proto)


def _drop_unread_qdq(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Remove Q/DQ nodes nobody reads any more, and the scales and zero points only they read."""
    graph = proto.graph
    while True:
        read = reads(graph) | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    # and the scales/zero points they read (old IR versions also list initializers as inputs)
    read = reads(graph) | {o.name for o in graph.output}
    unused = {t.name for t in graph.initializer if t.name not in read}
    keep = [t for t in graph.initializer if t.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inputs = [i for i in graph.input if i.name not in unused]
    del graph.input[:]
    graph.input.extend(inputs)
    return proto


RECURRENT = ("LSTM", "GRU", "RNN")  # ONNX Runtime's float16 recurrent kernels crash on some models: float32


def fp16(proto: onnx.ModelProto, keep: tuple = FP32_OPS + RECURRENT) -> onnx.ModelProto:
    """`proto` in float16, float32 inputs/outputs, the `keep` ops and every op outside the default
    domain (ai.onnx.ml, contrib) in float32. The result must pass the ONNX checker and load in
    ONNX Runtime, else a SpaError says why (onnxruntime's converter fails on some graphs)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    unlist_weights(model)
    foreign = []
    for i, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx"):
            node.name = node.name or f"spa_fp32_{i}"  # the converter blocks nodes by name
            foreign.append(node.name)
    try:
        out = convert_float_to_float16(model, keep_io_types=True, node_block_list=foreign,
                                       op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(keep))
        out = toposort(out)
    except Exception as exc:  # noqa: BLE001
        raise SpaError(f"FP16 conversion failed: {first_line(exc)}") from None
    try:
        onnx.checker.check_model(out)
        why = load_error_isolated(out)  # in a child: ONNX Runtime 1.32's NCHWc optimiser crashes on one model
    except Exception as exc:  # noqa: BLE001
        why = first_line(exc)
    if why:
        raise SpaError(f"the FP16 model (from onnxruntime.transformers.float16) fails its checks: {why}",
                       "keep this model in float32")
    return out


def unlist_weights(proto: onnx.ModelProto) -> int:
    """Remove the initializers listed as graph inputs (old IR-3 exports list every weight there)
    from the inputs, in place; returns how many. The converter keeps graph inputs in float32, so
    listed weights would stay float32 behind a Cast: converted nothing. They become constants:
    ONNX Runtime never lets a run override them before IR version 4 (raised to 4 here, the
    first that allows weights outside the inputs), and from it a run that fed its own weights
    is not what a float16 model is for."""
    inits = {t.name for t in proto.graph.initializer}
    listed = [i for i in proto.graph.input if i.name in inits]
    for i in listed:
        proto.graph.input.remove(i)
    if listed:
        proto.ir_version = max(proto.ir_version, 4)
    return len(listed)


def require_converted(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """SpaError when the FP16 conversion changed nothing: no float16 weight and no op but a Cast
    reads a float16 tensor (the converter may wrap a float32-only graph in Casts to and fro)."""
    half = onnx.TensorProto.FLOAT16
    g = after.graph
    halves = {v.name for v in list(g.value_info) + list(g.input) + list(g.output)
              if v.type.tensor_type.elem_type == half}
    halves |= {n.output[0] for n in g.node if n.op_type == "Cast" and any(a.name == "to" and a.i == half
                                                                           for a in n.attribute)}
    if not any(t.data_type == half for t in g.initializer) and not any(
            n.op_type != "Cast" and halves & set(n.input) for n in g.node):
        floats = sum(t.data_type == onnx.TensorProto.FLOAT for t in before.graph.initializer)
        ops = sorted({n.op_type for n in before.graph.node})[:6]
        why = (f"its {floats} float32 weight(s) only feed ops kept in float32" if floats
               else f"it has no float32 weight, and its ops ({', '.join(ops)}) stay in float32")
        raise SpaError(f"fp16: nothing converted: {why}; nothing written",
                       "FP16 keeps normalizations, reductions, exp/log/pow/sqrt and non-float ops in float32; "
                       "keep this model as it is")


def toposort(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes in an order where every input is made before it is read, in subgraphs too (the
    converter appends its edge Casts at the end; the quantizer can misplace nodes in If
    bodies). Stable: nodes keep their relative order where they can."""
    _sort_graph(proto.graph, set())
    return proto


def _sort_graph(graph, outer: set) -> None:
    ready = set(outer) | {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    every = ready | {o for n in graph.node for o in n.output}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            # an input nobody in this graph makes comes from further out: not waited for
            if all(i in ready or i not in every for i in n.input) and _subgraph_reads_ready(n, ready, every):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # a cycle: keep the remainder as it is
            ordered += rest
            break
        pending = rest
    for n in ordered:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _sort_graph(a.g, every)
    nodes = [onnx.NodeProto() for _ in ordered]
    for dst, src in zip(nodes, ordered):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(nodes)


def _subgraph_reads_ready(node, ready: set, every: set) -> bool:
    names = set()
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            names |= reads(a.g)
    return all(r in ready or r not in every for r in names)


def coverage(proto: onnx.ModelProto) -> dict:
    """INT8 coverage: Conv/ConvTranspose/Gemm/MatMul layers whose data input and weight both come
    from DequantizeLinear, plus integer layers (dynamic quantization's MatMulInteger, QOperator
    ops), out of both; and the float precision of the rest."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    layers = [n for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]

    def dq(name):
        node = producer.get(name)
        return node is not None and node.op_type == "DequantizeLinear"

    integer = sum(1 for n in proto.graph.node if n.op_type in INTEGER_OPS)
    quantized = len([n for n in layers if len(n.input) > 1 and dq(n.input[0]) and dq(n.input[1])]) + integer
    qdq = sum(1 for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    fp16_inits = sum(1 for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    total = len(layers) + integer
    return {"layers": total, "quantized": quantized, "fraction_quantized": quantized / total if total else None,
            "qdq_nodes": qdq, "float16_initializers": fp16_inits, "integer_layers": integer}


class Int8Pass(Pass):
    """Model -> its INT8 form placed for `target`: static QDQ calibrated on `data` ({input: [N, ...]}),
    or (ort-cpu) dynamic, or with mode="auto" whichever of the two runs faster on this machine's
    ONNX Runtime CPU provider where dynamic is a candidate (dynamic_candidate: a transformer)."""

    name = "int8"

    def __init__(self, data: dict, method: str = "minmax", per_channel: bool = True, max_samples: int = 256,
                 target: str = "ort-cpu", mode: str = "auto"):
        check_target(target)
        if mode not in MODES:
            raise UsageError(f"unknown INT8 mode '{mode}'", f"choose one of: {', '.join(MODES)}")
        if mode == "dynamic" and target != "ort-cpu":
            raise UsageError(f"dynamic INT8 is for target ort-cpu, not {target}",
                             "TensorRT and ORT's CUDA provider run static Q/DQ: drop the dynamic mode")
        self.data, self.method, self.per_channel, self.max_samples = data, method, per_channel, max_samples
        self.target, self.mode = target, mode

    def requires(self, model: Model) -> None:
        if not any(n.op_type in QUANTIZED_OPS for n in model.proto.graph.node):
            raise SpaError(f"int8: nothing to quantize: the model has no {', '.join(QUANTIZED_OPS)} node "
                           "(the ops INT8 QDQ is placed on)", "keep this model in float32, or try fp16")

    def rewrite(self, model: Model) -> tuple[onnx.ModelProto, dict]:
        stats = {"target": self.target}
        if self.mode == "dynamic":
            proto, stats["mode"] = int8_dynamic(model.proto), "dynamic"
        else:
            proto, measured = self._static(model)
            stats.update(mode="static", **measured)
            if self.mode == "auto" and self.target == "ort-cpu" and dynamic_candidate(model.proto):
                proto, stats = self._faster(model, proto, stats)
        if stats["mode"] != "static":  # what was measured on the static model does not describe the result
            stats = {k: v for k, v in stats.items() if k not in ("elementwise", "layers", "fallback")}
        cov = coverage(proto)
        if not cov["qdq_nodes"] and not cov["integer_layers"] and stats["mode"] == "static":
            raise SpaError("int8: nothing quantized: onnxruntime.quantization placed no QDQ pair; nothing written",
                           "keep this model in float32, or try fp16")
        if self.target == "ort-cpu":
            stats["speed"] = self._speed(model, proto, stats)
        return proto, {"coverage": cov, **stats, "fused_kernels": _fused_or_none(proto)}

    def _static(self, model: Model) -> tuple[onnx.ModelProto, dict]:
        """Static INT8 with the model's tail (softmax, reshapes before an output) kept float; for
        ort-cpu, where the result agrees less than COSINE_FLOOR with the input on the data, again
        with the elementwise ops (Add, Mul, Concat: one scale for channels of unlike ranges) in
        float, keeping the closer. Then each layer's own error measured on the data
        (layer_errors): layers that lose more than LAYER_MAX_ERR are quantized again as
        weight-only INT8 (float math). Returns the model and {elementwise, layers, fallback}."""
        base, given = _named(model.proto)
        fixed = fixed_batch_size(base)
        feeds = {k: np.asarray(v)[:fixed or SENSITIVITY_SAMPLES] if np.ndim(v) else np.asarray(v)
                 for k, v in self._inputs(model).items()}
        rows = {len(v) for v in feeds.values() if np.ndim(v)}
        measurable = bool(feeds) and (fixed is None or rows == {fixed})
        keep, elementwise = tail_ops(base), None
        proto = self._int8(base, keep)
        if self.target == "ort-cpu" and measurable:
            proto, keep, elementwise = self._closer(base, proto, keep, feeds)
        try:
            errors = layer_errors(base, proto, feeds) if measurable else []
        except Exception:  # noqa: BLE001 - the measurement is a refinement: without it, all layers stay INT8
            errors = []
        worst = {e["node"] for e in errors if e["rel_err"] > LAYER_MAX_ERR}
        if worst:
            floats = worst | feeding_ops(base, worst)
            proto = weight_only(self._int8(base, keep | floats), floats)
        layers = [{**e, "kept": "weight-only int8" if e["node"] in worst else "int8"} for e in errors]
        return _unnamed(proto, given), {"elementwise": elementwise, "layers": layers, "fallback": len(worst)}

    def _int8(self, base: onnx.ModelProto, floats: set) -> onnx.ModelProto:
        return int8(base, self.data, self.method, per_channel=self.per_channel, max_samples=self.max_samples,
                    target=self.target, exclude=tuple(sorted(floats)))

    def _closer(self, base, proto, keep: set, feeds: dict) -> tuple[onnx.ModelProto, set, dict | None]:
        """(model, float nodes, {"int8": cosine, "float"?: cosine}): `proto`, or the one with its
        elementwise ops in float where that agrees better with `base` on `feeds` (tried where the
        first agrees less than COSINE_FLOOR)."""
        try:
            first = output_cosine(base, proto, feeds)
            if first >= COSINE_FLOOR:
                return proto, keep, {"int8": first}
            floats = keep | {n.name for n in base.graph.node if n.op_type in ELEMENTWISE and n.name}
            other = self._int8(base, floats)
            second = output_cosine(base, other, feeds)
        except Exception:  # noqa: BLE001 - not measured: the first placement, checked as usual
            return proto, keep, None
        cosines = {"int8": first, "float": second}
        return (other, floats, cosines) if second > first else (proto, keep, cosines)

    def _feeds(self, model: Model) -> dict:
        """One sample to time on: the first of the data, else random inputs (dynamic mode)."""
        data = self._inputs(model)
        if not data:
            return random_feeds(model.proto)
        return next(iter(model_batches(data, 1, fixed=fixed_batch_size(model.proto), max_samples=1)))

    def _inputs(self, model: Model) -> dict:
        """The data's arrays of the model's inputs (calibration files may hold labels too)."""
        inputs = set(model.input_names)
        return {k: v for k, v in self.data.items() if k in inputs}

    def _faster(self, model: Model, static: onnx.ModelProto, stats: dict) -> tuple[onnx.ModelProto, dict]:
        """Static or dynamic, whichever takes less CPU time on one calibration batch (one thread)."""
        dynamic = int8_dynamic(model.proto)
        feeds = self._feeds(model)
        try:
            times = {"static": cpu_seconds(static, feeds), "dynamic": cpu_seconds(dynamic, feeds)}
        except Exception:  # noqa: BLE001 - one of them does not run: the static one, checked as usual
            return static, stats
        mode = min(times, key=times.get)
        return (static if mode == "static" else dynamic), {**stats, "mode": mode, "cpu_s_per_run": times}

    def _speed(self, model: Model, proto: onnx.ModelProto, stats: dict) -> dict | None:
        """{"float_cpu_s", "int8_cpu_s", "speedup"}: one sample on ONNX Runtime's CPU provider, one
        thread, the input model against the result (None over 2 GB or when either fails to run):
        INT8 is not faster everywhere (small or depthwise layers spend more in Q/DQ than they save)."""
        if weight_bytes(model.proto) >= TWO_GB or model.weights_at:
            return None
        feeds = self._feeds(model)
        try:
            fp = cpu_seconds(model.proto, feeds)
            q = (stats.get("cpu_s_per_run") or {}).get(stats["mode"]) or cpu_seconds(proto, feeds)
        except Exception:  # noqa: BLE001 - the output check that follows says why a model does not run
            return None
        return {"float_cpu_s": fp, "int8_cpu_s": q, "speedup": fp / q if q else None}


def _fused_or_none(proto: onnx.ModelProto) -> dict | None:
    """fused_kernels of a model that fits in one protobuf message (None above 2 GB, or when ORT
    cannot build the optimized session: the output check says why)."""
    if weight_bytes(proto) >= TWO_GB:
        return None
    try:
        return fused_kernels(proto)
    except Exception:  # noqa: BLE001 - the output check that follows reports ORT's own reason
        return None


class Fp16Pass(Pass):
    """Model -> float16 weights and math, float32 at the edges and in the sensitive ops."""

    name = "fp16"

    def rewrite(self, model: Model) -> tuple[onnx.ModelProto, dict]:
        proto = fp16(model.proto)
        require_converted(model.proto, proto)
        listed = {i.name for i in model.proto.graph.input} & {t.name for t in model.proto.graph.initializer}
        return proto, {"coverage": {**coverage(proto), "weights_unlisted_from_inputs": len(listed)}}
