"""The parts of the TensorRT backend that need no TensorRT: `--shapes` specs and optimization
profiles, the precision a strongly typed network will run in, and what the engine inspector and the
builder's log say about 2:4 sparse kernels (eligible is not picked). Unit-tested without a GPU;
backends/trt.py builds and runs engines with them.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx

from spa.core.errors import SpaError, UsageError, first_line
from spa.core.shapes import parse_dims

SHAPES_SYNTAX = "NAME:MINxDIMS/OPTxDIMS/MAXxDIMS[,NAME2:...], e.g. input:1x3x224x224/8x3x224x224/32x3x224x224"
SPARSE_NOTE = ("TensorRT may use a 2:4 sparse kernel only for a layer whose weights are 2:4 sparse (eligible), and "
               "picks it only where it times faster than the dense kernels, so eligible but not picked is normal "
               "(small layers, memory-bound shapes); the build log's '(Sparsity) Layers eligible for sparse math' "
               "line lists the eligible ones")


# -- --shapes and optimization profiles (pure) -------------------------------------------------

def parse_shapes(text: str) -> dict:
    """`name:1x3x224x224/8x3x224x224/32x3x224x224[,name2:...]` -> {name: (min, opt, max)}, each a
    tuple of ints; one shape means min = opt = max. The last ':' splits, so tf2onnx names such
    as 'input:0' work."""
    if not text or not text.strip():
        raise _shapes_error("shapes= is empty")
    shapes = {}
    for item in text.split(","):
        name, sep, spec = item.strip().rpartition(":")
        if not sep or not name.strip() or not spec.strip():
            raise _shapes_error(f"bad shapes= entry '{item.strip()}': expected NAME:SHAPE")
        if name.strip() in shapes:
            raise _shapes_error(f"shapes= names input '{name.strip()}' twice")
        shapes[name.strip()] = _shape_range(name.strip(), spec.strip())
    return shapes


def _shape_range(name: str, spec: str) -> tuple:
    parts = [_dims(name, p) for p in spec.split("/")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise _shapes_error(f"shapes= for '{name}': give one shape or MIN/OPT/MAX, not {len(parts)} shapes")
    lo, opt, hi = parts
    if not len(lo) == len(opt) == len(hi):
        raise _shapes_error(f"shapes= for '{name}': MIN, OPT and MAX have different ranks")
    if any(not a <= b <= c for a, b, c in zip(lo, opt, hi)):
        raise _shapes_error(f"shapes= for '{name}': need MIN <= OPT <= MAX on every axis, got {spec}")
    return lo, opt, hi


def _dims(name: str, text: str) -> tuple:
    """One shape, parsed as every --shape is (spa.core.shapes.parse_dims), in --shapes' own words."""
    try:
        return parse_dims(text, f"shapes= for '{name}':")
    except UsageError as exc:
        raise _shapes_error(exc.message) from None


def _shapes_error(message: str) -> SpaError:
    return SpaError(message, f"write shapes={SHAPES_SYNTAX} (one shape: MIN=OPT=MAX)")


def onnx_inputs(proto: onnx.ModelProto) -> dict:
    """{input name: dims} of the real graph inputs, -1 for a dynamic axis (as TensorRT shows it)."""
    inits = {i.name for i in proto.graph.initializer}
    return {vi.name: [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                      for d in vi.type.tensor_type.shape.dim]
            for vi in proto.graph.input if vi.name not in inits}


def profile_shapes(inputs: dict, given: dict, batch: int = 1) -> tuple[dict, list]:
    """The optimization profile: {input: (min, opt, max)} for every input with a dynamic axis, from
    `given` (parse_shapes); an input whose only dynamic axis is the first (the batch) defaults to
    min=1, opt=max=`batch`. Returns (profile, notes)."""
    unknown = sorted(set(given) - set(inputs))
    if unknown:
        raise SpaError(f"shapes= names '{unknown[0]}', which is not an input of the model",
                       f"the inputs are: {', '.join(inputs)}")
    profile, notes = {}, []
    for name, dims in inputs.items():
        dynamic = [k for k, d in enumerate(dims) if d < 0]
        if name in given:
            profile[name] = _checked_range(name, dims, given[name])
        elif dynamic == [0]:
            rest = tuple(dims[1:])
            profile[name] = ((1, *rest), (batch, *rest), (batch, *rest))
            notes.append(f"input '{name}': dynamic batch axis built for 1..{batch} (--shapes sets another range)")
        elif dynamic:
            raise SpaError(f"input '{name}' has dynamic axes ({_fmt(dims)}): TensorRT needs a shape range for it",
                           f"pass shapes={name}:{_example(dims)} (MIN/OPT/MAX)")
    return profile, notes


def _checked_range(name: str, dims: list, rng: tuple) -> tuple:
    for shape in rng:
        if len(shape) != len(dims):
            raise SpaError(f"shapes= for '{name}': rank {len(shape)}, but the input has rank {len(dims)} "
                           f"({_fmt(dims)})", f"write {len(dims)} dims, e.g. {name}:{_example(dims)}")
        for k, (d, s) in enumerate(zip(dims, shape)):
            if d >= 0 and s != d:
                raise SpaError(f"shapes= for '{name}': axis {k} is fixed to {d} in the model, got {s}",
                               f"keep the fixed axes: {name}:{_example(dims)}")
    return tuple(tuple(s) for s in rng)


def _fmt(dims) -> str:
    return "x".join(str(d) if d >= 0 else "?" for d in dims)


def _example(dims: list) -> str:
    return "/".join("x".join(str(d) if d >= 0 else str(v) for d in dims) for v in (1, 8, 32))


# -- precision (pure) --------------------------------------------------------------------------

FLOAT_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.BFLOAT16: "bfloat16"}
WANTED = {"fp16": "float16", "bf16": "bfloat16"}


def model_float_types(proto: onnx.ModelProto) -> set:
    """Float types the model computes in: its weights' (more than one element) and Cast targets."""
    types = {FLOAT_TYPES[t.data_type] for t in proto.graph.initializer
             if t.data_type in FLOAT_TYPES and int(np.prod(t.dims)) > 1}
    for node in proto.graph.node:
        if node.op_type == "Cast":
            types |= {FLOAT_TYPES[a.i] for a in node.attribute if a.name == "to" and a.i in FLOAT_TYPES}
    return types


def check_precision(proto: onnx.ModelProto, precision: str, strongly_typed: bool = True) -> str:
    """What will decide the layers' types; an error where fp16/bf16 is asked of a model that does
    not compute in it and the network is strongly typed (no builder flag can change it)."""
    want = WANTED.get(precision)
    if not strongly_typed:
        return f"{precision} (builder flag, weakly typed)" if want else "fp32 (weakly typed)"
    have = model_float_types(proto)
    if want is None or want in have:
        return f"model types ({', '.join(sorted(have)) or 'no float weights'}; strongly typed)"
    convert = ("convert it first with `spa quantize MODEL --fp16 -o MODEL.fp16.onnx` (or --calib DATA.npz --target tensorrt for Q/DQ INT8) "
               "and build that") if precision == "fp16" else \
        "convert it to bfloat16 first (e.g. NVIDIA ModelOpt AutoCast; spa quantize has --fp16 and INT8 --target tensorrt)"
    raise SpaError(f"--{precision} needs a model that computes in {want}: TensorRT's strongly typed networks run "
                   f"every layer in the ONNX types, and this model has {', '.join(sorted(have)) or 'no float'} "
                   f"weights", convert)


# -- the engine inspector's JSON (pure) --------------------------------------------------------
#
# Shape, from TensorRT's developer guide ("Engine Inspector", a DETAILED layer example) and the
# TensorRT engine explorer's parser (NVIDIA/TensorRT tools/experimental/trt-engine-explorer/trex/
# parser.py, which reads graph['Layers'] and graph['Bindings']):
#   {"Layers": [{"Name": "conv1 + relu1", "LayerType": "CaskConvolution",
#                "Inputs": [{"Name", "Dimensions", "Format/Datatype"}], "Outputs": [...],
#                "ParameterType": "Convolution", ..., "Metadata": "[ONNX Layer: /conv1/Conv]\x1e...",
#                "TacticName": "sm80_xmma_fprop_implicit_gemm_...", "TacticValue": "0x..."}, ...],
#    "Bindings": ["input", "output"]}
# TensorRT 11 replaced "Bindings" with "I/O Tensors" (objects) and split "Format/Datatype" into
# "Format" and "DataType" (TensorRT 10.x -> 11.x migration guide, IEngineInspector JSON output).
# Without ProfilingVerbosity.DETAILED, "Layers" holds names (strings) only.

def _inspector_doc(info) -> dict:
    if isinstance(info, (str, bytes)):
        try:
            info = json.loads(info)
        except ValueError as exc:
            raise SpaError(f"cannot read the TensorRT engine inspector's JSON: {first_line(exc)}") from None
    if not isinstance(info, dict):
        raise SpaError("cannot read the TensorRT engine inspector's JSON: not an object with 'Layers'")
    return info


def sparse_layers(info, eligible: list | None = None) -> dict:
    """Which engine layers run a sparse kernel: TensorRT names its 2:4 sparse kernels with 'sparse'
    in the tactic name (e.g. sm80_xmma_fprop_sparse_conv_...). `info`: the inspector's JSON (str or
    dict); `eligible`: layer names from the build log (sparsity_log), when known."""
    layers = _inspector_doc(info).get("Layers") or []
    detailed = [layer for layer in layers if isinstance(layer, dict)]
    picked = [layer for layer in detailed if "sparse" in str(layer.get("TacticName", "")).lower()]
    doc = {"layers": len(layers), "sparse": [str(layer.get("Name", "?")) for layer in picked],
           "onnx_nodes": sorted({n for layer in picked for n in _onnx_nodes(layer)}), "eligible_note": SPARSE_NOTE}
    if layers and not detailed:
        doc["eligible_note"] = ("the engine was built without ProfilingVerbosity.DETAILED, so the inspector lists "
                                "layer names only and sparse kernels cannot be seen; rebuild it with spa build")
    if eligible is not None:
        doc["eligible"] = list(eligible)
    return doc


def _onnx_nodes(layer: dict) -> list:
    return re.findall(r"\[ONNX Layer: ([^\]]+)\]", str(layer.get("Metadata", "")))


SPARSITY_LOG = {"eligible": r"\(Sparsity\) Layers eligible for sparse math:(.*)",
                "picked": r"\(Sparsity\) TRT inference plan picked sparse implementation for layers:(.*)"}


def sparsity_log(lines: list) -> dict:
    """The builder's two '(Sparsity)' INFO lines (TensorRT developer guide, "Structured Sparsity")
    -> {"eligible": [names] | None, "picked": [names] | None}; None where the line was not logged."""
    found = {key: None for key in SPARSITY_LOG}
    for line in lines:
        for key, pattern in SPARSITY_LOG.items():
            m = re.search(pattern, line)
            if m:
                found[key] = [n.strip() for n in m.group(1).split(", ") if n.strip()]
    return found


TYPE_WORDS = (("fp8", "float8"), ("bf16", "bfloat16"), ("bfloat", "bfloat16"), ("half", "float16"),
              ("fp16", "float16"), ("int8", "int8"), ("int32", "int32"), ("int64", "int64"), ("bool", "bool"),
              ("fp32", "float32"), ("float", "float32"))


def layer_types(info) -> dict:
    """{type: layers} of the engine layers' first output, read from the inspector's DataType
    (11.x) or Format/Datatype (10.x) strings: what precision really ran."""
    counts: dict = {}
    for layer in _inspector_doc(info).get("Layers") or []:
        outputs = layer.get("Outputs") if isinstance(layer, dict) else None
        if not outputs or not isinstance(outputs[0], dict):
            continue
        text = str(outputs[0].get("DataType") or outputs[0].get("Format/Datatype") or "").lower()
        kind = next((t for word, t in TYPE_WORDS if word in text), "unknown")
        counts[kind] = counts.get(kind, 0) + 1
    return counts
