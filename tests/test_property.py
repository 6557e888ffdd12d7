"""Property tests (the graph fuzzer): randomly composed conv graphs keep the oracles.

    input[1,3,8,8] -> (conv | depthwise | grouped conv | conv-transpose | bn | instance norm | act
                       | add | mul | channel scale | concat | split | slice | channel shuffle
                       | pool | pad + pool | SE gate)*
                   -> GlobalAveragePool -> Flatten -> (Gemm | MatMul -> Relu -> Gemm) -> output[1,10]

For any such graph, any random drop set in the zero-invariant groups gives a pruned model
whose outputs equal the zeroed original's, and a 0.5-ratio plan gives a valid model.

Seeded (derandomized): CI runs SPA_FUZZ_EXAMPLES cases per property (default 1,000 for the
zero-invariance oracle); `SPA_FUZZ_EXAMPLES=10000 pytest tests/test_property.py` is the long run
recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from spa.backends import ort as ort_backend

import spa
from spa import api
from tests.graphs import build, node, weight
from tests.oracles import assert_valid_output, assert_zero_invariance

OPS = ("conv", "depthwise", "grouped", "convT", "bn", "inorm", "act", "add", "mul", "scale", "concat", "split",
       "slice", "shuffle", "pool", "padpool", "se")


class _Net:
    """A random graph under construction: nodes, initializers, and (tensor, channels) so far."""

    def __init__(self):
        self.nodes, self.inits, self.tensors, self.n = [], [], [("x", 3)], 0

    def name(self, p):
        self.n += 1
        return f"{p}{self.n}"

    def conv(self, x, cin, cout, group=1, op="Conv"):
        y = self.name(op.lower())
        shape = (cin, cout // group) if op == "ConvTranspose" else (cout, cin // group)
        self.inits += [weight(f"{y}.w", *shape, 3, 3), weight(f"{y}.b", cout)]
        self.nodes.append(node(op, [x, f"{y}.w", f"{y}.b"], [y], kernel_shape=[3, 3], pads=[1] * 4, group=group))
        return y

    def unary(self, op, t, **attrs):
        y = self.name(op.lower())
        self.nodes.append(node(op, [t], [y], **attrs))
        return y

    def add(self, op, draw):
        t, c = draw(st.sampled_from(self.tensors[-3:]))
        for y, cy in getattr(self, f"op_{op}")(t, c, draw) or []:
            self.tensors.append((y, cy))

    def op_conv(self, t, c, draw):
        cout = draw(st.integers(2, 10))
        return [(self.conv(t, c, cout), cout)]

    def op_depthwise(self, t, c, draw):
        m = draw(st.integers(1, 2))
        return [(self.conv(t, c, c * m, group=c), c * m)]

    def op_grouped(self, t, c, draw):
        g = draw(st.sampled_from([d for d in (2, 3) if c % d == 0] or [1]))
        cout = g * draw(st.integers(1, 3))
        return [(self.conv(t, c, cout, group=g), cout)]

    def op_convT(self, t, c, draw):
        cout = draw(st.integers(2, 8))
        return [(self.conv(t, c, cout, op="ConvTranspose"), cout)]

    def op_bn(self, t, c, draw):
        y = self.name("bn")
        self.inits += [weight(f"{y}.{p}", c) for p in ("s", "b", "m")]
        self.inits.append(positive(weight(f"{y}.v", c)))
        self.nodes.append(node("BatchNormalization", [t] + [f"{y}.{p}" for p in "sbmv"], [y]))
        return [(y, c)]

    def op_inorm(self, t, c, draw):
        y = self.name("inorm")
        self.inits += [weight(f"{y}.s", c), weight(f"{y}.b", c)]
        self.nodes.append(node("InstanceNormalization", [t, f"{y}.s", f"{y}.b"], [y]))
        return [(y, c)]

    def op_act(self, t, c, draw):
        op = draw(st.sampled_from(["Relu", "Sigmoid", "LeakyRelu", "HardSwish", "Tanh", "Elu", "Softplus"]))
        return [(self.unary(op, t), c)]

    def _binary(self, op, t, c, draw):
        same = [u for u, cu in self.tensors if cu == c and u != t]
        if not same:
            return None
        y = self.name(op.lower())
        self.nodes.append(node(op, [t, draw(st.sampled_from(same))], [y]))
        return [(y, c)]

    def op_add(self, t, c, draw):
        return self._binary("Add", t, c, draw)

    def op_mul(self, t, c, draw):
        return self._binary("Mul", t, c, draw)

    def op_scale(self, t, c, draw):
        y = self.name("scale")
        self.inits.append(weight(f"{y}.k", 1, c, 1, 1))
        self.nodes.append(node(draw(st.sampled_from(["Mul", "Add"])), [t, f"{y}.k"], [y]))
        return [(y, c)]

    def op_concat(self, t, c, draw):
        u, cu = draw(st.sampled_from(self.tensors))
        y = self.name("cat")
        self.nodes.append(node("Concat", [t, u], [y], axis=1))
        return [(y, c + cu)]

    def op_split(self, t, c, draw):
        if c < 2:
            return None
        k = draw(st.integers(1, c - 1))
        a, b = self.name("split"), self.name("split")
        self.inits.append(ints(f"{a}.sizes", [k, c - k]))
        self.nodes.append(node("Split", [t, f"{a}.sizes"], [a, b], axis=1))
        return [(a, k), (b, c - k)]

    def op_slice(self, t, c, draw):
        if c < 2:
            return None
        lo = draw(st.integers(0, c - 2))
        hi = draw(st.integers(lo + 1, c))
        y = self.name("slice")
        self.inits += [ints(f"{y}.lo", [lo]), ints(f"{y}.hi", [hi]), ints(f"{y}.ax", [1])]
        self.nodes.append(node("Slice", [t, f"{y}.lo", f"{y}.hi", f"{y}.ax"], [y]))
        return [(y, hi - lo)]

    def op_shuffle(self, t, c, draw):
        g = draw(st.sampled_from([d for d in (2, 3) if c % d == 0 and c > d] or [0]))
        if not g:
            return None
        y = self.name("shuffle")
        self.inits += [ints(f"{y}.s5", [1, g, c // g, 8, 8]), ints(f"{y}.s4", [1, c, 8, 8])]
        self.nodes += [node("Reshape", [t, f"{y}.s5"], [f"{y}.r"]),
                       node("Transpose", [f"{y}.r"], [f"{y}.t"], perm=[0, 2, 1, 3, 4]),
                       node("Reshape", [f"{y}.t", f"{y}.s4"], [y])]
        return [(y, c)]

    def op_pool(self, t, c, draw):
        op = draw(st.sampled_from(["MaxPool", "AveragePool"]))
        return [(self.unary(op, t, kernel_shape=[3, 3], pads=[1] * 4), c)]

    def op_padpool(self, t, c, draw):
        y = self.name("pad")
        self.inits.append(ints(f"{y}.p", [0, 0, 1, 1, 0, 0, 1, 1]))
        self.nodes.append(node("Pad", [t, f"{y}.p"], [y], mode=draw(st.sampled_from(["constant", "reflect", "edge"]))))
        return [(self.unary("MaxPool", y, kernel_shape=[3, 3]), c)]

    def op_se(self, t, c, draw):
        gap, mid = self.unary("GlobalAveragePool", t), draw(st.integers(1, 4))
        e = self.conv(self.conv(gap, c, mid), mid, c)
        y = self.name("gate")
        self.nodes.append(node("Mul", [t, self.unary("Sigmoid", e)], [y]))
        return [(y, c)]

    def finish(self, hidden):
        t, c = self.tensors[-1]
        flat = self.unary("Flatten", self.unary("GlobalAveragePool", t))
        if hidden:
            self.inits.append(weight("mm.w", c, hidden))
            self.nodes.append(node("MatMul", [flat, "mm.w"], ["mm"]))
            flat, c = self.unary("Relu", "mm"), hidden
        self.inits += [weight("fc.w", 10, c), weight("fc.b", 10)]
        self.nodes.append(node("Gemm", [flat, "fc.w", "fc.b"], ["out"], transB=1))
        return build(self.nodes, {"x": [1, 3, 8, 8]}, {"out": [1, 10]}, self.inits)


def positive(t):
    return numpy_helper.from_array(np.abs(numpy_helper.to_array(t)) + 0.5, t.name)


def ints(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


@st.composite
def conv_graphs(draw):
    net = _Net()
    for op in draw(st.lists(st.sampled_from(OPS), min_size=2, max_size=9)):
        net.add(op, draw)
    return net.finish(draw(st.sampled_from([0, 0, 4, 12])))


EXAMPLES = int(os.environ.get("SPA_FUZZ_EXAMPLES", "1000"))
SETTINGS = {"deadline": None, "derandomize": True, "database": None, "suppress_health_check": list(HealthCheck)}


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(model=conv_graphs(), seed=st.integers(0, 1000))
def test_random_graphs_are_zero_invariant(model, seed):
    feeds = ort_backend.random_feeds(model.proto, seed=seed)
    assert_zero_invariance(model, feeds, seed=seed)


@settings(max_examples=max(EXAMPLES // 4, 50), **SETTINGS)
@given(model=conv_graphs(), ratio=st.sampled_from([0.0, 0.3, 0.5, 0.7]))
def test_random_graphs_prune_to_valid_models(model, ratio):
    analysis = spa.analyze(model)
    plan = api.make_plan(analysis, ratio)
    for gid, drop in plan.items():
        group = analysis.group(gid)
        assert 0 < len(drop) < group.size
    pruned = api.prune(analysis, plan)
    assert_valid_output(model, pruned, ort_backend.random_feeds(model.proto))
