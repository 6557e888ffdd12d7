"""spa.torch: an ONNX graph executed by torch ops, differentiable, trainable, and written back.

    proto ──OnnxModule(proto)──▶ nn.Module (initializers: nn.Parameter, the rest: buffers)
          ──train──▶ write_back(proto, module) ──▶ the SAME graph with the trained values

Nothing is re-exported: nodes, names, dynamic axes and opset stay exactly as they were; only
initializer values change. Every node runs through a function of spa.torch.ops keyed by
(domain, op_type); an op without one fails at construction with `UnsupportedOp` naming it.

Precision: `module.to(torch.float16)` (or bfloat16) converts the float parameters; float
inputs and every Cast to a float type then follow the module's float dtype, so a float32 graph
runs end to end in half precision. Integer tensors (shapes, indices) stay int64.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from spa.core.errors import SpaError, first_line
from spa.core.model import Model, load
from spa.core.values import with_values
from spa.torch import ops as _ops
from spa.torch import ops_extra  # noqa: F401 - registers the extra operators in ops' table

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


class UnsupportedOp(SpaError):
    """A node whose op spa.torch cannot execute."""


@dataclass
class Node:
    op: str
    domain: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict
    fn: object
    graphs: dict = field(default_factory=dict)  # attribute name -> Graph (If/Loop/Scan bodies)
    free: list = field(default_factory=list)  # values read here for the last time (dropped after)


@dataclass
class Graph:
    nodes: list[Node]
    inputs: list[str]
    outputs: list[str]
    # last node index that reads each value (values are freed after it: activation memory
    # stays at what autograd keeps, not every intermediate)
    last_use: dict = field(default_factory=dict)


def _safe(name: str, taken: set) -> str:
    key = re.sub(r"\W", "_", name) or "_"
    if key[0].isdigit():
        key = "_" + key
    base, i = key, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    taken.add(key)
    return key


class Context:
    """What an op function sees besides its inputs: attributes, the opset, the float dtype,
    and a way to run its subgraphs."""

    def __init__(self, module: OnnxModule, node: Node, env: dict):
        self.module, self.node, self.env = module, node, env
        self.opset = module.opsets.get(node.domain or "", module.opsets.get("", 17))

    @property
    def attrs(self) -> dict:
        return self.node.attrs

    def attr(self, name: str, default=None):
        return self.node.attrs.get(name, default)

    @property
    def float_dtype(self) -> torch.dtype:
        """float32 for a graph run at its own precision, else the precision it was cast to."""
        return self.module.float_dtype

    def dtype_of(self, onnx_type: int) -> torch.dtype:
        """torch dtype for an ONNX element type; float types follow a module cast with .to(dtype)."""
        if onnx_type in FLOAT_TYPES and self.module.cast_to is not None:
            return self.module.cast_to
        return _ops.TORCH_DTYPES[onnx_type]

    def run_subgraph(self, attr: str, feeds: list) -> list:
        graph = self.node.graphs[attr]
        env = dict(self.env)  # outer scope values stay visible
        env.update(zip(graph.inputs, feeds))
        return self.module._run(graph, env)


class OnnxModule(nn.Module):
    """`proto` as a torch module: `module(*inputs)` or `module.run({name: tensor})`.

    `trainable`: which float initializers become nn.Parameter (default: all of them); the
    others and every non-float initializer are buffers. Constant nodes stay constants."""

    def __init__(self, proto: onnx.ModelProto, trainable=None):
        super().__init__()
        self.opsets = {o.domain or "": o.version for o in proto.opset_import}
        self.cast_to = None  # the float dtype of .to(dtype); None: every tensor keeps its ONNX type
        self._device = torch.device("cpu")
        self.keys: dict[str, str] = {}  # ONNX initializer name -> parameter/buffer attribute
        self.source_dtypes: dict[str, np.dtype] = {}
        self.params = nn.ParameterDict()
        self._taken = {"params"}
        init_names = set()
        for graph in _graphs(proto.graph):
            for t in graph.initializer:
                if t.name in init_names:
                    continue
                init_names.add(t.name)
                arr = numpy_helper.to_array(t)
                self.source_dtypes[t.name] = arr.dtype
                key = _safe(t.name, self._taken)
                self.keys[t.name] = key
                tensor = _ops.to_tensor(arr)
                if tensor.is_floating_point() and (trainable is None or t.name in trainable):
                    self.params[key] = nn.Parameter(tensor)
                else:
                    self.register_buffer("b_" + key, tensor)
        self.input_names = [i.name for i in proto.graph.input if i.name not in init_names]
        self.output_names = [o.name for o in proto.graph.output]
        self.input_types = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
        self.graph = self._build(proto.graph)
        # the float dtype every parameter and buffer had in the ONNX file (.to(dtype) is seen against it)
        self._float_sources = {k: t.dtype for k, t in self.state_dict(keep_vars=True).items() if t.is_floating_point()}

    # -- construction --------------------------------------------------------------------
    def _build(self, graph: onnx.GraphProto) -> Graph:
        nodes, missing = [], []
        for n in graph.node:
            key = (n.domain if n.domain not in ("", "ai.onnx") else "", n.op_type)
            fn = _ops.OPS.get(key)
            if fn is None:
                missing.append(f"{key[0] + '::' if key[0] else ''}{n.op_type}")
                continue
            attrs, graphs = {}, {}
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    graphs[a.name] = self._build(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    raise UnsupportedOp(f"node '{n.name}' ({n.op_type}) has a list of subgraphs, "
                                        "which spa.torch does not run")
                else:
                    value = helper.get_attribute_value(a)
                    if isinstance(value, bytes):  # STRING attributes: str, as the spec writes them
                        value = value.decode()
                    elif isinstance(value, list) and value and isinstance(value[0], bytes):
                        value = [v.decode() for v in value]
                    attrs[a.name] = value
            if "value" in attrs and isinstance(attrs["value"], onnx.TensorProto):
                attrs["value"] = _ops.to_tensor(numpy_helper.to_array(attrs["value"]))
                if n.op_type == "Constant":  # a buffer, so .to(device/dtype) moves it once
                    attrs["buffer"] = "k_" + _safe(n.output[0], self._taken)
                    self.register_buffer(attrs["buffer"], attrs.pop("value"))
            nodes.append(Node(n.op_type, key[0], n.name, list(n.input), list(n.output), attrs, fn, graphs))
        if missing:
            names = ", ".join(sorted(set(missing)))
            raise UnsupportedOp(f"spa.torch cannot run op(s) {names}",
                                "open an issue with the model, or run it in ONNX Runtime instead")
        g = Graph(nodes, [i.name for i in graph.input], [o.name for o in graph.output])
        for i, n in enumerate(nodes):
            for name in n.inputs:
                g.last_use[name] = i
            for sub in n.graphs.values():  # a subgraph may read any outer value
                for name in _outer_reads(sub):
                    g.last_use[name] = i
        for name in g.outputs:
            g.last_use[name] = len(nodes)
        keep = set(g.outputs) | set(g.inputs)
        for i, n in enumerate(nodes):
            n.free = [x for x in dict.fromkeys(n.inputs)
                      if x and g.last_use.get(x) == i and x not in keep and x not in self.keys]
        return g

    # -- values --------------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        """The parameter or buffer holding initializer `name`."""
        key = self.keys[name]
        return self.params[key] if key in self.params else getattr(self, "b_" + key)

    def named_initializers(self):
        """(ONNX name, tensor) of every initializer."""
        for name in self.keys:
            yield name, self.tensor(name)

    def values(self) -> dict[str, np.ndarray]:
        """{initializer name: array in its original ONNX dtype} of the current values."""
        out = {}
        for name, t in self.named_initializers():
            out[name] = t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype).numpy() \
                .astype(self.source_dtypes[name], copy=False)
        return out

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.cast_to = None
        self._device = next((t.device for t in self.state_dict(keep_vars=True).values()), torch.device("cpu"))
        for key, t in self.state_dict(keep_vars=True).items():
            if t.is_floating_point() and t.dtype != self._float_sources.get(key, t.dtype):
                self.cast_to = t.dtype
                break
        return out

    @property
    def float_dtype(self) -> torch.dtype:
        return self.cast_to or torch.float32

    @property
    def device(self) -> torch.device:
        """Where the parameters live (kept by _apply: ops ask for it on every call)."""
        return self._device

    # -- running -------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        feeds = dict(zip(self.input_names, args))
        feeds.update(kwargs)
        out = self.run(feeds)
        values = [out[n] for n in self.output_names]
        return values[0] if len(values) == 1 else tuple(values)

    def run(self, feeds: dict) -> dict:
        """{output name: tensor} for {input name: tensor or array}."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise SpaError(f"missing model input(s) {missing}", f"the model's inputs are {self.input_names}")
        env = {name: t for name, t in self.named_initializers()}
        device = self.device
        for name, value in feeds.items():
            t = value if isinstance(value, torch.Tensor) else _ops.to_tensor(np.asarray(value))
            if t.is_floating_point():
                declared = self.input_types.get(name)
                t = t.to(self.cast_to or _ops.TORCH_DTYPES.get(declared, t.dtype))
            env[name] = t.to(device)
        outs = self._run(self.graph, env)
        return dict(zip(self.output_names, outs))

    def _run(self, graph: Graph, env: dict) -> list:
        for node in graph.nodes:
            args = [env[n] if n else None for n in node.inputs]
            try:
                result = node.fn(Context(self, node, env), *args)
            except SpaError:
                raise
            except Exception as exc:
                raise SpaError(f"node '{node.name}' ({node.op}) failed in spa.torch: "
                               f"{type(exc).__name__}: {first_line(exc)}") from exc
            if not isinstance(result, (tuple, list)) or node.op in _ops.RETURNS_LIST:
                result = (result,)
            for name, value in zip(node.outputs, result):
                if name:
                    env[name] = value
            for name in node.free:
                env.pop(name, None)
        return [env[n] for n in graph.outputs]


def _graphs(graph: onnx.GraphProto):
    yield graph
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)


def _outer_reads(graph: Graph) -> set:
    made = set(graph.inputs)
    reads = set()
    for n in graph.nodes:
        reads.update(x for x in n.inputs if x and x not in made)
        made.update(n.outputs)
        for sub in n.graphs.values():
            reads.update(x for x in _outer_reads(sub) if x not in made)
    return reads


def to_torch(model, trainable=None) -> OnnxModule:
    """An OnnxModule of a spa.Model, a ModelProto or a path."""
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        model = load(model, infer=False)
    proto = model.proto if isinstance(model, Model) else model
    return OnnxModule(proto, trainable)


def write_back(proto: onnx.ModelProto, module: OnnxModule) -> onnx.ModelProto:
    """A copy of `proto` with the module's current initializer values (original dtypes); the
    graph, names, shapes and dynamic axes are untouched."""
    return with_values(proto, module.values())


__all__ = ["OnnxModule", "UnsupportedOp", "to_torch", "write_back"]
