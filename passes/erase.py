"""Erasure pass: remove whole residual branches (spa.core.depth's units).

    y = Add(x, f(x))  ─▶  y = x      consumers of y read x; f's nodes and weights removed

Requires: unit ids that spa.core.depth.find gives for the model (the Add's output names).
Ensures: graph inputs and outputs keep their names and shapes (a unit never writes a graph
output); the result passes the ONNX checker and runs in ONNX Runtime (checked with the rest of
the prune pass's result).
"""

from __future__ import annotations

import onnx
from onnx import helper
from spa.passes.base import remove_dead, subgraph_reads

from spa.core import depth
from spa.core.errors import SpaError


def erase(proto: onnx.ModelProto, ids: list[str]) -> onnx.ModelProto:
    """`proto` (changed in place and returned) without the branches of units `ids`."""
    graph = proto.graph
    bypass = {}
    for uid in ids:
        try:
            add, slot, _ = depth.locate(graph, uid)
        except KeyError:
            raise SpaError(f"cannot erase unit '{uid}': the model has no erasable unit of that name",
                           "take the ids from `spa analyze --json` (erasable) of this same model") from None
        bypass[uid] = graph.node[add].input[1 - slot]
    kept = {o.name for o in graph.output} | subgraph_reads(graph)
    for node in graph.node:
        if node.op_type == "Add" and node.output[0] in bypass:
            skip = bypass[node.output[0]]
            if node.output[0] in kept:  # a graph output or a subgraph's capture keeps its name
                node.CopyFrom(helper.make_node("Identity", [skip], [node.output[0]], name=node.name))
    for node in graph.node:
        for k, name in enumerate(node.input):
            while name in bypass and name not in kept:
                name = bypass[name]  # units in a row: y2 = y1 = x
            node.input[k] = name
    remove_dead(proto)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    stale = [vi for vi in graph.value_info if vi.name not in used and vi.name not in
             {o for n in graph.node for o in n.output}]
    for vi in stale:
        graph.value_info.remove(vi)
    return proto

