"""The KV cache of an exported decoder: which graph inputs and outputs hold it, and what pruning
changes in them.

    past_key_values.N.key|value  ->  present.N.key|value      (optimum, the ONNX Runtime GenAI builder)
    past_key_N / past_value_N    ->  present_key_N / present_value_N

A recognised cache pair is laid out [batch, kv_heads, length, head_dim]. Its head count and head
size are the model's own (the runtime reads them from the model's config), so unlike every
other graph input and output they follow the pruning of the attention they belong to; the
analysis couples every layer's cache alike (the runtime allocates one cache shape for all
layers), and `io_changes`/`fit` describe and apply the change to the inputs and outputs of a
run. With `freeze_io` (spa prune --freeze-io) they stay pinned like any other model input.
"""

from __future__ import annotations

import re

import numpy as np
import onnx

from spa.core.graph import attr
from spa.core.rules.attention import head_size

CACHE_AXES = (1, 3)  # kv_heads, head_dim of [batch, kv_heads, length, head_dim]
_NAME = re.compile(r"^(?P<side>past|present)(?:_key_values)?[._](?:(?P<n>\d+)[._](?P<kind>key|value)|"
                   r"(?P<kind2>key|value)[._](?P<n2>\d+))$")


def slot(name: str, side: str):
    """(layer, "key" | "value") of a cache input (`side` "past") or output ("present"), else None."""
    m = _NAME.match(name)
    if m is None or m["side"] != side:
        return None
    return int(m["n"] or m["n2"]), m["kind"] or m["kind2"]


def pairs(graph: onnx.GraphProto, shapes: dict) -> list[tuple[str, str, int, str]]:
    """[(past input, present output, layer, "key" | "value")] for the rank-4 cache pairs of `graph`."""
    past = {slot(i.name, "past"): i.name for i in graph.input}
    found = []
    for o in graph.output:
        at = slot(o.name, "present")
        if at is not None and at in past and all(len(shapes.get(n) or ()) == 4 for n in (o.name, past[at])):
            found.append((past[at], o.name, *at))
    return sorted(found, key=lambda p: (p[3], p[2]))


def cache_names(graph: onnx.GraphProto, shapes: dict) -> set[str]:
    return {n for p in pairs(graph, shapes) for n in p[:2]}


def ports(analysis, drops: dict) -> dict:
    """{graph input/output: {axis: kept positions}} for the cache axes a removal shrinks."""
    io = {vi.name for vi in list(analysis.model.graph.input) + list(analysis.model.graph.output)}
    found: dict = {}
    for (tensor, axis), removed in drops.items():
        if tensor in io and len(removed):
            found.setdefault(tensor, {})[axis] = np.setdiff1d(np.arange(analysis.sizes[(tensor, axis)]), removed)
    return found


RENAMED = "\0renamed"  # a ports key: {input model's I/O name: the result's name, None when removed} (an erasure)


def renumber(graph: onnx.GraphProto) -> dict[str, str]:
    """Rename the cache inputs and outputs of `graph` (in place) so that their layers are 0..L-1
    again, as runtimes build them from num_hidden_layers (after an erasure took some away);
    returns {old name: new name} of those that changed."""
    found = {}
    for side, vis in (("past", graph.input), ("present", graph.output)):
        for vi in vis:
            at = slot(vi.name, side)
            if at is not None:
                found[vi.name] = at[0]
    order = {layer: k for k, layer in enumerate(sorted(set(found.values())))}
    rename = {name: re.sub(rf"(?<=[._]){layer}(?=[._]|$)", str(order[layer]), name, count=1)
              for name, layer in found.items() if order[layer] != layer}
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        vi.name = rename.get(vi.name, vi.name)
    for node in graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    return rename


def fit(arrays: dict, ports: dict | None) -> dict:
    """`arrays` (feeds or outputs keyed by name) cut to the shapes of the pruned model's I/O (and,
    after an erasure, renamed as its cache was, without the pairs it removed)."""
    if not ports:
        return arrays
    renamed = ports.get(RENAMED) or {}
    out = {renamed.get(k, k): v for k, v in arrays.items() if renamed.get(k, k) is not None}
    for name, axes in ports.items():
        if name in out and isinstance(out[name], np.ndarray):
            for axis, kept in axes.items():
                out[name] = np.take(out[name], kept, axis=axis)
    return out


def io_changes(analysis, ports: dict) -> list[dict]:
    """What the summary and JSON say: each changed graph input/output, its shape before and after."""
    found = []
    for vi in list(analysis.model.graph.input) + list(analysis.model.graph.output):
        if vi.name in ports:
            dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            after = [len(ports[vi.name][k]) if k in ports[vi.name] else d for k, d in enumerate(dims)]
            found.append({"name": vi.name, "before": dims, "after": after})
    return found


def head_size_hints(graph: onnx.GraphProto, shapes: dict) -> dict[str, int]:
    """{symbol: head size} for cache head_dim axes the exporter left symbolic (the GenAI builder's
    'kv_cache_dim'), read from the GroupQueryAttention that takes the cache."""
    readers = {i: n for n in graph.node for i in n.input[3:5] if n.op_type == "GroupQueryAttention" and i}
    hints = {}
    for vi in graph.input:
        dims = vi.type.tensor_type.shape.dim
        node = readers.get(vi.name)
        if node is None or len(dims) != 4 or not dims[3].dim_param:
            continue
        width = (shapes.get(node.input[0]) or (None,))[-1]
        d = head_size(attr(node, "num_heads", 0), attr(node, "kv_num_heads", 0), width,
                      packed=len(node.input) < 2 or not node.input[1])
        if d is not None:
            hints[dims[3].dim_param] = d
    return hints


def bind_head_size(graph: onnx.GraphProto, shapes: dict) -> None:
    """Give cache inputs and outputs whose head size is symbolic (the GenAI builder's
    'kv_cache_dim') their size in `shapes` (in place), so that the head_dim axis is a channel space
    that follows the pruning like a fixed one; the file keeps its symbol until that axis shrinks."""
    hints = head_size_hints(graph, shapes)
    for vi in list(graph.input) + list(graph.output) if hints else ():
        dims = vi.type.tensor_type.shape.dim
        shape = shapes.get(vi.name)
        if shape is None or len(shape) != len(dims):
            continue
        bound = tuple(hints.get(d.dim_param, s) if s is None else s for d, s in zip(dims, shape))
        if bound != tuple(shape):
            shapes[vi.name] = bound
