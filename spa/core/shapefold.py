"""Static shapes at concrete input sizes, fast: ONNX's own (C++) shape inference, with the small
integer arithmetic that exporters use to compute shapes at run time (Shape, Gather, Div, Range,
Where, Expand, ...) evaluated in numpy between rounds, so that a Reshape, Expand or Slice whose
operands are computed becomes static for the next round.

    skeleton + {dim symbol: size} ─fold─▶ {tensor: static dims}   (rounds until nothing new)

ONNX's data propagation alone stops at Div, Where, Range or a Reshape to (-1, head_size) of
symbolic dims; ONNX Runtime's symbolic inference does all of it with sympy, but costs about
0.13 ms per node in Python (2 s on a 64-layer LLM export). Only values that depend on shapes and
constants are evaluated (never on a graph input's data), each at most FOLD_LIMIT elements, and
only ops of the table below: anything else is left to the later fallbacks (spa.core.model).
"""

from __future__ import annotations

import functools
import re

import numpy as np
import onnx
from onnx import helper, numpy_helper

from spa.core.sizes import FLOAT_TYPES
from spa.core.tensors import reads, subgraphs

FOLD_LIMIT = 1 << 16  # elements: larger values are not evaluated (a mask of 65k entries is already rare)
ROUNDS = 6  # inference rounds at most (each new static Shape can unlock the next)
WORD = re.compile(r"[A-Za-z_][\w.]*")
TOKEN = re.compile(r"\d+|[A-Za-z_][\w.]*|\S")


def dim_value(text: str, sizes: dict) -> int | None:
    """The size of a symbolic dim: a symbol of `sizes`, or an exporter's sum such as
    'past_sequence_length + sequence_length' (sums and products of symbols and integers);
    None otherwise."""
    if text in sizes:
        return sizes[text]
    tokens = TOKEN.findall(text)
    if not tokens or "".join(tokens) != re.sub(r"\s+", "", text):
        return None
    total, sign, term, operand = 0, 1, 1, True
    for tok in tokens:
        if operand:
            value = int(tok) if tok.isdigit() else sizes.get(tok)
            if value is None:
                return None
            term, operand = term * value, False
        elif tok in "+-":
            total, sign, term, operand = total + sign * term, 1 if tok == "+" else -1, 1, True
        elif tok == "*":
            operand = True
        else:
            return None
    return None if operand else total + sign * term


def symbols(graph: onnx.GraphProto) -> list[str]:
    """The words of the graph inputs' symbolic dims, in order of appearance."""
    seen = {}
    for vi in graph.input:
        for d in vi.type.tensor_type.shape.dim:
            for w in WORD.findall(d.dim_param):
                seen.setdefault(w, None)
    return list(seen)


def fold(bones: onnx.ModelProto, sizes: dict, constants: dict | None = None) -> dict | None:
    """{tensor: dims} of `bones` (a skeleton: small initializers only) with every graph input's
    symbolic dim set from `sizes`; dims still unknown are None. None when a symbolic input dim
    has no size in `sizes`. After the first round, each round infers only the part of the graph
    still unknown (`part`), from the concrete shapes found so far; the values evaluated so far
    enter it as initializers, only those it reads (the graph itself is never rewritten).
    `constants`: the values of its Constant nodes (`constant_values`), when already read."""
    model = onnx.ModelProto()
    model.CopyFrom(bones)
    for vi in model.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                value = dim_value(d.dim_param, sizes)
                if value is None or value <= 0:
                    return None
                d.dim_value = value
    del model.graph.value_info[:]
    values = _constants(model.graph) | (constants if constants is not None else constant_values(model.graph))
    pending = _foldable(model.graph, values)
    known, typed, sub = {}, {vi.name: vi for vi in model.graph.input}, model
    producer = {o: n for n in model.graph.node for o in n.output if o}
    for _ in range(ROUNDS):
        try:
            inferred = onnx.shape_inference.infer_shapes(sub, data_prop=True)
        except Exception:  # noqa: BLE001 - what is known so far stands
            break
        known.update(_static(inferred.graph, typed))
        pending, found = _evaluate(pending, known, values)
        if not found:
            break
        open_ = {o for n in sub.graph.node for o in n.output if o and (o not in known or None in known[o])}
        sub = part(model, open_ - values.keys(), typed, sizes=sizes, producer=producer, values=values)
    for name, value in values.items():  # evaluated shape arithmetic: its own shape
        if name not in known or None in known[name]:
            known[name] = tuple(int(d) for d in value.shape)
    return known or _static(model.graph)


def _static(graph: onnx.GraphProto, typed: dict | None = None) -> dict:
    """{tensor: dims} inferred; None for an unknown dim. `typed`: gets each value info too."""
    out = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if typed is not None:
            typed[vi.name] = vi
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.HasField("shape"):
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    for init in graph.initializer:
        out[init.name] = tuple(int(d) for d in init.dims)
    return out


def _constants(graph: onnx.GraphProto) -> dict:
    """{name: array} of the initializers that carry data (a skeleton keeps only small ones)."""
    values = {}
    for init in graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL and _has_data(init):
            values[init.name] = numpy_helper.to_array(init)
    return values


def constant_values(graph: onnx.GraphProto) -> dict:
    """{output: value} of the graph's Constant nodes that can be read (not sparse, not strings)."""
    out = {}
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.output) == 1:
            value = _value(n, {}, {})
            if value is not None:
                out[n.output[0]] = value
    return out


def _has_data(t: onnx.TensorProto) -> bool:
    n = int(np.prod(t.dims, dtype=np.int64))
    return n == 0 or bool(t.raw_data) or any(len(getattr(t, f)) for f in (
        "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"))


def _foldable(graph: onnx.GraphProto, values: dict) -> list:
    """The nodes that may be evaluated once shapes are known, in graph order: ops of the table
    whose inputs are constants, shapes (Shape, Size) or such nodes' outputs; nothing that reads
    a graph input's data or the output of an op outside the table is ever evaluated."""
    ready, nodes = set(values), []
    for n in graph.node:
        if n.op_type not in OPS or n.domain not in ("", "ai.onnx") or len(n.output) != 1 or n.output[0] in values:
            continue
        if n.op_type in ("Shape", "Size") or all(not i or i in ready for i in n.input):
            ready.add(n.output[0])
            nodes.append(n)
    return nodes


def _evaluate(pending: list, shapes: dict, values: dict) -> tuple[list, bool]:
    """Evaluate every pending node whose inputs are known (in graph order, which ONNX requires
    to be topological) into `values`; returns the nodes still pending and whether something new
    was found."""
    left, found = [], False
    for node in pending:
        value = _value(node, shapes, values)
        if value is None:
            left.append(node)
            continue
        values[node.output[0]] = value
        found = True
    return left, found


def _value(node: onnx.NodeProto, shapes: dict, values: dict) -> np.ndarray | None:
    if node.op_type in ("Shape", "Size"):
        dims = shapes.get(node.input[0])
        if dims is None or None in dims:
            return None
        args = [dims]
    elif any(i and i not in values for i in node.input):
        return None
    else:
        args = [values.get(i) if i else None for i in node.input]
    try:
        value = np.asarray(OPS[node.op_type](node, _attrs(node), *args))
    except Exception:  # noqa: BLE001 - an op we cannot evaluate here stays for the fallbacks
        return None
    return value if value.size <= FOLD_LIMIT else None


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# ---------------------------------------------------------------- the ops (ONNX semantics, opset 1-23)


def _shape(node, a, dims):
    n = len(dims)
    start, end = a.get("start", 0), a.get("end", n)
    start, end = (max(0, min(n, s + n if s < 0 else s)) for s in (start, end))
    return np.array(dims[start:end], dtype=np.int64)


def _axes(a, given, name="axes"):
    return [int(x) for x in (given if given is not None else a.get(name, []))]


def _unsqueeze(node, a, x, axes=None):
    axes = _axes(a, axes)
    rank = x.ndim + len(axes)
    return np.expand_dims(x, tuple(sorted(ax + rank if ax < 0 else ax for ax in axes)))


def _squeeze(node, a, x, axes=None):
    axes = _axes(a, axes)
    return np.squeeze(x, tuple(axes)) if axes else np.squeeze(x)


def _slice(node, a, x, starts=None, ends=None, axes=None, steps=None):
    if starts is None:  # opset < 10: attributes
        starts, ends, axes = a["starts"], a["ends"], a.get("axes")
    axes = list(range(len(starts))) if axes is None else [int(v) for v in axes]
    steps = [1] * len(starts) if steps is None else [int(v) for v in steps]
    idx = [slice(None)] * x.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        n = x.shape[ax]
        s, e = int(s), int(e)
        s = s + n if s < 0 else s
        e = e + n if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), n), min(max(e, 0), n)
        else:
            s, e = min(max(s, -1), n - 1), min(max(e, -1), n - 1)
        idx[ax] = slice(s, e if e >= 0 else None, st)
    return x[tuple(idx)]


def _div(node, a, x, y):
    if x.dtype.kind in "iu":
        q = np.abs(x) // np.abs(y)  # ONNX integer division truncates toward zero
        return (np.sign(x) * np.sign(y) * q).astype(x.dtype)
    return x / y


def _cast(node, a, x):
    return x.astype(helper.tensor_dtype_to_np_dtype(a["to"]))


def _reshape(node, a, x, shape):
    shape = [int(s) for s in shape]
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _constant_of_shape(node, a, shape):
    value = a.get("value")
    fill = numpy_helper.to_array(value).reshape(()) if value is not None else np.float32(0)
    if int(np.prod(shape, dtype=np.int64)) > FOLD_LIMIT:
        raise ValueError("too large")
    return np.full([int(s) for s in shape], fill, dtype=np.asarray(fill).dtype)


def _expand(node, a, x, shape):
    target = np.broadcast_shapes(x.shape, tuple(int(s) for s in shape))
    if int(np.prod(target, dtype=np.int64)) > FOLD_LIMIT:
        raise ValueError("too large")
    return np.broadcast_to(x, target).copy()


def _reduce(fn):
    def run(node, a, x, axes=None):
        axes = _axes(a, axes)
        if not axes and a.get("noop_with_empty_axes", 0):
            return x
        return fn(x, axis=tuple(axes) if axes else None, keepdims=bool(a.get("keepdims", 1)))
    return run


def _variadic(fn):
    def run(node, a, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out
    return run


def _binary(fn):
    return lambda node, a, x, y: fn(x, y)


def _unary(fn):
    return lambda node, a, x: fn(x)


def _constant(node, a):
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in a:
            return np.array(a[key], dtype=dtype)
    return numpy_helper.to_array(a["value"])  # a sparse_value or string raises: not evaluated


OPS = {
    "Constant": _constant,
    "Shape": _shape,
    "Size": lambda node, a, dims: np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64),
    "Identity": lambda node, a, x: x,
    "Gather": lambda node, a, x, i: np.take(x, i.astype(np.int64), axis=a.get("axis", 0)),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": lambda node, a, *xs: np.concatenate(xs, axis=a["axis"]),
    "Slice": _slice,
    "Cast": _cast,
    "Reshape": _reshape,
    "Range": lambda node, a, s, e, d: np.arange(s, e, d).astype(np.result_type(s, e, d)),
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Where": lambda node, a, c, x, y: np.where(c, x, y),
    "Transpose": lambda node, a, x: np.transpose(x, a.get("perm")),
    "Tile": lambda node, a, x, r: np.tile(x, [int(v) for v in r]),
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _div,
    "Mod": lambda node, a, x, y: np.fmod(x, y) if a.get("fmod", 0) else np.mod(x, y),
    "Pow": _binary(lambda x, y: np.power(x, y).astype(x.dtype)),
    "Equal": _binary(np.equal),
    "Less": _binary(np.less),
    "LessOrEqual": _binary(np.less_equal),
    "Greater": _binary(np.greater),
    "GreaterOrEqual": _binary(np.greater_equal),
    "And": _binary(np.logical_and),
    "Or": _binary(np.logical_or),
    "Not": _unary(np.logical_not),
    "Neg": _unary(np.negative),
    "Abs": _unary(np.abs),
    "Floor": _unary(np.floor),
    "Ceil": _unary(np.ceil),
    "Sqrt": _unary(np.sqrt),
    "Min": _variadic(np.minimum),
    "Max": _variadic(np.maximum),
    "Sum": _variadic(np.add),
    "ReduceProd": _reduce(np.prod),
    "ReduceSum": _reduce(np.sum),
    "ReduceMin": _reduce(np.min),
    "ReduceMax": _reduce(np.max),
}


def part(bones: onnx.ModelProto, missing: set, typed: dict, *, sizes: dict, producer: dict | None = None,
         values: dict | None = None) -> onnx.ModelProto:
    """The part of `bones` that computes the `missing` tensors: their producers and, back from
    them, every node up to float tensors whose shape the first inference gave in the inputs'
    symbols or sizes (those become graph inputs: only their shapes matter). Integer tensors are always
    followed back to where they come from, since shapes are computed from their values, up to
    `values` (evaluated: initializers of the part). The whole of `bones` where that part holds a
    subgraph (its captures are not followed)."""
    graph, values = bones.graph, values or {}
    producer = producer or {o: n for n in graph.node for o in n.output if o}  # {tensor: node}
    constants = {t.name for t in graph.initializer} | {vi.name for vi in graph.input}
    nodes, inputs, decided, stack = set(), {}, set(), [producer[n] for n in missing if n in producer]
    sized = functools.lru_cache(maxsize=None)(lambda param: dim_value(param, sizes) is not None)
    while stack:
        node = stack.pop()
        if id(node) in nodes:
            continue
        if subgraphs(node):
            return _whole(bones, values, constants)
        nodes.add(id(node))
        for name in node.input:
            if not name or name in decided or name in constants or name in values:
                continue
            decided.add(name)  # the same for every reader
            vi = typed.get(name)
            t = vi.type.tensor_type if vi is not None else None
            shaped = t is not None and t.HasField("shape") and all(d.dim_value > 0 or (d.dim_param and sized(d.dim_param))
                                                                   for d in t.shape.dim)
            if name in producer and (name in missing or not shaped or t.elem_type not in FLOAT_TYPES):
                stack.append(producer[name])
            elif shaped:
                inputs[name] = vi
    part = onnx.ModelProto(ir_version=bones.ir_version)
    part.opset_import.extend(bones.opset_import)
    part.functions.extend(bones.functions)
    part.graph.name = graph.name
    part.graph.node.extend(n for n in graph.node if id(n) in nodes)
    used = {i for n in part.graph.node for i in n.input}
    part.graph.input.extend([vi for vi in graph.input if vi.name in used] + list(inputs.values()))
    part.graph.initializer.extend(t for t in graph.initializer if t.name in used)
    part.graph.initializer.extend(numpy_helper.from_array(values[n], n) for n in sorted(used & values.keys())
                                  if n not in constants)
    return part


def _whole(bones: onnx.ModelProto, values: dict, constants: set) -> onnx.ModelProto:
    """`bones` with its evaluated nodes (every output in `values`) replaced by initializers of
    their values, where something reads them (subgraphs included)."""
    if not values:
        return bones
    model = onnx.ModelProto()
    model.CopyFrom(bones)
    keep = [n for n in model.graph.node if not all(o in values for o in n.output if o)]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    used = reads(model.graph)
    model.graph.initializer.extend(numpy_helper.from_array(values[n], n) for n in sorted(used & values.keys())
                                   if n not in constants)
    return model
