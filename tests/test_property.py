"""Property tests: randomly composed conv graphs keep the oracles.

    input[1,3,8,8] -> (conv | depthwise | grouped conv | bn | act | add | concat | split | SE gate)*
                   -> GlobalAveragePool -> Flatten -> Gemm -> output[1,10]

For any such graph, any random drop set in the zero-invariant groups gives a pruned model
whose outputs equal the zeroed original's, and a 0.5-ratio plan gives a valid model.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spa.backends import ort as ort_backend

import spa
from spa import api
from tests.graphs import build, node, weight
from tests.oracles import assert_valid_output, assert_zero_invariance

OPS = ("conv", "depthwise", "grouped", "bn", "act", "add", "concat", "split", "se")


class _Net:
    def __init__(self):
        self.nodes, self.inits, self.tensors, self.n = [], [], [("x", 3)], 0

    def name(self, p):
        self.n += 1
        return f"{p}{self.n}"

    def conv(self, x, cin, cout, group=1):
        y = self.name("conv")
        self.inits += [weight(f"{y}.w", cout, cin // group, 3, 3), weight(f"{y}.b", cout)]
        self.nodes.append(node("Conv", [x, f"{y}.w", f"{y}.b"], [y], kernel_shape=[3, 3], pads=[1] * 4, group=group))
        return y

    def add(self, op, draw):
        t, c = draw(st.sampled_from(self.tensors[-3:]))
        if op == "conv":
            out = [(self.conv(t, c, draw(st.integers(2, 10))), None)]
        elif op == "depthwise":
            m = draw(st.integers(1, 2))
            out = [(self.conv(t, c, c * m, group=c), c * m)]
        elif op == "grouped":
            g = draw(st.sampled_from([d for d in (2, 3) if c % d == 0] or [1]))
            out = [(self.conv(t, c, g * draw(st.integers(1, 3)), group=g), None)]
        elif op == "bn":
            y = self.name("bn")
            self.inits += [weight(f"{y}.{p}", c) for p in ("s", "b", "m")]
            self.inits.append(spa_abs(weight(f"{y}.v", c)))
            self.nodes.append(node("BatchNormalization", [t] + [f"{y}.{p}" for p in "sbmv"], [y]))
            out = [(y, c)]
        elif op == "act":
            y = self.name("act")
            self.nodes.append(node(draw(st.sampled_from(["Relu", "Sigmoid", "LeakyRelu", "HardSwish", "Tanh"])), [t], [y]))
            out = [(y, c)]
        elif op == "add":
            same = [u for u, cu in self.tensors if cu == c and u != t]
            if not same:
                return
            y = self.name("add")
            self.nodes.append(node("Add", [t, draw(st.sampled_from(same))], [y]))
            out = [(y, c)]
        elif op == "concat":
            u, cu = draw(st.sampled_from(self.tensors))
            y = self.name("cat")
            self.nodes.append(node("Concat", [t, u], [y], axis=1))
            out = [(y, c + cu)]
        elif op == "split":
            if c < 2:
                return
            k = draw(st.integers(1, c - 1))
            a, b = self.name("split"), self.name("split")
            self.inits.append(spa_i64(f"{a}.sizes", [k, c - k]))
            self.nodes.append(node("Split", [t, f"{a}.sizes"], [a, b], axis=1))
            out = [(a, k), (b, c - k)]
        else:  # squeeze-excitation gate
            gap, mid = self.name("gap"), draw(st.integers(1, 4))
            self.nodes.append(node("GlobalAveragePool", [t], [gap]))
            r = self.conv(gap, c, mid)
            e = self.conv(r, mid, c)
            s, y = self.name("sig"), self.name("gate")
            self.nodes += [node("Sigmoid", [e], [s]), node("Mul", [t, s], [y])]
            out = [(y, c)]
        for y, cy in out:
            self.tensors.append((y, cy if cy is not None else _conv_out(self, y)))

    def finish(self):
        t, c = self.tensors[-1]
        self.nodes += [node("GlobalAveragePool", [t], ["gap_out"]), node("Flatten", ["gap_out"], ["flat"])]
        self.inits += [weight("fc.w", 10, c), weight("fc.b", 10)]
        self.nodes.append(node("Gemm", ["flat", "fc.w", "fc.b"], ["out"], transB=1))
        return build(self.nodes, {"x": [1, 3, 8, 8]}, {"out": [1, 10]}, self.inits)


def _conv_out(net, y):
    return next(int(i.dims[0]) for i in net.inits if i.name == f"{y}.w")


def spa_abs(t):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.abs(numpy_helper.to_array(t)) + 0.5, t.name)


def spa_i64(name, values):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


@st.composite
def conv_graphs(draw):
    net = _Net()
    for op in draw(st.lists(st.sampled_from(OPS), min_size=2, max_size=9)):
        net.add(op, draw)
    return net.finish()


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(model=conv_graphs(), seed=st.integers(0, 1000))
def test_random_graphs_are_zero_invariant(model, seed):
    feeds = ort_backend.random_feeds(model.proto, seed=seed)
    assert_zero_invariance(model, feeds, seed=seed)


@SETTINGS
@given(model=conv_graphs(), ratio=st.sampled_from([0.0, 0.3, 0.5, 0.7]))
def test_random_graphs_prune_to_valid_models(model, ratio):
    analysis = spa.analyze(model)
    plan = api.make_plan(analysis, ratio)
    for gid, drop in plan.items():
        group = analysis.group(gid)
        assert 0 < len(drop) < group.size
    pruned = api.prune(analysis, plan)
    assert_valid_output(model, pruned, ort_backend.random_feeds(model.proto))
