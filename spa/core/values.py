"""Parameter values edited in a copy: zeroing planned channels, replacing initializers.

    model ─zeroed(plan)─▶ the same graph, every member slice of the planned channels at 0
    (oracle 1: removing those channels must give the same outputs)"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from spa.core.analysis import Analysis
from spa.core.model import CONSTANT_OPS


def zeroed(analysis: Analysis, plan: dict, values: dict | None = None) -> onnx.ModelProto:
    """The original model with every member slice of the planned channels set to zero
    (`values`: arrays that replace some parameters first, e.g. compensated weights)."""
    return with_values(analysis.model.proto, zeroed_values(analysis, plan, values))


def zeroed_values(analysis: Analysis, plan: dict, values: dict | None = None) -> dict:
    """{member tensor: its value (or `values`' array) with the planned channels' slices zeroed}."""
    values = {k: np.array(v) for k, v in (values or {}).items()}
    for gid, channels in plan.items():
        for m in analysis.group(gid).members:
            arr = values.setdefault(m.tensor, np.array(analysis.index.value(m.tensor)))
            for c in channels:
                idx = [slice(None)] * arr.ndim
                idx[m.axis] = np.asarray(m.positions[c])
                arr[tuple(idx)] = 0
    return values


def with_values(source: onnx.ModelProto, values: dict) -> onnx.ModelProto:
    """A copy of `source` whose initializers/Constant nodes named in `values` hold those arrays."""
    proto = onnx.ModelProto()
    proto.CopyFrom(source)
    for t in proto.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(values[t.name], t.name))
    for node in proto.graph.node:
        if node.op_type in CONSTANT_OPS and node.output[0] in values:
            node.op_type = "Constant"
            del node.input[:]
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(values[node.output[0]])))
    return proto
