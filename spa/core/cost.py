"""Parameter and multiply-accumulate counts from a model's graph and inferred shapes.

Dynamic dims (batch, sequence) count as 1, so MACs are per sample, unless the model is bound to
the input shapes it really runs at (spa.core.shapes.bind: `model.shapes_at`), e.g. a detector's
1x3x736x736 image.
"""

from __future__ import annotations

from collections import ChainMap

import numpy as np

from spa.core.graph import attr
from spa.core.model import COPY, Model, constant_type
from spa.core.sizes import FLOAT_TYPES
from spa.core.unionfind import distinct


def params(model: Model, shapes: dict | None = None) -> int:
    """Elements of floating-point initializers and Constant nodes, and the weights packed in
    MatMulNBits' quantized ones (`shapes`: other shapes for some of them, as they will be once pruned)."""
    shapes = shapes or {}
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    packed = {n.input[1]: 8 // (attr(n, "bits", 4) or 4) for n in model.graph.node if n.op_type == "MatMulNBits"}
    total = sum(_numel(shapes.get(t.name, dims[t.name])) * packed.get(t.name, 1) for t in model.graph.initializer
                if (t.data_type in FLOAT_TYPES or t.name in packed) and not _is_copy(t.name, dims))
    for node in model.graph.node:
        if node.op_type == "Constant":
            typed = constant_type(node)  # read without decoding the value
            if typed is not None and typed[1] in FLOAT_TYPES:
                name = node.output[0]
                total += _numel(shapes[name]) if name in shapes else int(np.prod(typed[0], dtype=np.int64))
    return total


def _is_copy(name: str, dims: dict) -> bool:
    """A per-use copy of a uniform constant with its original's shape stores nothing new."""
    base = name.split(COPY)[0]
    return base != name and dims.get(base) == dims[name]


def _numel(shape) -> int:
    return int(np.prod([d or 1 for d in shape], dtype=np.int64)) if shape is not None else 0


def _node_macs(node, shapes) -> int:
    get = shapes.get
    if node.op_type == "Conv" and get(node.input[1]) and get(node.output[0]):
        w = get(node.input[1])
        return _numel(get(node.output[0])) * _numel(w[1:])
    if node.op_type == "ConvTranspose" and get(node.input[1]) and get(node.input[0]):
        w = get(node.input[1])
        return _numel(get(node.input[0])) * _numel(w[1:])
    if node.op_type in ("Gemm", "MatMul", "MatMulNBits") and get(node.input[0]) and get(node.output[0]):
        a = get(node.input[0])
        trans = node.op_type == "Gemm" and attr(node, "transA", 0)
        k = (a[0] if trans else a[-1]) or 1
        return _numel(get(node.output[0])) * k
    return 0


def at_shape(model: Model):
    """The shapes costs count with: at the bound input shapes when there are (falling back to the
    inferred ones for tensors added since, e.g. the analysis' per-use copies), else as inferred."""
    bound = getattr(model, "shapes_at", None)
    return model.shapes if bound is None else ChainMap(bound, model.shapes)


def macs(model: Model) -> int:
    shapes = at_shape(model)
    return sum(_node_macs(n, shapes) for n in model.graph.node)


def summary(model: Model) -> dict:
    return {"params": params(model), "macs": macs(model)}


def estimate(analysis, plan: dict) -> dict:
    """Params and MACs the model will have once `plan` is applied, from shapes alone (the
    planner's budget search runs it many times; pruning would copy every weight each time)."""
    cuts: dict = {}
    for (tensor, axis), pos in dropped_positions(analysis, plan).items():
        cuts.setdefault(tensor, {})[axis] = len(pos)
    model = analysis.model
    shapes = dict(at_shape(model))
    for tensor, cut in cuts.items():
        if shapes.get(tensor) is not None:
            shapes[tensor] = tuple(d - cut.get(k, 0) if d else d for k, d in enumerate(shapes[tensor]))
    pruned = {t: shapes[t] for t in cuts if shapes.get(t) is not None}
    return {"params": params(model, pruned), "macs": sum(_node_macs(n, shapes) for n in model.graph.node)}


def dropped_positions(analysis, plan: dict) -> dict:
    """{space: sorted positions to remove} from {group id: channel indices}."""
    parts: dict = {}
    for gid, channels in plan.items():
        group = analysis.group(gid)
        for space, per_channel in group.positions.items():
            if channels:
                pos = per_channel[channels] if isinstance(per_channel, np.ndarray) else \
                    np.concatenate([per_channel[c] for c in channels])
                parts.setdefault(space, []).append(np.ravel(pos))
    return {space: distinct(np.concatenate(p)) for space, p in parts.items()}


def overlaps(analysis, plan: dict) -> list[dict]:
    """Groups whose planned channels remove more slices than channels from their first member
    (channels that share positions, e.g. a channel shuffle multiplied with its source: one
    channel of the group takes 3 of 4 filters): what was really removed, for the summary."""
    found = []
    for gid, channels in plan.items():
        if not channels:
            continue
        member = analysis.group(gid).members[0]
        flat = np.concatenate([np.ravel(p) for p in member.positions])
        if len(distinct(flat)) == len(flat):  # every slice belongs to one channel (a head's 64 columns too)
            continue
        space = (member.tensor, member.axis)
        removed = len(dropped_positions(analysis, {gid: channels}).get(space, ()))
        if removed != len(channels):
            found.append({"group": gid, "channels": len(channels), "tensor": member.tensor, "axis": member.axis,
                          "slices": removed, "of": int(analysis.sizes.get(space, 0))})
    return found
