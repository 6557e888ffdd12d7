"""Tiny ONNX graphs built in code, for rule and pass tests (onnx-graphsurgeon style)."""

from __future__ import annotations

import zlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.core.model import Model, infer_shapes


def weight(name: str, *shape: int, seed: int = 0, dtype=np.float32) -> onnx.TensorProto:
    """A random initializer (values away from zero so zeroing is visible)."""
    rng = np.random.default_rng([zlib.crc32(name.encode()), *shape, seed])  # same in every process
    return numpy_helper.from_array((rng.standard_normal(shape) + 0.1).astype(dtype), name)


def const(name: str, values, dtype=np.int64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def build(nodes, inputs: dict, outputs: dict, inits=(), opset: int = 17, dtype=TensorProto.FLOAT) -> Model:
    """Model from nodes; `inputs`/`outputs` map names to shapes (None entries are dynamic).

    Output shapes may be None (left to inference)."""
    def vi(name, shape):
        dims = None if shape is None else [d if d is not None else "N" for d in shape]
        return helper.make_tensor_value_info(name, dtype, dims)

    graph = helper.make_graph(list(nodes), "g", [vi(n, s) for n, s in inputs.items()],
                              [vi(n, s) for n, s in outputs.items()], list(inits))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    model = Model(proto)
    infer_shapes(model)
    return model


def node(op, inputs, outputs, name=None, **attrs):
    return helper.make_node(op, inputs, outputs, name=name or outputs[0], **attrs)


def conv_relu(x, y, cin, cout, k=3, group=1, prefix=None):
    """x -> Conv(W, B) -> Relu -> y, with its initializers."""
    p = prefix or y
    nodes = [node("Conv", [x, f"{p}.w", f"{p}.b"], [f"{p}.c"], kernel_shape=[k, k], pads=[k // 2] * 4, group=group),
             node("Relu", [f"{p}.c"], [y])]
    return nodes, [weight(f"{p}.w", cout, cin // group, k, k), weight(f"{p}.b", cout)]


def analyze(model: Model):
    return spa.analyze(model)
