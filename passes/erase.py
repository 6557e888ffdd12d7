"""Erasure pass: remove whole residual branches (spa.core.depth's units).

    y = Add(x, f(x))  ─▶  y = x      consumers of y read x; f's nodes and weights removed

Requires: unit ids that spa.core.depth.find gives for the model (a residual's output, a chain's
last output). A fused residual norm becomes the plain norm of its skip; a chain is bypassed.
Ensures: graph inputs and outputs keep their names and shapes, except a decoder's KV cache: an
erased attention's pair (past_key_values.N -> present.N) goes, the others are numbered 0..L-2
again; the result passes the ONNX checker and runs in ONNX Runtime (checked with the rest of the
prune pass's result, its cache mapped by name).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from spa.passes.base import remove_dead

from spa.core import depth, kvcache
from spa.core.errors import SpaError
from spa.core.tensors import subgraph_reads


def erase(proto: onnx.ModelProto, ids: list[str]) -> onnx.ModelProto:
    """`proto` (changed in place and returned) without the branches of units `ids`."""
    return erase_with_io(proto, ids)[0]


def erase_with_io(proto: onnx.ModelProto, ids: list[str], means: dict | None = None) -> tuple[onnx.ModelProto, dict]:
    """As `erase`, and {input model's I/O name: new name, None when removed}: a decoder's erased
    attention takes its KV cache pair along, and the other pairs are numbered 0..L-1 again.
    `means`: {unit id: constant}; such a unit's Add adds the constant instead of its branch
    (y = x + E[f(x)]: spa.scoring.depth.branch_means), a fused residual norm excepted."""
    graph = proto.graph
    bypass, cache, means = {}, [], dict(means or {})
    for uid in ids:
        try:
            add, slot, unit = depth.locate(graph, uid)
        except KeyError:
            raise SpaError(f"cannot erase unit '{uid}': the model has no erasable unit of that name",
                           "take the ids from `spa analyze --json` (erasable) of this same model") from None
        cache += unit.cache
        node = graph.node[add]
        if uid in means and slot is not None and node.op_type == "Add":
            name = f"{uid}.erased_mean"
            graph.initializer.append(numpy_helper.from_array(np.asarray(means[uid]), name))
            node.input[slot] = name  # the branch, read by nothing now, goes with the dead nodes
            continue
        bypass[uid] = unit.skip
    kept = {o.name for o in graph.output} | subgraph_reads(graph)
    for node in graph.node:
        if node.output and node.output[0] in bypass and node.op_type in depth.RESIDUAL_NORMS:
            _plain_norm(node, bypass, kept)
        elif node.output and node.output[0] in bypass and node.output[0] in kept:
            # a graph output or a subgraph's capture keeps its name
            node.CopyFrom(helper.make_node("Identity", [bypass[node.output[0]]], [node.output[0]], name=node.name))
    for node in graph.node:
        for k, name in enumerate(node.input):
            while name in bypass and name not in kept:
                name = bypass[name]  # units in a row: y2 = y1 = x
            node.input[k] = name
    _remove_io(graph.output, set(cache))
    remove_dead(proto)
    _reread_lengths(graph, set(cache))
    _remove_io(graph.input, set(cache))
    produced = {o for n in graph.node for o in n.output}
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for vi in [vi for vi in graph.value_info if vi.name not in used and vi.name not in produced]:
        graph.value_info.remove(vi)
    io = {name: None for name in cache}
    io.update(kvcache.renumber(graph) if cache else {})
    return proto, io


def _reread_lengths(graph: onnx.GraphProto, removed: set) -> None:
    """Nodes still reading a removed cache input (only its Shape: the past length a mask is built
    from) read the same kind of cache input of a layer that stays (every layer's has that shape)."""
    stays = {kvcache.slot(i.name, "past")[1]: i.name for i in reversed(graph.input)
             if i.name not in removed and kvcache.slot(i.name, "past")}
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in removed:
                kind = kvcache.slot(name, "past")[1]
                if kind not in stays:
                    raise SpaError("cannot erase every attention unit of a decoder: its mask is computed from the "
                                   "length of a KV cache input", "keep at least one attention unit")
                node.input[k] = stays[kind]


def _plain_norm(node: onnx.NodeProto, bypass: dict, kept: set) -> None:
    """A fused residual norm whose branch goes: the plain norm of its skip input (output 0), and
    its sum output (3) read as the skip itself (an Identity where the name must stay)."""
    skip = bypass.pop(node.output[0])
    total = node.output[3] if len(node.output) > 3 else ""
    if any(node.output[1:3]):
        raise SpaError(f"cannot erase unit '{node.output[0]}': its {node.op_type} statistics outputs are read")
    scale = list(node.input[2:4]) if node.op_type == "SkipLayerNormalization" else [node.input[2]]
    eps = [a for a in node.attribute if a.name == "epsilon"]
    plain = helper.make_node(depth.RESIDUAL_NORMS[node.op_type], [skip, *scale], [node.output[0]], name=node.name,
                             axis=-1)
    plain.attribute.extend(eps)
    if total and total in kept:
        raise SpaError(f"cannot erase unit '{node.output[0]}': its residual sum '{total}' is a graph output")
    node.CopyFrom(plain)
    if total:
        bypass[total] = skip


def _remove_io(vis, names: set) -> None:
    for vi in [vi for vi in vis if vi.name in names]:
        vis.remove(vi)
