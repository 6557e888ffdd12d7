"""INT8 (QDQ) and FP16 as graph passes, on ONNX Runtime's own tooling.

INT8, placed the way TensorRT's explicit quantization expects it (`int8`):

- ONNX Runtime's `quantize_static` in QDQ format, calibrated on the given data
  (MinMax, Entropy or Percentile);
- signed int8, symmetric (zero point 0) for activations and weights, weights per output
  channel (TensorRT needs symmetric scales and fuses per-channel weight scales into kernels);
- Q/DQ on the *inputs* of Conv/ConvTranspose/Gemm/MatMul and not on their outputs
  (`OpTypesToExcludeOutputQuantization`): TensorRT fuses DQ -> Conv -> (bias, activation)
  -> Q of the next layer itself, and a Q/DQ pair after a conv would block that;
- both inputs of residual `Add`s quantized, so the shortcut's Q/DQ fuses into the conv
  that adds it; biases stay float (TensorRT folds them).

FP16 (`fp16`): ONNX Runtime's `convert_float_to_float16` with the graph's inputs and outputs
kept float32 (Cast at the edges) and numerically sensitive ops kept in float32
(normalizations, reductions, exp/log/pow/sqrt), since TensorRT 10.12+ builds strongly typed
networks from the precisions written in the ONNX.

The pass forms (passes/base.Pass): `Int8Pass` and `Fp16Pass`, rewrite = the conversion above,
ensures = the base promises (ONNX checker, ONNX Runtime on random inputs like the input);
stats = {"coverage": coverage(result)}.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import version_converter
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
from spa.backends.ort import load_error_isolated
from spa.passes.base import Pass

from spa.core.data import fixed_batch_size, model_batches
from spa.core.errors import SpaError, first_line
from spa.core.model import Model
from spa.core.runtime import ort_reason

METHODS = ("minmax", "entropy", "percentile")
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
         max_samples: int = 256, batch: int = 32, percentile: float = 99.999) -> onnx.ModelProto:
    """The QDQ INT8 model of `proto`, calibrated on `feeds` ({input: [N, ...]})."""
    if method not in METHODS:
        raise SpaError(f"unknown calibration method '{method}'", f"choose one of: {', '.join(METHODS)}")
    inputs = {i.name for i in proto.graph.input} - {t.name for t in proto.graph.initializer}
    missing = sorted(inputs - set(feeds))
    if missing:
        raise SpaError(f"calibration data has no array for model input(s) {missing} (it has {sorted(feeds)})")
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer):
        raise SpaError("cannot quantize a float16 model to INT8", "quantize the float32 model")
    feeds = {k: (np.asarray(v)[:max_samples] if np.ndim(v) else np.asarray(v)) for k, v in feeds.items() if k in inputs}
    fixed = fixed_batch_size(proto)
    proto = _opset_13(proto)
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
             "OpTypesToExcludeOutputQuantization": list(NO_OUTPUT_QDQ), "CalibPercentile": percentile,
             "CalibMovingAverage": method == "minmax"}
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
                                op_types_to_quantize=list(QUANTIZED_OPS), per_channel=per_channel,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
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
        result = toposort(fuse_residuals(onnx.load(str(out))))
    # opset 13 needs IR version 7 (and initializers no longer have to be graph inputs)
    result.ir_version = max(result.ir_version, 7)
    return result


LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _reads(graph) -> set:
    """Every tensor name a node reads, subgraphs (If/Loop bodies reading outer values) included."""
    out = set()
    for n in graph.node:
        out.update(n.input)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out |= _reads(a.g)
            for g in a.graphs:
                out |= _reads(g)
    return out


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
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            src = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
            if src is not None and src.op_type in LAYERS:
                node.input[i] = q.input[0]  # the layer's float output, straight into the Add
                break
    # drop Q/DQ nodes nobody reads any more
    while True:
        read = _reads(graph) | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    # and the scales/zero points they read (old IR versions also list initializers as inputs)
    read = _reads(graph) | {o.name for o in graph.output}
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
    reads = set()
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            reads |= _reads(a.g)
    return all(r in ready or r not in every for r in reads)


def coverage(proto: onnx.ModelProto) -> dict:
    """QDQ coverage: Conv/ConvTranspose/Gemm/MatMul layers whose data input and weight both come
    from DequantizeLinear, and the float precision of the rest."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    layers = [n for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]

    def dq(name):
        node = producer.get(name)
        return node is not None and node.op_type == "DequantizeLinear"

    quantized = [n for n in layers if len(n.input) > 1 and dq(n.input[0]) and dq(n.input[1])]
    qdq = sum(1 for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    fp16_inits = sum(1 for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    return {"layers": len(layers), "quantized": len(quantized),
            "fraction_quantized": len(quantized) / len(layers) if layers else None,
            "qdq_nodes": qdq, "float16_initializers": fp16_inits,
            "integer_layers": sum(1 for n in proto.graph.node if n.op_type in INTEGER_OPS)}


class Int8Pass(Pass):
    """Model -> its QDQ INT8 form, calibrated on `data` ({input: [N, ...]})."""

    name = "int8"

    def __init__(self, data: dict, method: str = "minmax", per_channel: bool = True, max_samples: int = 256):
        self.data, self.method, self.per_channel, self.max_samples = data, method, per_channel, max_samples

    def requires(self, model: Model) -> None:
        if not any(n.op_type in QUANTIZED_OPS for n in model.proto.graph.node):
            raise SpaError(f"int8: nothing to quantize: the model has no {', '.join(QUANTIZED_OPS)} node "
                           "(the ops INT8 QDQ is placed on)", "keep this model in float32, or try fp16")

    def rewrite(self, model: Model) -> tuple[onnx.ModelProto, dict]:
        proto = int8(model.proto, self.data, self.method, per_channel=self.per_channel, max_samples=self.max_samples)
        cov = coverage(proto)
        if not cov["qdq_nodes"]:
            raise SpaError("int8: nothing quantized: onnxruntime.quantization placed no QDQ pair; nothing written",
                           "keep this model in float32, or try fp16")
        return proto, {"coverage": cov}


class Fp16Pass(Pass):
    """Model -> float16 weights and math, float32 at the edges and in the sensitive ops."""

    name = "fp16"

    def rewrite(self, model: Model) -> tuple[onnx.ModelProto, dict]:
        proto = fp16(model.proto)
        require_converted(model.proto, proto)
        listed = {i.name for i in model.proto.graph.input} & {t.name for t in model.proto.graph.initializer}
        return proto, {"coverage": {**coverage(proto), "weights_unlisted_from_inputs": len(listed)}}
