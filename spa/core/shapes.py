"""Input shapes: the shape a model really runs at, for its costs, its checks and its benchmarks.

    shape="x:1x3x736x736" | ["x:1x3x736x736", ...] | {"x": (1, 3, 736, 736)} ─parse─▶ {name: dims}
    calib arrays ─from_data─▶ {name: (1, *first sample's shape)}
    choose(model, shape, data) ─▶ checked against the model's inputs (UsageError: exit 2), then
    bind(model, ...): model.input_shapes, model.input_shapes_from and model.shapes_at (every tensor's
    shape with the inputs at those shapes: what spa.core.cost counts)

Without a shape, dynamic dims count as 1 (MACs per sample, per pixel of an image model whose
height and width are dynamic): right for a batch axis, far off for a detector's 736x736 image.
"""

from __future__ import annotations

import re

import onnx

from spa.core.errors import require
from spa.core.model import Model, infer_shapes
from spa.core.runtime import graph_inputs

SYNTAX = "NAME:DIMS with dims like 1x3x736x736, e.g. shape=x:1x3x736x736"


def parse_dims(text: str, what: str = "shape=") -> tuple:
    """'1x3x736x736' -> (1, 3, 736, 736); every dim a positive integer, else UsageError."""
    dims = str(text).strip().lower().split("x")
    require(all(re.fullmatch(r"[0-9]+", d.strip()) for d in dims),
            f"{what} '{str(text).strip()}' is not a shape like 1x3x736x736", f"write {SYNTAX}")
    out = tuple(int(d) for d in dims)
    require(all(d >= 1 for d in out), f"{what} '{str(text).strip()}' has a dim that is not positive",
            f"write {SYNTAX}")
    return out


def parse(shape) -> dict | None:
    """{input name: dims} from a text 'NAME:DIMS[,NAME:DIMS]', a list of such texts (the CLI's
    repeatable --shape) or a dict {name: dims or 'DIMS'}; None stays None. The last ':' splits,
    so tf2onnx names such as 'input:0' work."""
    if shape is None or (isinstance(shape, (list, tuple)) and not shape):
        return None
    if isinstance(shape, dict):
        return {str(k): _dims_value(k, v) for k, v in shape.items()}
    items = [shape] if isinstance(shape, str) else list(shape)
    shapes: dict = {}
    for item in (part for text in items for part in str(text).split(",")):
        name, sep, spec = item.strip().rpartition(":")
        require(bool(sep and name.strip() and spec.strip()), f"bad shape='{item.strip()}': expected NAME:DIMS",
                f"write {SYNTAX}")
        require(name.strip() not in shapes, f"shape= names input '{name.strip()}' twice")
        shapes[name.strip()] = parse_dims(spec, f"shape= for '{name.strip()}':")
    return shapes


def _dims_value(name, value) -> tuple:
    if isinstance(value, str):
        return parse_dims(value, f"shape= for '{name}':")
    ok = isinstance(value, (list, tuple)) and all(isinstance(d, int) and not isinstance(d, bool) for d in value)
    require(ok and len(value) > 0, f"invalid shape= for '{name}': {value!r} is not a tuple of ints",
            f"write {SYNTAX}")
    return parse_dims("x".join(map(str, value)), f"shape= for '{name}':")


def declared(proto: onnx.ModelProto) -> dict:
    """{input name: dims} of the real graph inputs, None for a dynamic dim (None: no shape at all)."""
    return {vi.name: dims for vi, dims in graph_inputs(proto)}


def check(inputs: dict, shapes: dict) -> None:
    """UsageError (one line) unless every shape names a real input (`inputs`: {name: dims, None
    where dynamic}, e.g. `declared(proto)`), has its rank and keeps its static dims."""
    for name, dims in shapes.items():
        require(name in inputs, f"shape= names '{name}', which is not an input of the model",
                f"its inputs: {', '.join(inputs) or '(none)'}")
        want = inputs[name]
        if want is None:
            continue
        require(len(dims) == len(want), f"shape= for '{name}' has rank {len(dims)} ({text(dims)}), but the input "
                f"has rank {len(want)} ({text(want)})")
        for k, (d, w) in enumerate(zip(dims, want)):
            require(w is None or d == w, f"shape= for '{name}' sets axis {k} to {d}, but the model fixes it to {w} "
                    f"({text(want)})", "change only the dynamic axes (shown as ?)")


def text(dims) -> str:
    """1x3x?x? (? for a dynamic dim)."""
    return "x".join("?" if d is None else str(d) for d in dims)


def from_data(proto: onnx.ModelProto, arrays) -> dict | None:
    """{input: (batch, *shape of its first sample)} for the inputs the data holds (arrays keyed by
    input name, or an iterable of feed dicts: its first), batch 1 or the model's fixed batch; None
    when the data gives none."""
    if arrays is None:
        return None
    if not isinstance(arrays, dict):
        first = next(iter(arrays), None) if isinstance(arrays, (list, tuple)) else None
        return {k: tuple(getattr(v, "shape", ())) for k, v in first.items() if k in declared(proto)} \
            if isinstance(first, dict) else None
    inputs = declared(proto)
    found = {k: ((inputs[k] or (None,))[0] or 1, *v.shape[1:]) for k, v in arrays.items()
             if k in inputs and getattr(v, "ndim", 0) >= 1}
    return found or None


def choose(proto: onnx.ModelProto, shape=None, data=None) -> tuple[dict | None, str]:
    """(shapes, where they came from): `shape` when given (checked: UsageError), else the data's
    first sample, else (None, "model"): dynamic dims count as 1."""
    given = parse(shape)
    if given:
        check(declared(proto), given)
        return given, "shape"
    found = from_data(proto, data)
    if found:
        return found, "calib"
    return None, "model"


def bind(model, shape=None, data=None, *, source: str | None = None) -> None:
    """Set model.input_shapes / input_shapes_from / shapes_at for `shape` (parsed and checked) or
    the data's shapes; nothing changes (dynamic dims as 1) when neither gives one. `source` names
    what the data was (recorded in the JSON, "calib" by default)."""
    shapes, found = choose(model.proto, shape, data)
    if shapes is None:
        return
    model.input_shapes, model.input_shapes_from = shapes, source if found == "calib" and source else found
    model.shapes_at = infer_at(model, shapes)


def record(model) -> dict:
    """The JSON fields: {"input_shapes": {name: dims}, "input_shapes_from": "shape" | "calib" |
    "model"}; from the model, a dynamic dim is shown as the 1 the costs use."""
    if model.input_shapes is not None:
        shapes = {k: list(v) for k, v in model.input_shapes.items()}
        return {"input_shapes": shapes, "input_shapes_from": model.input_shapes_from}
    shapes = {k: None if v is None else [d or 1 for d in v] for k, v in declared(model.proto).items()}
    return {"input_shapes": shapes, "input_shapes_from": "model"}


def copy_binding(source, target):
    """Give `target` (a rewritten or simplified copy of `source`) the same input shapes; returns it."""
    if source.input_shapes is not None:
        target.input_shapes, target.input_shapes_from = dict(source.input_shapes), source.input_shapes_from
        target.shapes_at = infer_at(target, target.input_shapes)
    return target


def infer_at(model, shapes: dict) -> dict:
    """Every tensor's shape with the graph inputs at `shapes` (shape inference on the model with
    its input dims set, then put back as they were: no copy of the weights)."""
    saved = {}
    for vi in model.proto.graph.input:
        if vi.name in shapes:
            saved[vi.name] = onnx.TypeProto()
            saved[vi.name].CopyFrom(vi.type)
            dims = vi.type.tensor_type.shape
            del dims.dim[:]
            for d in shapes[vi.name]:
                dims.dim.add().dim_value = int(d)
    try:
        bound = Model(model.proto, model.path)
        infer_shapes(bound)
        return bound.shapes
    finally:
        for vi in model.proto.graph.input:
            if vi.name in saved:
                vi.type.CopyFrom(saved[vi.name])
