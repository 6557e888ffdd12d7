"""One unit test per coupling rule (spa.rules), each on a tiny graph built in code.

Every test states the groups `spa.analyze` must find (members, sizes, prunable or the
reason, zero-invariance) and then runs the oracles of DESIGN.md on the same graph:
random drop sets pruned == zeroed original in ONNX Runtime, and ratio 0 is the identity.
Rules with a rewriter also check the rewritten attribute or shape constant.

`RULE_TESTS` maps every rule function in `spa.rules.RULES` to the tests that cover it;
`test_every_rule_has_a_test` fails when a new rule arrives without one.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from spa.backends import ort as ort_backend

import spa
from spa import api
from spa.core.rules import REWRITERS, RULES
from tests import graphs
from tests.graphs import const, conv_relu, node, weight
from tests.oracles import assert_identity_at_ratio_zero, assert_zero_invariance

# ---------------------------------------------------------------- helpers


def build(nodes, inputs, outputs, inits=(), opset=17):
    """tests.graphs.build, with `None` output shapes filled in by ONNX shape inference
    (the checker in graphs.build rejects an output without a shape)."""
    if any(s is None for s in outputs.values()):
        vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs]
        ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [d if d else "N" for d in s])
               for n, s in inputs.items()]
        proto = helper.make_model(helper.make_graph(list(nodes), "g", ins, vi, list(inits)),
                                  opset_imports=[helper.make_opsetid("", opset)])
        inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(proto).graph.output}
        outputs = {n: s if s is not None else [d.dim_value or None for d in inferred[n].type.tensor_type.shape.dim]
                   for n, s in outputs.items()}
    return graphs.build(nodes, inputs, outputs, inits, opset=opset)


def fconst(name, values):
    """A float32 initializer with the given values."""
    return const(name, values, dtype=np.float32)


def conv(x, y, cin, cout, k=1, group=1, prefix=None, **attrs):
    """x -> Conv(W, B) -> y (no activation), with its initializers."""
    p = prefix or y
    kernel = [k] * attrs.pop("dims", 2)
    n = node("Conv", [x, f"{p}.w", f"{p}.b"], [y], name=p, kernel_shape=kernel, pads=[k // 2] * 2 * len(kernel),
             group=group, **attrs)
    return [n], [weight(f"{p}.w", cout, cin // group, *kernel), weight(f"{p}.b", cout)]


def analyze(model):
    """spa.analyze, checking that group ids are stable (same model, reloaded) and name one
    of their members, and that every member has one entry per channel."""
    a = spa.analyze(model)
    again = spa.analyze(api.reinfer(onnx.load_from_string(model.proto.SerializeToString())))
    assert [(g.id, g.size) for g in again.groups] == [(g.id, g.size) for g in a.groups]
    for g in a.groups:
        assert g.id.split("#")[0] in {f"{t}:{k}" for t, k in g.positions}, g.id
        assert all(len(m.indices) == g.size for m in g.members), g.id
    return a


def _flat(ix):
    return [ix] if isinstance(ix, int) else list(ix)


def group_of(a, tensor, axis, pos=None):
    """The one group with member (tensor, axis) [whose indices contain position `pos`]."""
    found = []
    for g in a.groups:
        for m in g.members:
            if (m.tensor, m.axis) == (tensor, axis) and (pos is None or any(pos in _flat(i) for i in m.indices)):
                found.append(g)
    assert len(found) == 1, f"{len(found)} groups with member {tensor}:{axis} (pos {pos}): {[g.id for g in found]}"
    return found[0]


def members(g) -> dict:
    return {(m.tensor, m.axis): m.indices for m in g.members}


def expect(g, size, members_=None, prunable=True, reason=None, zi=True, zi_reason=None):
    """Assert one group's facts; `members_` maps (tensor, axis) to indices (None: any)."""
    assert g.size == size, (g.id, g.size)
    if members_ is not None:
        got = members(g)
        assert set(got) == set(members_), (g.id, sorted(got))
        for key, ix in members_.items():
            if ix is not None:
                assert got[key] == ix, (g.id, key, got[key])
    assert g.prunable is prunable, (g.id, g.reason)
    if prunable:
        assert g.reason is None
    else:
        assert g.reason and reason in g.reason, (g.id, g.reason)
    if zi is not None:
        assert g.zero_invariant is zi, (g.id, g.zi_reason)
    if zi_reason is not None:
        assert g.zi_reason and zi_reason in g.zi_reason, (g.id, g.zi_reason)


def ident(n):
    return list(range(n))


def oracles(model, a=None) -> dict:
    """Both oracles on random feeds; returns the drop plan (asserted non-empty where a
    prunable zero-invariant group exists, so the zero-invariance check is never vacuous)."""
    feeds = ort_backend.random_feeds(model.proto)
    plan = assert_zero_invariance(model, feeds)
    assert_identity_at_ratio_zero(model, feeds)
    a = a or spa.analyze(model)
    assert set(plan) == {g.id for g in a.groups if g.prunable and g.zero_invariant}
    return plan


def prune(a, plan):
    """The pruned ModelProto (spa.api.prune: the ONNX checker passed on it)."""
    return api.prune(a, plan)


def value(proto, name):
    for t in proto.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    raise KeyError(name)


def find_node(proto, name):
    return next(n for n in proto.graph.node if n.name == name)


def get_attr(n, name, default=None):
    for at in n.attribute:
        if at.name == name:
            return helper.get_attribute_value(at)
    return default


def input_value(proto, node_name, idx):
    return value(proto, find_node(proto, node_name).input[idx])


def build_typed(nodes, inputs, outputs, inits=(), opset=17, domains=(), value_info=None):
    """A Model whose inputs/outputs/value_info are {name: (elem_type, shape)} (graphs.build has one dtype)."""
    def vi(name, spec):
        return helper.make_tensor_value_info(name, spec[0], spec[1])

    graph = helper.make_graph(list(nodes), "g", [vi(n, t) for n, t in inputs.items()],
                              [vi(n, t) for n, t in outputs.items()], list(inits),
                              value_info=[vi(n, t) for n, t in (value_info or {}).items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)] +
                              [helper.make_opsetid(d, 1) for d in domains])
    proto.ir_version = 8
    if any(spec[1] is None for spec in outputs.values()):  # output shapes left to ONNX inference
        inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(proto).graph.output}
        for o in proto.graph.output:
            o.CopyFrom(inferred[o.name])
    onnx.checker.check_model(proto, full_check=not domains)
    m = spa.Model(proto)
    spa.core.model.infer_shapes(m)
    return m


def chain(mid_nodes, mid_inits, mid_in, mid_out, cin=8, cout=8, x_shape=(1, 3, 6, 6), out_shape=None, opset=17,
          extra_inputs=None, extra_outputs=None):
    """x -> c1 (Conv 3->cin, Relu) -> mid_in ... mid_out (cout channels) -> c2 (Conv ->2) -> y."""
    n1, i1 = conv_relu("x", mid_in, x_shape[1], cin, k=1, prefix="c1")
    n2, i2 = conv(mid_out, "y", cout, 2, prefix="c2", dims=len(x_shape) - 2)
    inputs = {"x": list(x_shape), **(extra_inputs or {})}
    outputs = {"y": out_shape, **(extra_outputs or {})}
    return build(n1 + list(mid_nodes) + n2, inputs, outputs, i1 + list(mid_inits) + i2, opset=opset)


# ---------------------------------------------------------------- Conv / ConvTranspose


@pytest.mark.parametrize("case", ["k3", "dilated", "strided", "1d", "3d", "no_bias"])
def test_conv(case):
    """Plain convolutions: output channels are weight rows, inputs are weight columns.

        x[1,3,..] -> Conv c1 (W[8,3,..], B[8]) -> Relu -> h[1,8,..] -> Conv c2 (W[4,8,..], B[4]) -> y

    Group c1.w:0 (8): c1.w rows, c1.b, c2.w columns. c1.w columns: model input.
    c2's rows: model output.
    """
    dims = {"1d": 1, "3d": 3}.get(case, 2)
    spatial = {"1d": [16], "3d": [4, 6, 6]}.get(case, [8, 8])
    k = 3
    extra = {"dilated": {"dilations": [2, 2], "pads": [2, 2, 2, 2]}, "strided": {"strides": [2, 2]}}.get(case, {})
    kernel = [k] * dims
    c1_in = ["x", "c1.w"] if case == "no_bias" else ["x", "c1.w", "c1.b"]
    nodes = [node("Conv", c1_in, ["c1.c"], kernel_shape=kernel, **{"pads": [1] * 2 * dims, **extra}),
             node("Relu", ["c1.c"], ["h"]),
             node("Conv", ["h", "c2.w", "c2.b"], ["y"], name="c2", kernel_shape=kernel, pads=[1] * 2 * dims)]
    inits = [weight("c1.w", 8, 3, *kernel), weight("c1.b", 8), weight("c2.w", 4, 8, *kernel), weight("c2.b", 4)]
    if case == "no_bias":
        inits.pop(1)
    m = build(nodes, {"x": [1, 3, *spatial]}, {"y": None}, inits)
    a = analyze(m)
    c1 = {("c1.w", 0): ident(8), ("c2.w", 1): ident(8)}
    if case != "no_bias":
        c1[("c1.b", 0)] = ident(8)
    expect(group_of(a, "c1.w", 0), 8, c1)
    expect(group_of(a, "c1.w", 1), 3, {("c1.w", 1): ident(3)}, prunable=False, reason="model input 'x'")
    expect(group_of(a, "c2.w", 0), 4, {("c2.w", 0): ident(4), ("c2.b", 0): ident(4)}, prunable=False,
           reason="model output 'y'")
    assert len(a.groups) == 3 and a.barriers == []
    plan = oracles(m, a)
    proto = prune(a, plan)
    kept = 8 - len(plan[group_of(a, "c1.w", 0).id])
    assert value(proto, "c1.w").shape == (kept, 3, *kernel)
    assert value(proto, "c2.w").shape == (4, kept, *kernel)


@pytest.mark.parametrize("mult", [1, 2, 3])
def test_conv_depthwise(mult):
    """Depthwise conv (group == C) with channel multiplier `mult`: whole groups go.

        x -> c1 (3->4, Relu) -> h[4] -> dw (Conv group=4, W[4*mult,1,3,3]) -> Relu -> d[4*mult] -> c2 (->2) -> y

    One group of 4: c1 rows, dw rows in blocks of `mult`, c2 columns in blocks of `mult`;
    the pruned dw has group = kept channels.
    """
    n1, i1 = conv_relu("x", "h", 3, 4, k=1, prefix="c1")
    n2, i2 = conv_relu("h", "d", 4, 4 * mult, k=3, group=4, prefix="dw")
    n3, i3 = conv("d", "y", 4 * mult, 2, prefix="c2")
    m = build(n1 + n2 + n3, {"x": [1, 3, 6, 6]}, {"y": None}, i1 + i2 + i3)
    a = analyze(m)
    blocks = [i if mult == 1 else list(range(i * mult, (i + 1) * mult)) for i in range(4)]
    g = group_of(a, "c1.w", 0)
    expect(g, 4, {("c1.w", 0): ident(4), ("c1.b", 0): ident(4), ("dw.w", 0): blocks, ("dw.b", 0): blocks,
                  ("c2.w", 1): blocks})
    assert [x.id for x in a.groups if x.prunable] == [g.id]  # dw.w axis 1 has size 1: nothing else
    oracles(m, a)
    proto = prune(a, {g.id: [1, 3]})
    assert get_attr(find_node(proto, "dw.c"), "group") == 2
    assert value(proto, "dw.w").shape == (2 * mult, 1, 3, 3)
    assert value(proto, "c2.w").shape == (2, 2 * mult, 1, 1)
    kept = [b for i in (0, 2) for b in _flat(blocks[i])]
    np.testing.assert_array_equal(value(proto, "dw.b"), value(m.proto, "dw.b")[kept])


@pytest.mark.parametrize("groups", [2, 4])
def test_conv_grouped(groups):
    """Grouped conv (1 < group < C): the same slot of every group goes, `group` is kept.

        x -> c1 (3->8, Relu) -> h[8] -> gc (Conv group=g, W[8,8/g,3,3]) -> Relu -> d[8] -> c2 (->2) -> y

    c1's group has 8/g channels, channel i = positions {i, i+8/g, ..} of h; gc.w column i.
    gc's output group likewise over gc.w rows, gc.b and c2 columns.
    """
    n1, i1 = conv_relu("x", "h", 3, 8, k=1, prefix="c1")
    n2, i2 = conv_relu("h", "d", 8, 8, k=3, group=groups, prefix="gc")
    n3, i3 = conv("d", "y", 8, 2, prefix="c2")
    m = build(n1 + n2 + n3, {"x": [1, 3, 6, 6]}, {"y": None}, i1 + i2 + i3)
    a = analyze(m)
    per = 8 // groups
    slots = [[i + k * per for k in range(groups)] for i in range(per)]
    expect(group_of(a, "c1.w", 0), per, {("c1.w", 0): slots, ("c1.b", 0): slots, ("gc.w", 1): ident(per)})
    expect(group_of(a, "gc.w", 0), per, {("gc.w", 0): slots, ("gc.b", 0): slots, ("c2.w", 1): slots})
    oracles(m, a)
    proto = prune(a, {group_of(a, "c1.w", 0).id: [0], group_of(a, "gc.w", 0).id: [per - 1]})
    assert get_attr(find_node(proto, "gc.c"), "group") == groups
    assert value(proto, "gc.w").shape == (8 - groups, per - 1, 3, 3)
    assert value(proto, "c1.w").shape == (8 - groups, 3, 1, 1)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_conv_transpose(groups):
    """ConvTranspose: W[C_in, M/g, k, k], i.e. the axes of Conv's W swapped.

        x -> c1 (3->8, Relu) -> h[8] -> ct (ConvTranspose group=g, stride 2, W[8, 8/g, 2, 2], B[8])
          -> Relu -> u[8] -> c2 (->2) -> y

    g=1: c1's group holds ct.w rows; ct's group holds ct.w columns, ct.b, c2 columns.
    g=2: slots modulo the group width on both sides (ct.w columns in the middle).
    g=8 (depthwise): one group through ct, `group` rewritten.
    """
    n1, i1 = conv_relu("x", "h", 3, 8, k=1, prefix="c1")
    ct = node("ConvTranspose", ["h", "ct.w", "ct.b"], ["ct.c"], kernel_shape=[2, 2], strides=[2, 2], group=groups)
    n3, i3 = conv("u", "y", 8, 2, prefix="c2")
    inits = i1 + [weight("ct.w", 8, 8 // groups, 2, 2), weight("ct.b", 8)] + i3
    m = build(n1 + [ct, node("Relu", ["ct.c"], ["u"])] + n3, {"x": [1, 3, 4, 4]}, {"y": None}, inits)
    a = analyze(m)
    if groups == 1:
        expect(group_of(a, "c1.w", 0), 8, {("c1.w", 0): ident(8), ("c1.b", 0): ident(8), ("ct.w", 0): ident(8)})
        expect(group_of(a, "ct.w", 1), 8, {("ct.w", 1): ident(8), ("ct.b", 0): ident(8), ("c2.w", 1): ident(8)})
    elif groups == 2:
        slots = [[i, i + 4] for i in range(4)]
        expect(group_of(a, "c1.w", 0), 4, {("c1.w", 0): slots, ("c1.b", 0): slots, ("ct.w", 0): slots})
        expect(group_of(a, "ct.w", 1), 4, {("ct.w", 1): ident(4), ("ct.b", 0): slots, ("c2.w", 1): slots})
    else:
        expect(group_of(a, "c1.w", 0), 8, {("c1.w", 0): ident(8), ("c1.b", 0): ident(8), ("ct.w", 0): ident(8),
                                           ("ct.b", 0): ident(8), ("c2.w", 1): ident(8)})
    plan = oracles(m, a)
    proto = prune(a, plan)
    if groups == 8:
        kept = 8 - len(plan[group_of(a, "c1.w", 0).id])
        assert get_attr(find_node(proto, "ct.c"), "group") == kept
        assert value(proto, "ct.w").shape == (kept, 1, 2, 2)
    else:
        assert get_attr(find_node(proto, "ct.c"), "group") == groups


# ---------------------------------------------------------------- Gemm / MatMul


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", ["1d", "2d"])
def test_gemm(trans_b, bias_shape):
    """Gemm's contracted axis couples A's columns with B's K axis; B's N axis is the output.

        x[2,6] -> g1 (Gemm W1, b1; transB) -> Relu -> h[2,8] -> g2 (Gemm W2, b2; transB) -> y[2,4]

    Group of 8: W1's N axis (0 when transB else 1), b1, W2's K axis (1 when transB else 0).
    """
    def w(name, k, n):
        return weight(name, n, k) if trans_b else weight(name, k, n)

    b1 = weight("b1", 8) if bias_shape == "1d" else weight("b1", 1, 8)
    nodes = [node("Gemm", ["x", "W1", "b1"], ["g1"], transB=trans_b), node("Relu", ["g1"], ["h"]),
             node("Gemm", ["h", "W2", "b2"], ["y"], transB=trans_b)]
    m = build(nodes, {"x": [2, 6]}, {"y": [2, 4]}, [w("W1", 6, 8), b1, w("W2", 8, 4), weight("b2", 4)])
    a = analyze(m)
    n_ax, k_ax = (0, 1) if trans_b else (1, 0)
    b1_ax = 0 if bias_shape == "1d" else 1
    expect(group_of(a, "W1", n_ax), 8, {("W1", n_ax): ident(8), ("b1", b1_ax): ident(8), ("W2", k_ax): ident(8)})
    expect(group_of(a, "W1", k_ax), 6, prunable=False, reason="model input 'x'")
    expect(group_of(a, "W2", n_ax), 4, {("W2", n_ax): ident(4), ("b2", 0): ident(4)}, prunable=False,
           reason="model output 'y'")
    plan = oracles(m, a)
    proto = prune(a, plan)
    kept = 8 - len(plan[group_of(a, "W1", n_ax).id])
    assert value(proto, "W2").shape == ((4, kept) if trans_b else (kept, 4))


def test_gemm_trans_a():
    """transA reads A's axis 0 as K.

        x[2,6] -> g1 (Gemm W1[6,8]) -> Relu -> h[2,8] -> Transpose -> hT[8,2] -> g2 (Gemm transA, W2[8,4]) -> y[2,4]

    Group of 8: W1 columns, b1, W2 rows (through the Transpose and transA).
    """
    nodes = [node("Gemm", ["x", "W1", "b1"], ["g1"]), node("Relu", ["g1"], ["h"]),
             node("Transpose", ["h"], ["hT"], perm=[1, 0]), node("Gemm", ["hT", "W2"], ["y"], transA=1)]
    m = build(nodes, {"x": [2, 6]}, {"y": [2, 4]}, [weight("W1", 6, 8), weight("b1", 8), weight("W2", 8, 4)])
    a = analyze(m)
    expect(group_of(a, "W1", 1), 8, {("W1", 1): ident(8), ("b1", 0): ident(8), ("W2", 0): ident(8)})
    oracles(m, a)


@pytest.mark.parametrize("x_shape", [[2, 6], [2, 5, 6], [6]], ids=["2d", "3d", "1d"])
def test_matmul(x_shape):
    """MatMul with constant weights, 2-D and batched 3-D activations.

        x[.., 6] -> MatMul W1[6,8] -> Add b1[8] -> Relu -> h[.., 8] -> MatMul W2[8,4] -> y[.., 4]

    Group of 8: W1 columns, b1, W2 rows; the batch axes never reach a constant.
    """
    nodes = [node("MatMul", ["x", "W1"], ["mm"]), node("Add", ["mm", "b1"], ["a"]), node("Relu", ["a"], ["h"]),
             node("MatMul", ["h", "W2"], ["y"])]
    m = build(nodes, {"x": x_shape}, {"y": None}, [weight("W1", 6, 8), weight("b1", 8), weight("W2", 8, 4)])
    a = analyze(m)
    expect(group_of(a, "W1", 1), 8, {("W1", 1): ident(8), ("b1", 0): ident(8), ("W2", 0): ident(8)})
    expect(group_of(a, "W1", 0), 6, prunable=False, reason="model input 'x'")
    expect(group_of(a, "W2", 1), 4, prunable=False, reason="model output 'y'")
    assert len(a.groups) == 3
    oracles(m, a)


def test_matmul_weight_left():
    """The weight as the left operand: W1[8,6] @ x[2,6,5] contracts x's axis 1.

        x[2,6,5] -> MatMul(W1[8,6], x) -> Relu -> h[2,8,5] -> MatMul(W2[4,8], h) -> y[2,4,5]
    """
    nodes = [node("MatMul", ["W1", "x"], ["mm"]), node("Relu", ["mm"], ["h"]), node("MatMul", ["W2", "h"], ["y"])]
    m = build(nodes, {"x": [2, 6, 5]}, {"y": None}, [weight("W1", 8, 6), weight("W2", 4, 8)])
    a = analyze(m)
    expect(group_of(a, "W1", 0), 8, {("W1", 0): ident(8), ("W2", 1): ident(8)})
    expect(group_of(a, "W1", 1), 6, prunable=False, reason="model input 'x'")
    oracles(m, a)


# ---------------------------------------------------------------- normalizations


def test_batchnorm():
    """BatchNormalization's four per-channel vectors join the conv's group.

        x -> c1 (Conv 3->8, no bias) -> BN (s, b, mean, var) -> Relu -> h -> c2 (->2) -> y
    """
    nodes = [node("Conv", ["x", "c1.w"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             node("BatchNormalization", ["c", "bn.s", "bn.b", "bn.m", "bn.v"], ["bn"]), node("Relu", ["bn"], ["h"])]
    n2, i2 = conv("h", "y", 8, 2, prefix="c2")
    var = fconst("bn.v", np.abs(np.random.default_rng(0).standard_normal(8)) + 0.5)
    inits = [weight("c1.w", 8, 3, 3, 3), weight("bn.s", 8), weight("bn.b", 8), weight("bn.m", 8), var] + i2
    m = build(nodes + n2, {"x": [1, 3, 6, 6]}, {"y": None}, inits)
    a = analyze(m)
    expect(group_of(a, "c1.w", 0), 8, {("c1.w", 0): ident(8), ("bn.s", 0): ident(8), ("bn.b", 0): ident(8),
                                       ("bn.m", 0): ident(8), ("bn.v", 0): ident(8), ("c2.w", 1): ident(8)})
    plan = oracles(m, a)
    proto = prune(a, plan)
    assert value(proto, "bn.v").shape == (8 - len(plan[group_of(a, "c1.w", 0).id]),)


def test_instancenorm():
    """InstanceNormalization: scale and bias are members; statistics stay per channel.

        x -> c1 (3->8, Relu) -> h -> InstanceNormalization (s[8], b[8]) -> n -> c2 (->2) -> y
    """
    m = chain([node("InstanceNormalization", ["h", "in.s", "in.b"], ["n"])], [weight("in.s", 8), weight("in.b", 8)],
              "h", "n")
    a = analyze(m)
    expect(group_of(a, "c1.w", 0), 8, {("c1.w", 0): ident(8), ("c1.b", 0): ident(8), ("in.s", 0): ident(8),
                                       ("in.b", 0): ident(8), ("c2.w", 1): ident(8)})
    oracles(m, a)


def test_lrn():
    """LRN normalises each channel by its neighbours: prunable, but not zero-invariant.

        x -> c1 (3->8, Relu) -> h -> LRN(size=3) -> n -> c2 (->2) -> y
    """
    m = chain([node("LRN", ["h"], ["n"], size=3)], [], "h", "n")
    a = analyze(m)
    expect(group_of(a, "c1.w", 0), 8, {("c1.w", 0): ident(8), ("c1.b", 0): ident(8), ("c2.w", 1): ident(8)},
           zi=False, zi_reason="LRN")
    assert oracles(m, a) == {}


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset,axis,zi", [(17, 1, False), (17, -1, True), (17, 2, True), (11, 1, False),
                                          (11, 3, True)])
def test_softmax(op, opset, axis, zi):
    """Softmax over the channel axis mixes channels (not zero-invariant); over a spatial
    axis it does not. Before opset 13 `axis` flattens the tail: axis 1 covers channels.

        x -> c1 (3->8, Relu) -> h[1,8,4,4] -> Softmax(axis) -> s -> c2 (->2) -> y
    """
    m = chain([node(op, ["h"], ["s"], axis=axis)], [], "h", "s", x_shape=(1, 3, 4, 4), opset=opset)
    a = analyze(m)
    expect(group_of(a, "c1.w", 0), 8, {("c1.w", 0): ident(8), ("c1.b", 0): ident(8), ("c2.w", 1): ident(8)},
           zi=zi, zi_reason=None if zi else op)
    plan = oracles(m, a)
    assert bool(plan) is zi


# ---------------------------------------------------------------- elementwise


UNARY_CASES = {
    "Relu": ([], {}),
    "Clip": (["lo", "hi"], {}),
    "LeakyRelu": ([], {"alpha": 0.2}),
    "Sigmoid": ([], {}),
    "HardSigmoid": ([], {}),
    "HardSwish": ([], {}),
    "Tanh": ([], {}),
    "Softplus": ([], {}),
    "Elu": ([], {}),
    "Abs": ([], {}),
    "Identity": ([], {}),
    "Dropout": ([], {}),
    "Cast": ([], {"to": TensorProto.FLOAT}),
}


@pytest.mark.parametrize("op", list(UNARY_CASES))
def test_unary(op):
    """Shape-preserving activations pass channels through unchanged.

        x -> c1 (3->8, Relu) -> h -> <op> -> u -> c2 (->2) -> y

    Group of 8: c1 rows, c1.b, c2 columns; zero-invariant (c2's columns are members, so
    an f(0) != 0 like Sigmoid's is cancelled).
    """
    extra, attrs = UNARY_CASES[op]
    inits = [fconst("lo", -0.5), fconst("hi", 0.7)] if extra else []
    m = chain([node(op, ["h", *extra], ["u"], **attrs)], inits, "h", "u")
    a = analyze(m)
    expect(group_of(a, "c1.w", 0), 8, {("c1.w", 0): ident(8), ("c1.b", 0): ident(8), ("c2.w", 1): ident(8)})
    assert len(a.groups) == 3 and a.barriers == []
    oracles(m, a)


def test_cast_round_trip():
    """Cast to double and back keeps channels: x -> c1 -> h -> Cast(double) -> Cast(float) -> c2 -> y."""
    m = chain([node("Cast", ["h"], ["d"], to=TensorProto.DOUBLE), node("Cast", ["d"], ["u"], to=TensorProto.FLOAT)],
              [], "h", "u")
    a = analyze(m)
    expect(group_of(a, "c1.w", 0), 8, {("c1.w", 0): ident(8), ("c1.b", 0): ident(8), ("c2.w", 1): ident(8)})
    oracles(m, a)


@pytest.mark.parametrize("via", ["Identity", "Cast_fp16"])
def test_weight_through_unary(via):
    """Weights reached through Identity or Cast are members under the initializer's name.

        W1 -> <Identity|Cast(fp16->fp32)> -> W1' ─┐
        x[2,6] ─────────────────────────── MatMul -> Relu -> h[2,8] -> MatMul W2[8,4] -> y
    """
    dtype = np.float16 if via == "Cast_fp16" else np.float32
    if via == "Cast_fp16":
        op = node("Cast", ["W1"], ["W1x"], to=TensorProto.FLOAT)
    else:
        op = node("Identity", ["W1"], ["W1x"])
    nodes = [op, node("MatMul", ["x", "W1x"], ["mm"]), node("Relu", ["mm"], ["h"]), node("MatMul", ["h", "W2"], ["y"])]
    m = build(nodes, {"x": [2, 6]}, {"y": None}, [weight("W1", 6, 8, dtype=dtype), weight("W2", 8, 4)])
    a = analyze(m)
    g = group_of(a, "W1", 1)
    expect(g, 8, {("W1", 1): ident(8), ("W2", 0): ident(8)})
    oracles(m, a)
    proto = prune(a, {g.id: [0, 7]})
    assert value(proto, "W1").shape == (6, 6) and value(proto, "W1").dtype == dtype


def test_gelu_erf_pattern():
    """The exporters' GELU: 0.5 * h * (1 + Erf(h / sqrt 2)); scalar constants are no members.

        h ─┬─ Div(√2) ─ Erf ─ Add(1) ─┐
           └──────────────────────── Mul ─ Mul(0.5) ─ g
        x -> c1 (3->8) -> h ... g -> c2 (->2) -> y
    """
    nodes = [node("Div", ["h", "sqrt2"], ["d"]), node("Erf", ["d"], ["e"]), node("Add", ["e", "one"], ["p"]),
             node("Mul", ["h", "p"], ["q"]), node("Mul", ["q", "half"], ["g"])]
    inits = [fconst("sqrt2", np.sqrt(2)), fconst("one", 1.0), fconst("half", [0.5])]
    m = chain(nodes, inits, "h", "g")
    a = analyze(m)
    expect(group_of(a, "c1.w", 0), 8, {("c1.w", 0): ident(8), ("c1.b", 0): ident(8), ("c2.w", 1): ident(8)})
    oracles(m, a)


@pytest.mark.parametrize("op", ["Log", "Reciprocal"])
@pytest.mark.parametrize("shift", ["Add", "Sub"])
def test_unary_not_zero_safe(op, shift):
    """f(0) is infinite: zeroed channels could poison the next layer, so not zero-invariant
    unless the input provably stays positive (Relu output + 1: finite, so it is).

        x -> c1 (3->8, Relu) -> h -> Add(h, 1) | Sub(h, -1) -> <op> -> u -> c2 (->2) -> y
    """
    m = chain([node(shift, ["h", "one"], ["p"]), node(op, ["p"], ["u"])],
              [fconst("one", 1.0 if shift == "Add" else -1.0)], "h", "u")
    a = analyze(m)
    zi = shift == "Add"  # h - (-1) is positive too, but spa does not prove it
    expect(group_of(a, "c1.w", 0), 8, {("c1.w", 0): ident(8), ("c1.b", 0): ident(8), ("c2.w", 1): ident(8)},
           zi=zi, zi_reason=None if zi else "not finite")
    assert bool(oracles(m, a)) is zi


def _se_gate():
    """h -> GlobalAveragePool -> se1 (8->2, Relu) -> se2 (2->8) -> Sigmoid -> gate[1,8,1,1]."""
    n1, i1 = conv_relu("pool", "r", 8, 2, k=1, prefix="se1")
    n2, i2 = conv("r", "s", 2, 8, prefix="se2")
    return [node("GlobalAveragePool", ["h"], ["pool"])] + n1 + n2 + [node("Sigmoid", ["s"], ["gate"])], i1 + i2


C8 = {("c1.w", 0): ident(8), ("c1.b", 0): ident(8), ("c2.w", 1): ident(8)}


def _broadcast_case(case):
    """(mid nodes, initializers, extra members of c1's group, zi)."""
    if case == "add_residual":
        n, i = conv("h", "k", 8, 8, prefix="r1")
        return n + [node("Add", ["h", "k"], ["o"])], i, {("r1.w", 1): ident(8), ("r1.w", 0): ident(8),
                                                         ("r1.b", 0): ident(8)}, True
    if case == "mul_se_gate":
        n, i = _se_gate()
        return n + [node("Mul", ["h", "gate"], ["o"])], i, {("se1.w", 1): ident(8), ("se2.w", 0): ident(8),
                                                            ("se2.b", 0): ident(8)}, True
    if case == "mul_channel_const":
        return [node("Mul", ["h", "k"], ["o"])], [weight("k", 8, 1, 1)], {("k", 0): ident(8)}, True
    if case == "sub_channel_const":
        return [node("Sub", ["k", "h"], ["o"])], [weight("k", 1, 8, 1, 1)], {("k", 1): ident(8)}, True
    if case == "div_channel_const":
        return [node("Div", ["h", "k"], ["o"])], [weight("k", 8, 1, 1)], {("k", 0): ident(8)}, False
    if case in ("div_own_rms", "div_own_rms_max"):  # per-channel RMS over the spatial axes
        nodes = [node("Mul", ["h", "h"], ["sq"]), node("ReduceMean", ["sq"], ["ms"], axes=[2, 3], keepdims=1),
                 node("Add" if case == "div_own_rms" else "Max", ["ms", "eps"], ["mse"]),
                 node("Sqrt", ["mse"], ["rms"]), node("Div", ["h", "rms"], ["o"])]
        return nodes, [fconst("eps", 1e-6)], {}, case == "div_own_rms"
    if case == "div_scalar":
        return [node("Div", ["h", "k"], ["o"])], [fconst("k", [3.0])], {}, True
    if case == "prelu":
        return [node("PRelu", ["h", "slope"], ["o"])], [weight("slope", 8, 1, 1)], {("slope", 0): ident(8)}, True
    if case == "where_bool_mask":
        mask = numpy_helper.from_array((np.arange(8) % 3 > 0).reshape(1, 8, 1, 1), "mask")
        return [node("Where", ["mask", "h", "zero"], ["o"])], [mask, fconst("zero", 0.0)], {}, True
    if case == "mul_self":
        return [node("Mul", ["h", "h"], ["o"])], [], {}, True
    if case == "castlike_scalar_like_h":
        return [node("CastLike", ["two", "h"], ["t"]), node("Mul", ["h", "t"], ["o"])], \
            [const("two", 2.0, dtype=np.float64)], {}, True
    if case == "castlike_h_like_scalar":
        return [node("CastLike", ["h", "like"], ["o"])], [fconst("like", [1.0])], {}, True
    if case in ("Sum", "Mean", "Max", "Min"):
        na, ia = conv("h", "ka", 8, 8, prefix="ra")
        nb, ib = conv("h", "kb", 8, 8, prefix="rb")
        extra = {(t, ax): ident(8) for t in ("ra.w", "rb.w") for ax in (0, 1)}
        extra.update({("ra.b", 0): ident(8), ("rb.b", 0): ident(8)})
        return na + nb + [node(case, ["h", "ka", "kb"], ["o"])], ia + ib, extra, True
    raise KeyError(case)


@pytest.mark.parametrize("case", ["add_residual", "mul_se_gate", "mul_channel_const", "sub_channel_const",
                                  "div_channel_const", "div_own_rms", "div_own_rms_max", "div_scalar", "prelu", "Sum", "Mean", "Max", "Min",
                                  "where_bool_mask", "mul_self", "castlike_h_like_scalar",
                                  "castlike_scalar_like_h"])
def test_broadcast(case):
    """Broadcasting ops couple equal axes (right-aligned) and ignore size-1 axes.

        x -> c1 (3->8, Relu) -> h ──┬───────────── <op> ─ o -> c2 (->2) -> y
                                     └─ (branch) ─┘
        add_residual   branch = Conv r1 (8->8)
        mul_se_gate    branch = GAP -> se1 (8->2) -> se2 (2->8) -> Sigmoid  ([1,8,1,1] gate)
        *_channel_const / prelu   a constant [8,1,1] or [1,8,1,1] (a member on its channel axis)
        div_channel_const         the divisor is a member: zeroing it gives inf, not zero-invariant
        div_own_rms               h / Sqrt(mean(h*h over H,W) + eps): a zeroed channel gives 0 / sqrt(eps) = 0
                                  (zero-invariant; Max(mean, eps) is positive too, but spa does not
                                  prove it: not)
        Sum/Mean/Max/Min          three inputs: h and two convs of h
        where_bool_mask           Where(mask[1,8,1,1] bool constant, h, 0): the mask is sliced, not a member
        castlike_*                CastLike(h, 1.0) and CastLike(2.0, h): the "like" input only gives a dtype
    """
    nodes, inits, extra, zi = _broadcast_case(case)
    m = chain(nodes, inits, "h", "o", opset=18 if case.startswith("castlike") else 17)
    a = analyze(m)
    expect(group_of(a, "c1.w", 0), 8, {**C8, **extra}, zi=zi, zi_reason=None if zi else "divisor")
    if case == "mul_se_gate":
        expect(group_of(a, "se1.w", 0), 2, {("se1.w", 0): ident(2), ("se1.b", 0): ident(2), ("se2.w", 1): ident(2)})
    plan = oracles(m, a)
    assert (group_of(a, "c1.w", 0).id in plan) is zi
    if case == "where_bool_mask":  # a coupled non-float constant is sliced with the group
        proto = prune(a, {group_of(a, "c1.w", 0).id: [0, 4]})
        np.testing.assert_array_equal(value(proto, "mask"), value(m.proto, "mask")[:, [1, 2, 3, 5, 6, 7]])


def test_broadcast_nhwc_vector():
    """A [C] vector broadcasts against the last axis: through Transpose it is channels.

        x -> c1 (3->8, Relu) -> h -> Transpose(0,2,3,1) -> t[1,6,6,8] -> Mul k[8] -> Transpose(0,3,1,2) -> o -> c2 -> y
    """
    nodes = [node("Transpose", ["h"], ["t"], perm=[0, 2, 3, 1]), node("Mul", ["t", "k"], ["tk"]),
             node("Transpose", ["tk"], ["o"], perm=[0, 3, 1, 2])]
    m = chain(nodes, [weight("k", 8)], "h", "o")
    a = analyze(m)
    expect(group_of(a, "c1.w", 0), 8, {**C8, ("k", 0): ident(8)})
    oracles(m, a)


def test_constant_node_weights():
    """Weights held by Constant nodes are members under the Constant's output name.

        Constant -> c1.w ─┐ Constant -> c1.b ─┐
        x ──────────────── Conv c1 ─ Relu ─ h ─ Conv c2 (Constant c2.w) ─ y
    """
    def const_node(t):
        return node("Constant", [], [t.name], name=f"const_{t.name}", value=t)

    ws = [weight("c1.w", 8, 3, 3, 3), weight("c1.b", 8), weight("c2.w", 2, 8, 1, 1)]
    nodes = [const_node(t) for t in ws] + [
        node("Conv", ["x", "c1.w", "c1.b"], ["c"], kernel_shape=[3, 3], pads=[1] * 4), node("Relu", ["c"], ["h"]),
        node("Conv", ["h", "c2.w"], ["y"], kernel_shape=[1, 1])]
    m = build(nodes, {"x": [1, 3, 6, 6]}, {"y": None})
    a = analyze(m)
    g = group_of(a, "c1.w", 0)
    expect(g, 8, C8 | {("c1.b", 0): ident(8)})
    oracles(m, a)
    proto = prune(a, {g.id: [0, 5]})
    assert not proto.graph.initializer or {t.name for t in proto.graph.initializer}.isdisjoint({"c1.w", "c2.w"})
    np.testing.assert_array_equal(value(proto, "c1.w"), value(m.proto, "c1.w")[[1, 2, 3, 4, 6, 7]])
    np.testing.assert_array_equal(value(proto, "c2.w"), value(m.proto, "c2.w")[:, [1, 2, 3, 4, 6, 7]])


# ---------------------------------------------------------------- pooling, reductions, pad, resize


POOLS = {
    "MaxPool": {"kernel_shape": [2, 2], "strides": [2, 2]},
    "AveragePool": {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]},
    "LpPool": {"kernel_shape": [2, 2]},
    "GlobalAveragePool": {},
    "GlobalMaxPool": {},
}


@pytest.mark.parametrize("op", list(POOLS))
def test_pool(op):
    """Pooling keeps channels; spatial axes shrink.

        x -> c1 (3->8, Relu) -> h -> <pool> -> p -> c2 (->2) -> y
    """
    m = chain([node(op, ["h"], ["p"], **POOLS[op])], [], "h", "p")
    a = analyze(m)
    expect(group_of(a, "c1.w", 0), 8, C8)
    oracles(m, a)


@pytest.mark.parametrize("op", ["MaxPool", "Dropout"])
@pytest.mark.parametrize("use", ["dangling", "model_output"])
def test_second_output(op, use):
    """An op's second output (MaxPool Indices, Dropout mask) has the input's channels too.

        x -> c1 (3->8, Relu) -> h ─ <op> ─ u -> c2 (->2) -> y
                                        └ ind/mask  (dangling, or a model output: then h is pinned)
    """
    second, dtype, attrs = {"MaxPool": ("ind", TensorProto.INT64, {"kernel_shape": [2, 2], "strides": [2, 2]}),
                            "Dropout": ("mask", TensorProto.BOOL, {})}[op]
    n1, i1 = conv_relu("x", "h", 3, 8, k=1, prefix="c1")
    n2, i2 = conv("u", "y", 8, 2, prefix="c2")
    outputs = {"y": (TensorProto.FLOAT, None)}
    if use == "model_output":
        outputs[second] = (dtype, None)
    m = build_typed(n1 + [node(op, ["h"], ["u", second], name="op2", **attrs)] + n2,
                    {"x": (TensorProto.FLOAT, [1, 3, 6, 6])}, outputs, i1 + i2, opset=13)
    a = analyze(m)
    g = group_of(a, "c1.w", 0)
    if use == "dangling":
        expect(g, 8, C8)
    else:
        expect(g, 8, C8, prunable=False, reason=f"model output '{second}'")
    oracles(m, a)


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax", "ReduceSum", "ReduceL2"])
@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("axes,keepdims", [([2, 3], 1), ([-1, -2], 0), ([1], 1)], ids=["spatial", "spatial_drop",
                                                                                     "channels"])
def test_reduce(op, opset, axes, keepdims):
    """Reductions over spatial axes keep channels; over the channel axis they mix them
    (not zero-invariant), except sums, where removed zeros add nothing.

        x -> c1 (3->8, Relu) -> h[1,8,6,6] -> <Reduce>(axes, keepdims) -> r
        spatial: r[1,8,1,1] -> c2 (->2) -> y        spatial_drop: r[1,8] -> Gemm W[8,2] -> y
        channels: r[1,1,6,6] is the output y itself (c1's group: prunable, not zero-invariant)
    """
    axes_in = opset >= 18 or op == "ReduceSum"
    inputs = ["h", "axes"] if axes_in else ["h"]
    attrs = {"keepdims": keepdims} if axes_in else {"keepdims": keepdims, "axes": axes}
    inits = [const("axes", axes)] if axes_in else []
    red = node(op, inputs, ["r"], **attrs)
    n1, i1 = conv_relu("x", "h", 3, 8, k=1, prefix="c1")
    if keepdims == 0:
        m = build(n1 + [red, node("Gemm", ["r", "W"], ["y"])], {"x": [1, 3, 6, 6]}, {"y": None},
                  i1 + inits + [weight("W", 8, 2)], opset=opset)
        consumer = ("W", 0)
    elif axes == [1]:
        m = build(n1 + [red], {"x": [1, 3, 6, 6]}, {"r": None}, i1 + inits, opset=opset)
        consumer = None
    else:
        n2, i2 = conv("r", "y", 8, 2, prefix="c2")
        m = build(n1 + [red] + n2, {"x": [1, 3, 6, 6]}, {"y": None}, i1 + inits + i2, opset=opset)
        consumer = ("c2.w", 1)
    a = analyze(m)
    mem = {("c1.w", 0): ident(8), ("c1.b", 0): ident(8)} | ({consumer: ident(8)} if consumer else {})
    zi = axes != [1] or op in ("ReduceSum", "ReduceL2")  # zeros add nothing to a sum (of squares)
    g = group_of(a, "c1.w", 0)
    expect(g, 8, mem, zi=zi, zi_reason=None if zi else f"{op}")
    assert g.hidden is (op == "ReduceMean" and not zi)  # a mean over channels: the hidden-size kind
    assert "axes" not in {m_.tensor for g in a.groups for m_ in g.members}
    plan = oracles(m, a)
    assert bool(plan) is zi


@pytest.mark.parametrize("case", ["spatial", "spatial_reflect", "spatial_axes_input", "spatial_attr_opset9",
                                  "channels", "channels_axes_input"])
def test_pad(case):
    """Pad with zero pads on the channel axis keeps channels; padding channels pins them.

        x -> c1 (3->8, Relu) -> h[1,8,6,6] -> Pad(pads[, value][, axes]) -> p -> c2 (->2) -> y
    """
    opset, attrs, inits, inputs = 17, {}, [], ["h", "pads"]
    if case == "spatial":
        inits = [const("pads", [0, 0, 1, 2, 0, 0, 2, 1]), fconst("v", 0.5)]
        inputs = ["h", "pads", "v"]
    elif case == "spatial_reflect":
        inits, attrs = [const("pads", [0, 0, 1, 1, 0, 0, 1, 1])], {"mode": "reflect"}
    elif case == "spatial_axes_input":
        opset, inits, inputs = 18, [const("pads", [1, 1, 1, 1]), const("axes", [2, 3])], ["h", "pads", "", "axes"]
    elif case == "spatial_attr_opset9":
        opset, inputs, attrs = 9, ["h"], {"pads": [0, 0, 1, 1, 0, 0, 1, 1]}
    elif case == "channels":
        inits = [const("pads", [0, 1, 0, 0, 0, 1, 0, 0])]
    else:
        opset, inits, inputs = 18, [const("pads", [1, 0]), const("axes", [1])], ["h", "pads", "", "axes"]
    pinned = case.startswith("channels")
    cout = {"channels": 10, "channels_axes_input": 9}.get(case, 8)
    m = chain([node("Pad", inputs, ["p"], name="pad", **attrs)], inits, "h", "p", cout=cout, opset=opset)
    a = analyze(m)
    g = group_of(a, "c1.w", 0)
    if pinned:
        expect(g, 8, {("c1.w", 0): ident(8), ("c1.b", 0): ident(8)}, prunable=False, reason="Pad 'pad'")
    else:
        expect(g, 8, C8)
    plan = oracles(m, a)
    assert bool(plan) is not pinned


@pytest.mark.parametrize("case", ["scales", "sizes", "scales_opset10", "upsample_opset9", "upsample_opset7_attr",
                                  "scales_axes_opset18",
                                  "sizes_axes_opset18"])
def test_resize(case):
    """Resize/Upsample with scale 1 (or the same size) on the channel axis keeps channels;
    a `sizes` constant naming the channel count is rewritten.

        x -> c1 (3->8, Relu) -> h[1,8,4,4] -> Resize(scales [1,1,2,2] | sizes [1,8,8,8]) -> r -> c2 (->2) -> y
    """
    opset, inits = 13, []
    if case == "scales":
        inputs, inits = ["h", "", "scales"], [fconst("scales", [1, 1, 2, 2])]
    elif case == "sizes":
        inputs, inits = ["h", "", "", "sizes"], [const("sizes", [1, 8, 8, 8])]
    elif case == "scales_opset10":
        opset, inputs, inits = 10, ["h", "scales"], [fconst("scales", [1, 1, 2, 2])]
    elif case == "upsample_opset9":
        opset, inputs, inits = 9, ["h", "scales"], [fconst("scales", [1, 1, 2, 2])]
    elif case == "upsample_opset7_attr":
        opset, inputs = 7, ["h"]
    elif case == "scales_axes_opset18":
        opset, inputs, inits = 18, ["h", "", "scales"], [fconst("scales", [2, 2])]
    else:
        opset, inputs, inits = 18, ["h", "", "", "sizes"], [const("sizes", [8, 8])]
    op = "Upsample" if case.startswith("upsample") else "Resize"
    attrs = {"mode": "nearest"}
    attrs.update({"scales": [1.0, 1.0, 2.0, 2.0]} if case == "upsample_opset7_attr" else {})
    attrs.update({"axes": [2, 3]} if case.endswith("opset18") else {})
    m = chain([node(op, inputs, ["r"], name="rs", **attrs)], inits, "h", "r", x_shape=(1, 3, 4, 4), opset=opset)
    a = analyze(m)
    g = group_of(a, "c1.w", 0)
    expect(g, 8, C8)
    assert {mm.tensor for gg in a.groups for mm in gg.members}.isdisjoint({"scales", "sizes"})
    oracles(m, a)
    proto = prune(a, {g.id: [2, 3, 7]})
    if case == "sizes":
        np.testing.assert_array_equal(input_value(proto, "rs", 3), [1, 5, 8, 8])
    elif len(inputs) > 1:  # scales and axes-relative sizes never name the channel count
        np.testing.assert_array_equal(input_value(proto, "rs", len(inputs) - 1), value(m.proto, inputs[-1]))


# ---------------------------------------------------------------- layout: Concat, Split, Slice, Gather


@pytest.mark.parametrize("axis", [1, -3])
def test_concat_densenet(axis):
    """Concat places each input at an offset of the output's channel axis (DenseNet).

        x -> c1 (3->4, Relu) -> h1 ─┬─────────────────────────┐
                                    └─ c2 (4->3, Relu) -> h2 ─ Concat(axis 1) -> h3[7] -> c3 (7->2) -> y

    c1's group (4): c1 rows, c2 columns, c3 columns 0..3; c2's group (3): c2 rows, c3 columns 4..6.
    """
    n1, i1 = conv_relu("x", "h1", 3, 4, k=1, prefix="c1")
    n2, i2 = conv_relu("h1", "h2", 4, 3, k=3, prefix="c2")
    n3, i3 = conv("h3", "y", 7, 2, prefix="c3")
    nodes = n1 + n2 + [node("Concat", ["h1", "h2"], ["h3"], axis=axis)] + n3
    m = build(nodes, {"x": [1, 3, 6, 6]}, {"y": None}, i1 + i2 + i3)
    a = analyze(m)
    expect(group_of(a, "c1.w", 0), 4, {("c1.w", 0): ident(4), ("c1.b", 0): ident(4), ("c2.w", 1): ident(4),
                                       ("c3.w", 1): ident(4)})
    expect(group_of(a, "c2.w", 0), 3, {("c2.w", 0): ident(3), ("c2.b", 0): ident(3), ("c3.w", 1): [4, 5, 6]})
    oracles(m, a)
    proto = prune(a, {group_of(a, "c1.w", 0).id: [1], group_of(a, "c2.w", 0).id: [0, 2]})
    np.testing.assert_array_equal(value(proto, "c3.w"), value(m.proto, "c3.w")[:, [0, 2, 3, 5]])


@pytest.mark.parametrize("form", ["input_opset13", "attr_opset11", "num_outputs_opset18", "equal_opset13",
                                  "constant_node_opset13"])
def test_split(form):
    """Split windows are offsets into the input's channel axis; the sizes are rewritten.

        x -> c1 (3->8, Relu) -> h[8] -> Split(axis 1) ─ s0[3|4] -> c2a (->2) ─┐
                                                      └ s1[5|4] -> c2b (->2) ─ Add -> y

    Channels inside each window touch a different consumer: two groups of c1's channels.
    """
    sizes = [4, 4] if form in ("num_outputs_opset18", "equal_opset13") else [3, 5]
    opset = int(form[-2:])
    pre = []
    if form == "input_opset13":
        sp, inits = node("Split", ["h", "split"], ["s0", "s1"], name="sp", axis=1), [const("split", sizes)]
    elif form == "constant_node_opset13":
        pre = [node("Constant", [], ["split"], value=const("v", sizes))]
        sp, inits = node("Split", ["h", "split"], ["s0", "s1"], name="sp", axis=1), []
    elif form == "equal_opset13":
        sp, inits = node("Split", ["h"], ["s0", "s1"], name="sp", axis=1), []
    elif form == "attr_opset11":
        sp, inits = node("Split", ["h"], ["s0", "s1"], name="sp", axis=1, split=sizes), []
    else:
        sp, inits = node("Split", ["h"], ["s0", "s1"], name="sp", axis=1, num_outputs=2), []
    n1, i1 = conv_relu("x", "h", 3, 8, k=1, prefix="c1")
    na, ia = conv("s0", "ya", sizes[0], 2, prefix="c2a")
    nb, ib = conv("s1", "yb", sizes[1], 2, prefix="c2b")
    m = build(n1 + pre + [sp] + na + nb + [node("Add", ["ya", "yb"], ["y"])], {"x": [1, 3, 6, 6]}, {"y": None},
              i1 + inits + ia + ib, opset=opset)
    a = analyze(m)
    g0, g1 = group_of(a, "c1.w", 0, pos=0), group_of(a, "c1.w", 0, pos=7)
    lo, hi = ident(sizes[0]), [sizes[0] + i for i in range(sizes[1])]
    expect(g0, sizes[0], {("c1.w", 0): lo, ("c1.b", 0): lo, ("c2a.w", 1): ident(sizes[0])})
    expect(g1, sizes[1], {("c1.w", 0): hi, ("c1.b", 0): hi, ("c2b.w", 1): ident(sizes[1])})
    oracles(m, a)
    proto = prune(a, {g0.id: [0], g1.id: [1, 2]})
    sp_new = find_node(proto, "sp")
    new_sizes = [sizes[0] - 1, sizes[1] - 2]
    if form == "attr_opset11":
        assert get_attr(sp_new, "split") == new_sizes
    else:
        np.testing.assert_array_equal(value(proto, sp_new.input[1]), new_sizes)
        assert get_attr(sp_new, "num_outputs") is None
    assert value(proto, "c1.w").shape[0] == 5


SLICES = {"inputs": ([2], [6]), "negative": ([-6], [-2]), "attrs_opset9": ([2], [6]), "full_consumer": ([2], [6]),
          "end_past_size": ([4], [2**62]), "negative_axis": ([2], [6])}


@pytest.mark.parametrize("form", list(SLICES))
def test_slice(form):
    """Slice on the channel axis: a window at an offset; starts/ends are rewritten.

        x -> c1 (3->8, Relu) -> h[8] -> Slice(axis 1, 2:6 | 4:INT_MAX) -> s[4] -> c2 (->2) -> y
        full_consumer: h also feeds c3 (8->2), added to y

    Channels in the window touch s and c2; the others do not: two groups of c1's channels.
    """
    opset = 9 if form == "attrs_opset9" else 17
    starts, ends = SLICES[form]
    window = list(range(8))[slice(starts[0], ends[0])]
    if form == "attrs_opset9":
        sl, inits = node("Slice", ["h"], ["s"], name="sl", starts=starts, ends=ends, axes=[1]), []
    else:
        sl = node("Slice", ["h", "st", "en", "ax"], ["s"], name="sl")
        inits = [const("st", starts), const("en", ends), const("ax", [-3 if form == "negative_axis" else 1])]
    n1, i1 = conv_relu("x", "h", 3, 8, k=1, prefix="c1")
    n2, i2 = conv("s", "ys", 4, 2, prefix="c2")
    tail = [node("Identity", ["ys"], ["y"])]
    if form == "full_consumer":
        n3, i3 = conv("h", "yf", 8, 2, prefix="c3")
        tail, i2 = n3 + [node("Add", ["ys", "yf"], ["y"])], i2 + i3
    m = build(n1 + [sl] + n2 + tail, {"x": [1, 3, 6, 6]}, {"y": None}, i1 + inits + i2, opset=opset)
    a = analyze(m)
    rest = [i for i in range(8) if i not in window]
    inside, outside = group_of(a, "c1.w", 0, pos=window[0]), group_of(a, "c1.w", 0, pos=rest[0])
    full = {("c3.w", 1): window} if form == "full_consumer" else {}
    expect(inside, 4, {("c1.w", 0): window, ("c1.b", 0): window, ("c2.w", 1): ident(4), **full})
    full = {("c3.w", 1): rest} if form == "full_consumer" else {}
    expect(outside, 4, {("c1.w", 0): rest, ("c1.b", 0): rest, **full})
    oracles(m, a)
    proto = prune(a, {inside.id: [0, 2], outside.id: [1, 3]})
    kept = sorted(set(range(8)) - {window[0], window[2], rest[1], rest[3]})
    sl_new = find_node(proto, "sl")
    if form == "attrs_opset9":
        new_starts, new_ends = get_attr(sl_new, "starts"), get_attr(sl_new, "ends")
    else:
        new_starts, new_ends = value(proto, sl_new.input[1]).tolist(), value(proto, sl_new.input[2]).tolist()
    # the new window, over the kept channels of h, is exactly the kept part of the old window
    np.testing.assert_array_equal(np.array(kept)[slice(new_starts[0], new_ends[0])], [window[1], window[3]])


def test_slice_step_pins():
    """A Slice with step 2 on the channel axis has no offset map: the channels are pinned.

        x -> c1 (3->8, Relu) -> h[8] -> Slice(axis 1, 0:8:2) -> s[4] -> c2 (->2) -> y
    """
    sl = node("Slice", ["h", "st", "en", "ax", "sp"], ["s"], name="sl")
    inits = [const("st", [0]), const("en", [8]), const("ax", [1]), const("sp", [2])]
    m = chain([sl], inits, "h", "s", cout=4)
    a = analyze(m)
    expect(group_of(a, "c1.w", 0), 8, prunable=False, reason="Slice 'sl'")
    expect(group_of(a, "c2.w", 1), 4, prunable=False, reason="Slice 'sl'")
    oracles(m, a)


@pytest.mark.parametrize("indices", [[0, 2, 4, 6], [6, 1, 3], [-1, 0]], ids=["even", "unordered", "negative"])
def test_gather(indices):
    """Gather with constant indices on the channel axis: y[j] <-> x[idx[j]]; indices remapped.

        x -> c1 (3->8, Relu) -> h[8] -> Gather(idx, axis 1) -> g[len(idx)] -> c2 (->2) -> y
    """
    n = len(indices)
    m = chain([node("Gather", ["h", "idx"], ["g"], name="ga", axis=1)], [const("idx", indices)], "h", "g", cout=n)
    a = analyze(m)
    picked = [i % 8 for i in indices]
    g = group_of(a, "c1.w", 0, pos=picked[0])
    expect(g, n, {("c1.w", 0): sorted(picked), ("c1.b", 0): sorted(picked),
                  ("c2.w", 1): [indices.index(p if p in indices else p - 8) for p in sorted(picked)]})
    others = [i for i in range(8) if i not in picked]
    expect(group_of(a, "c1.w", 0, pos=others[0]), len(others), {("c1.w", 0): others, ("c1.b", 0): others})
    oracles(m, a)
    drop_sorted = min(picked)
    proto = prune(a, {g.id: [0], group_of(a, "c1.w", 0, pos=others[0]).id: [0]})
    kept = [i for i in range(8) if i not in (drop_sorted, others[0])]
    expected = [kept.index(p) for p in picked if p != drop_sorted]
    np.testing.assert_array_equal(input_value(proto, "ga", 1), expected)


def test_gather_duplicates():
    """A channel gathered twice is one channel with two positions in the consumer.

        x -> c1 (3->8, Relu) -> h[8] -> Gather([1, 1, 2], axis 1) -> g[3] -> c2 (3->2) -> y
    """
    m = chain([node("Gather", ["h", "idx"], ["g"], name="ga", axis=1)], [const("idx", [1, 1, 2])], "h", "g", cout=3)
    a = analyze(m)
    g = group_of(a, "c1.w", 0, pos=1)
    expect(g, 2, {("c1.w", 0): [1, 2], ("c1.b", 0): [1, 2], ("c2.w", 1): [[0, 1], 2]})
    oracles(m, a)
    proto = prune(a, {g.id: [1]})  # h's channel 2 goes: indices [1, 1] over the kept 0, 1, 3, ..
    np.testing.assert_array_equal(input_value(proto, "ga", 1), [1, 1])


def test_gather_permutation_merges_channels():
    """Two paths that map channels differently merge them: h[c] + h[7-c] makes {c, 7-c} one channel.

        x -> c1 (3->8, Relu) -> h ─┬──────────────────────────────── Add -> o -> c2 (->2) -> y
                                   └ Gather([7,6,..,0], axis 1) ─┘
    """
    m = chain([node("Gather", ["h", "idx"], ["g"], name="ga", axis=1), node("Add", ["h", "g"], ["o"])],
              [const("idx", list(range(7, -1, -1)))], "h", "o")
    a = analyze(m)
    g = group_of(a, "c1.w", 0)
    pairs = [[c, 7 - c] for c in range(4)]
    expect(g, 4, {("c1.w", 0): pairs, ("c1.b", 0): pairs, ("c2.w", 1): pairs})
    oracles(m, a)
    proto = prune(a, {g.id: [1]})  # h's 1 and 6 go: the kept 0, 2, 3, 4, 5, 7 reversed
    np.testing.assert_array_equal(input_value(proto, "ga", 1), [5, 4, 3, 2, 1, 0])


def test_gather_embedding():
    """An embedding table E[V, D] read by Gather(ids): D is a channel space of E.

        ids[2,5] (int64) -> Gather(E[10,6]) -> e[2,5,6] -> MatMul W1[6,8] -> Relu -> MatMul W2[8,3] -> y
    """
    nodes = [node("Gather", ["E", "ids"], ["e"], name="emb"), node("MatMul", ["e", "W1"], ["mm"]),
             node("Relu", ["mm"], ["h"]), node("MatMul", ["h", "W2"], ["y"])]
    m = build_typed(nodes, {"ids": (TensorProto.INT64, [2, 5])}, {"y": (TensorProto.FLOAT, [2, 5, 3])},
                    [weight("E", 10, 6), weight("W1", 6, 8), weight("W2", 8, 3)])
    a = analyze(m)
    expect(group_of(a, "E", 1), 6, {("E", 1): ident(6), ("W1", 0): ident(6)})
    expect(group_of(a, "W1", 1), 8, {("W1", 1): ident(8), ("W2", 0): ident(8)})
    assert not any(m_.tensor == "E" and m_.axis == 0 for g in a.groups for m_ in g.members)  # rows: by index
    oracles(m, a)


def test_gather_scalar_index():
    """A scalar index picks one channel: that channel is locked, the others may go.

        x -> c1 (3->8, Relu) -> h[1,8,6,6] -> Gather(3, axis 1) -> g[1,6,6] -> Unsqueeze(1) -> c2 (1->2) -> y
    """
    nodes = [node("Gather", ["h", "idx"], ["g"], name="ga", axis=1), node("Unsqueeze", ["g", "ax"], ["u"])]
    m = chain(nodes, [const("idx", 3), const("ax", [1])], "h", "u", cout=1)
    a = analyze(m)
    g = group_of(a, "c1.w", 0)
    expect(g, 8, {("c1.w", 0): ident(8), ("c1.b", 0): ident(8)})
    assert g.locked == [3]
    oracles(m, a)
    proto = prune(a, {g.id: [0, 2, 7]})
    assert input_value(proto, "ga", 1).tolist() == 1


# ---------------------------------------------------------------- layout: Reshape, Flatten, Transpose, Squeeze


def _head(kind):
    """Flatten/Reshape + a linear layer over [1, 4*2*2] features."""
    if kind == "flatten_gemm":
        return [node("Flatten", ["p"], ["f"]), node("Gemm", ["f", "W"], ["y"])], [], ("W", 0)
    if kind == "flatten_gemm_transB":
        return [node("Flatten", ["p"], ["f"]), node("Gemm", ["f", "W"], ["y"], transB=1)], [], ("W", 1)
    if kind in ("reshape_matmul", "reshape_matmul_minus1", "reshape_matmul_zero"):
        shp = {"reshape_matmul": [1, 16], "reshape_matmul_minus1": [1, -1], "reshape_matmul_zero": [0, -1]}[kind]
        return [node("Reshape", ["p", "shp"], ["f"], name="rs"), node("MatMul", ["f", "W"], ["y"])], \
            [const("shp", shp)], ("W", 0)
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["flatten_gemm", "flatten_gemm_transB", "reshape_matmul", "reshape_matmul_minus1",
                                  "reshape_matmul_zero"])
def test_flatten_to_linear(kind):
    """Flattening NCHW puts channel c at features c*H*W .. (c+1)*H*W - 1 (block map).

        x[1,3,4,4] -> c1 (3->4, Relu) -> h -> MaxPool(2) -> p[1,4,2,2]
          -> Flatten|Reshape -> f[1,16] -> Gemm|MatMul W -> y[1,5]

    Group of 4: c1 rows, and W's feature axis in blocks of 4; a literal 16 in the shape is rewritten.
    """
    nodes, inits, w_axis = _head(kind)
    n1, i1 = conv_relu("x", "h", 3, 4, k=1, prefix="c1")
    w = weight("W", 5, 16) if w_axis == ("W", 1) else weight("W", 16, 5)
    m = build(n1 + [node("MaxPool", ["h"], ["p"], kernel_shape=[2, 2], strides=[2, 2])] + nodes, {"x": [1, 3, 4, 4]},
              {"y": None}, i1 + inits + [w])
    a = analyze(m)
    blocks = [list(range(4 * c, 4 * c + 4)) for c in range(4)]
    g = group_of(a, "c1.w", 0)
    expect(g, 4, {("c1.w", 0): ident(4), ("c1.b", 0): ident(4), w_axis: blocks})
    oracles(m, a)
    proto = prune(a, {g.id: [1]})
    assert value(proto, "W").shape == ((5, 12) if w_axis == ("W", 1) else (12, 5))
    if kind.startswith("reshape"):
        expected = {"reshape_matmul": [1, 12], "reshape_matmul_minus1": [1, -1], "reshape_matmul_zero": [0, -1]}[kind]
        np.testing.assert_array_equal(input_value(proto, "rs", 1), expected)


@pytest.mark.parametrize("op", ["Flatten", "Squeeze"])
def test_gap_to_linear(op):
    """The classifier head: GlobalAveragePool -> Flatten|Squeeze -> Gemm; size-1 axes are dropped.

        x -> c1 (3->8, Relu) -> h -> GAP -> [1,8,1,1] -> Flatten|Squeeze(2,3) -> [1,8] -> Gemm(W[5,8], transB) -> y
    """
    flat = node("Flatten", ["p"], ["f"]) if op == "Flatten" else node("Squeeze", ["p", "ax"], ["f"])
    nodes = [node("GlobalAveragePool", ["h"], ["p"]), flat, node("Gemm", ["f", "W", "b"], ["y"], transB=1)]
    n1, i1 = conv_relu("x", "h", 3, 8, k=1, prefix="c1")
    inits = [const("ax", [2, 3]), weight("W", 5, 8), weight("b", 5)]
    m = build(n1 + nodes, {"x": [1, 3, 6, 6]}, {"y": None}, i1 + inits)
    a = analyze(m)
    expect(group_of(a, "c1.w", 0), 8, {("c1.w", 0): ident(8), ("c1.b", 0): ident(8), ("W", 1): ident(8)})
    expect(group_of(a, "W", 0), 5, {("W", 0): ident(5), ("b", 0): ident(5)}, prunable=False, reason="model output")
    oracles(m, a)


def test_reshape_heads():
    """Splitting channels into (heads, per-head) factors: both factors are groups.

        x -> c1 (3->8, Relu) -> h[1,8,6,6] -> Reshape [1,2,4,36] -> Relu -> Reshape [1,8,6,6] -> o -> c2 (->2) -> y

    h's channel 4a + b is the cell (head a, slot b): removing head a removes h's {4a..4a+3},
    removing slot b removes h's {b, b+4}. Both shape constants are rewritten.
    """
    nodes = [node("Reshape", ["h", "shp"], ["r"], name="rs1"), node("Relu", ["r"], ["rr"]),
             node("Reshape", ["rr", "shp2"], ["o"], name="rs2")]
    m = chain(nodes, [const("shp", [1, 2, 4, 36]), const("shp2", [1, 8, 6, 6])], "h", "o")
    a = analyze(m)
    heads, slots = a.group("r:1"), a.group("r:2")
    per_slot = [[b, b + 4] for b in range(4)]
    per_head = [list(range(4 * h, 4 * h + 4)) for h in range(2)]
    expect(slots, 4, {("c1.w", 0): per_slot, ("c1.b", 0): per_slot, ("c2.w", 1): per_slot})
    expect(heads, 2, {("c1.w", 0): per_head, ("c1.b", 0): per_head, ("c2.w", 1): per_head})
    oracles(m, a)
    proto = prune(a, {slots.id: [0, 2]})
    np.testing.assert_array_equal(input_value(proto, "rs1", 1), [1, 2, 2, 36])
    np.testing.assert_array_equal(input_value(proto, "rs2", 1), [1, 4, 6, 6])
    proto = prune(a, {slots.id: [0, 2], heads.id: [0]})  # cells of both: h keeps {5, 7}
    np.testing.assert_array_equal(input_value(proto, "rs1", 1), [1, 1, 2, 36])
    np.testing.assert_array_equal(input_value(proto, "rs2", 1), [1, 2, 6, 6])
    w = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "c1.w"))
    np.testing.assert_array_equal(w, onnx.numpy_helper.to_array(
        next(t for t in m.proto.graph.initializer if t.name == "c1.w"))[[5, 7]])


def test_weight_through_reshape():
    """A conv weight stored flat and reshaped in the graph: the input channel is a block of 9.

        W2f[2,72] -> Reshape [2,8,3,3] ─┐
        x -> c1 (3->8, Relu) -> h ─── Conv -> y
    """
    nodes = [node("Reshape", ["W2f", "s"], ["W2"], name="rw"),
             node("Conv", ["h", "W2"], ["y"], kernel_shape=[3, 3], pads=[1] * 4)]
    n1, i1 = conv_relu("x", "h", 3, 8, k=1, prefix="c1")
    m = build(n1 + nodes, {"x": [1, 3, 6, 6]}, {"y": None}, i1 + [weight("W2f", 2, 72), const("s", [2, 8, 3, 3])])
    a = analyze(m)
    g = group_of(a, "c1.w", 0)
    expect(g, 8, {("c1.w", 0): ident(8), ("c1.b", 0): ident(8),
                  ("W2f", 1): [list(range(9 * c, 9 * c + 9)) for c in range(8)]})
    oracles(m, a)
    proto = prune(a, {g.id: [1, 2, 3]})
    np.testing.assert_array_equal(input_value(proto, "rw", 1), [2, 5, 3, 3])
    assert value(proto, "W2f").shape == (2, 45)


def test_flatten_nhwc():
    """Through Transpose to NHWC, channels are the innermost factor: feature (h*W + w)*C + c.

        x[1,3,4,4] -> c1 (3->4, Relu) -> h -> MaxPool(2) -> p[1,4,2,2] -> Transpose(0,2,3,1) -> t[1,2,2,4]
          -> Reshape [1,16] -> MatMul W[16,5] -> y
    """
    nodes = [node("MaxPool", ["h"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             node("Transpose", ["p"], ["t"], perm=[0, 2, 3, 1]), node("Reshape", ["t", "shp"], ["f"], name="rs"),
             node("MatMul", ["f", "W"], ["y"])]
    n1, i1 = conv_relu("x", "h", 3, 4, k=1, prefix="c1")
    m = build(n1 + nodes, {"x": [1, 3, 4, 4]}, {"y": None}, i1 + [const("shp", [1, 16]), weight("W", 16, 5)])
    a = analyze(m)
    g = group_of(a, "c1.w", 0)
    rows = [[c, c + 4, c + 8, c + 12] for c in range(4)]
    expect(g, 4, {("c1.w", 0): ident(4), ("c1.b", 0): ident(4), ("W", 0): rows})
    oracles(m, a)
    proto = prune(a, {g.id: [0, 3]})
    np.testing.assert_array_equal(input_value(proto, "rs", 1), [1, 8])
    np.testing.assert_array_equal(value(proto, "W"), value(m.proto, "W")[[1, 2, 5, 6, 9, 10, 13, 14]])


def test_transpose():
    """Transpose moves the channel axis and back: x[perm[i]] <-> y[i].

        x -> c1 (3->8, Relu) -> h -> Transpose(0,2,3,1) -> Relu -> Transpose(0,3,1,2) -> o -> c2 (->2) -> y
    """
    nodes = [node("Transpose", ["h"], ["t"], perm=[0, 2, 3, 1]), node("Relu", ["t"], ["r"]),
             node("Transpose", ["r"], ["o"], perm=[0, 3, 1, 2])]
    m = chain(nodes, [], "h", "o")
    a = analyze(m)
    expect(group_of(a, "c1.w", 0), 8, C8)
    oracles(m, a)


def test_transpose_of_weights():
    """Weights stored [out, in] and transposed in the graph are members on their own axes.

        W1[8,6] -> Transpose ─┐                 W2[4,8] -> Transpose ─┐
        x[2,6] ──────────── MatMul -> Relu -> h[2,8] ──────────── MatMul -> y[2,4]
    """
    nodes = [node("Transpose", ["W1"], ["W1t"], perm=[1, 0]), node("MatMul", ["x", "W1t"], ["mm"]),
             node("Relu", ["mm"], ["h"]), node("Transpose", ["W2"], ["W2t"]), node("MatMul", ["h", "W2t"], ["y"])]
    m = build(nodes, {"x": [2, 6]}, {"y": None}, [weight("W1", 8, 6), weight("W2", 4, 8)])
    a = analyze(m)
    g = group_of(a, "W1", 0)
    expect(g, 8, {("W1", 0): ident(8), ("W2", 1): ident(8)})
    oracles(m, a)
    proto = prune(a, {g.id: [3]})
    assert value(proto, "W1").shape == (7, 6) and value(proto, "W2").shape == (4, 7)


def test_channel_shuffle():
    """ShuffleNet's channel shuffle: Reshape [1,2,4,H,W] -> Transpose(0,2,1,3,4) -> Reshape [1,8,H,W].

        x -> c1 (3->8, Relu) -> h -> Reshape -> Transpose -> Reshape -> s -> c2 (->2) -> y

    h's channel c = 4a + b lands at 2b + a: the cell (group a, slot b). Removing slot b
    removes h's {b, b+4} and s's {2b, 2b+1}; removing group a removes h's {4a..4a+3} and
    s's {a, a+2, a+4, a+6}; both shape constants are rewritten.
    """
    nodes = [node("Reshape", ["h", "shp1"], ["r1"], name="rs1"), node("Transpose", ["r1"], ["t"], perm=[0, 2, 1, 3, 4]),
             node("Reshape", ["t", "shp2"], ["s"], name="rs2")]
    m = chain(nodes, [const("shp1", [1, 2, 4, 4, 4]), const("shp2", [1, 8, 4, 4])], "h", "s", x_shape=(1, 3, 4, 4))
    a = analyze(m)
    g, shuffle = a.group("r1:2"), a.group("r1:1")
    slots = [[b, b + 4] for b in range(4)]
    expect(g, 4, {("c1.w", 0): slots, ("c1.b", 0): slots, ("c2.w", 1): [[2 * b, 2 * b + 1] for b in range(4)]})
    blocks = [list(range(4 * a_, 4 * a_ + 4)) for a_ in range(2)]
    expect(shuffle, 2, {("c1.w", 0): blocks, ("c1.b", 0): blocks, ("c2.w", 1): [[0, 2, 4, 6], [1, 3, 5, 7]]})
    oracles(m, a)
    proto = prune(a, {g.id: [1]})
    np.testing.assert_array_equal(input_value(proto, "rs1", 1), [1, 2, 3, 4, 4])
    np.testing.assert_array_equal(input_value(proto, "rs2", 1), [1, 6, 4, 4])
    proto = prune(a, {g.id: [1], shuffle.id: [0]})
    np.testing.assert_array_equal(input_value(proto, "rs1", 1), [1, 1, 3, 4, 4])
    np.testing.assert_array_equal(input_value(proto, "rs2", 1), [1, 3, 4, 4])


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("explicit_axes", [True, False])
def test_squeeze_unsqueeze(opset, explicit_axes):
    """Squeeze/Unsqueeze keep the remaining axes in order.

        x -> c1 (3->8, Relu) -> h[2,8,6,6] ─┬──────────────────────────────────────────────── Mul -> o -> c2 -> y
                                           └ GAP -> [2,8,1,1] -> Squeeze -> [2,8] -> Sigmoid -> Unsqueeze ┘
    """
    if opset >= 13:
        sq = node("Squeeze", ["pool", "ax"] if explicit_axes else ["pool"], ["sq"])
        un = node("Unsqueeze", ["sg", "ax"], ["un"])
        inits = [const("ax", [2, 3])]
    else:
        sq = node("Squeeze", ["pool"], ["sq"], **({"axes": [2, 3]} if explicit_axes else {}))
        un = node("Unsqueeze", ["sg"], ["un"], axes=[2, 3])
        inits = []
    nodes = [node("GlobalAveragePool", ["h"], ["pool"]), sq, node("Sigmoid", ["sq"], ["sg"]), un,
             node("Mul", ["h", "un"], ["o"])]
    m = chain(nodes, inits, "h", "o", opset=opset, x_shape=(2, 3, 6, 6))  # batch 2: Squeeze() keeps it
    a = analyze(m)
    expect(group_of(a, "c1.w", 0), 8, C8)
    oracles(m, a)


@pytest.mark.parametrize("target", [[1, 8, 6, 6], [1, 1, 6, 6], "shape_of_h"],
                         ids=["names_channels", "broadcast_channels", "shape_of_h"])
def test_expand(target):
    """Expand of a per-channel vector to the full map; a literal channel count is rewritten,
    a shape read from h (Shape(h)) couples by itself.

        x -> c1 (3->8, Relu) -> h ─┬─────────────────────────────────────── Mul -> o -> c2 -> y
                                   └ GAP -> [1,8,1,1] -> Expand(target) ─┘
    """
    nodes = [node("GlobalAveragePool", ["h"], ["pool"]), node("Expand", ["pool", "shp"], ["e"], name="ex"),
             node("Mul", ["h", "e"], ["o"])]
    if target == "shape_of_h":
        m = chain([node("Shape", ["h"], ["shp"])] + nodes, [], "h", "o")
    else:
        m = chain(nodes, [const("shp", target)], "h", "o")
    a = analyze(m)
    g = group_of(a, "c1.w", 0)
    expect(g, 8, C8)
    oracles(m, a)
    proto = prune(a, {g.id: [0, 1, 2]})
    if target != "shape_of_h":
        np.testing.assert_array_equal(input_value(proto, "ex", 1), [1, 5, 6, 6] if target[1] == 8 else target)


@pytest.mark.parametrize("shape", ["literal", "shape_of_h"])
def test_constant_of_shape(shape):
    """ConstantOfShape: a literal channel count follows the pruned axis (rewritten);
    Shape(h) couples by itself. A constant-shaped fill may count as a member ("filled" weight).

        ConstantOfShape([1,8,6,6] | Shape(h), 1.0) -> ones ─┐
        x -> c1 (3->8, Relu) -> h ─────────────────────── Add -> o -> c2 (->2) -> y
    """
    one = numpy_helper.from_array(np.array([1.0], np.float32), "v")
    nodes = [node("ConstantOfShape", ["shp"], ["ones"], name="cos", value=one), node("Add", ["h", "ones"], ["o"])]
    if shape == "literal":
        m = chain(nodes, [const("shp", [1, 8, 6, 6])], "h", "o")
    else:
        m = chain([node("Shape", ["h"], ["shp"])] + nodes, [], "h", "o")
    a = analyze(m)
    g = group_of(a, "c1.w", 0)
    filled = {("ones", 1): ident(8)} if ("ones", 1) in members(g) else {}
    assert not filled or shape == "literal"
    expect(g, 8, C8 | filled)
    oracles(m, a)
    proto = prune(a, {g.id: [4]})
    if shape == "literal":
        np.testing.assert_array_equal(input_value(proto, "cos", 0), [1, 7, 6, 6])


def test_dynamic_flatten():
    """The exporters' dynamic flatten: Shape -> Gather(0) -> Unsqueeze -> Concat([n, -1]) -> Reshape.

        x[N,3,4,4] -> c1 (3->4, Relu) -> h[N,4,4,4] ─────────────────── Reshape -> f[N,64] -> Gemm W[64,5] -> y
                                         └ Shape -> Gather(0) -> Unsqueeze -> Concat(-1) ┘

    Shape reads only the batch size: c1's group is prunable, W's rows go in blocks of 16.
    """
    nodes = [node("Shape", ["h"], ["sh"]), node("Gather", ["sh", "zero"], ["n"], axis=0),
             node("Unsqueeze", ["n", "ax0"], ["n1"]), node("Concat", ["n1", "minus1"], ["shp"], axis=0),
             node("Reshape", ["h", "shp"], ["f"]), node("Gemm", ["f", "W"], ["y"])]
    n1, i1 = conv_relu("x", "h", 3, 4, k=1, prefix="c1")
    inits = [const("zero", 0), const("ax0", [0]), const("minus1", [-1]), weight("W", 64, 5)]
    m = build(n1 + nodes, {"x": [None, 3, 4, 4]}, {"y": [None, 5]}, i1 + inits)
    a = analyze(m)
    g = group_of(a, "c1.w", 0)
    expect(g, 4, {("c1.w", 0): ident(4), ("c1.b", 0): ident(4),
                  ("W", 0): [list(range(16 * c, 16 * c + 16)) for c in range(4)]})
    oracles(m, a)
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 3, 4, 4)).astype(np.float32)}
    out = ort_backend.run(prune(a, {g.id: [2]}), feeds)["y"]
    assert out.shape == (3, 5)


def test_dynamic_reshape_keeps_channels():
    """Shape(h)[0:2] names the channel count: [N, C, -1] follows the pruned C by itself.

        x[N,3,6,6] -> c1 (3->8, Relu) -> h ───────────────────────── Reshape -> f[N,8,36] -> ReduceMean(2)
                                          └ Shape -> Gather([0,1]) -> Concat(-1) ┘      -> Unsqueeze(3) -> c2 -> y
    """
    nodes = [node("Shape", ["h"], ["sh"]), node("Gather", ["sh", "i01"], ["nc"], axis=0),
             node("Concat", ["nc", "minus1"], ["shp"], axis=0), node("Reshape", ["h", "shp"], ["f"]),
             node("ReduceMean", ["f"], ["rm"], axes=[2], keepdims=1), node("Unsqueeze", ["rm", "ax3"], ["o"])]
    m = chain(nodes, [const("i01", [0, 1]), const("minus1", [-1]), const("ax3", [3])], "h", "o",
              x_shape=(None, 3, 6, 6))
    a = analyze(m)
    g = group_of(a, "c1.w", 0)
    expect(g, 8, C8)
    oracles(m, a)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)}
    assert ort_backend.run(prune(a, {g.id: [0, 3, 5]}), feeds)["y"].shape == (2, 2, 1, 1)


@pytest.mark.parametrize("op", ["Shape", "Size"])
def test_shape_read_for_unknown_use(op):
    """A size read that leaves the graph (here: a model output) pins the tensor it reads.

        x -> c1 (3->8, Relu) -> h -> c2 (->2) -> y
                                └ <Shape|Size> -> Cast -> s (model output)
    """
    nodes = [node(op, ["h"], ["sh"], name="sz"), node("Cast", ["sh"], ["s"], to=TensorProto.FLOAT)]
    m = chain(nodes, [], "h", "h", extra_outputs={"s": None})
    a = analyze(m)
    expect(group_of(a, "c1.w", 0), 8, C8, prunable=False, reason=f"read by {op} 'sz'")
    oracles(m, a)


# ---------------------------------------------------------------- barriers, subgraphs, model I/O


@pytest.mark.parametrize("kind", ["TopK", "custom_domain"])
def test_barrier(kind):
    """An op without a coupling rule is a barrier: no channel crosses it, the analysis says so.

        x -> c0 (3->8, Relu) -> h0 -> c1 (8->8, Relu) -> h -> <barrier> -> b[..] -> c2 (->2) -> y

    c0's group stays prunable; c1's group (its rows) and c2's columns are pinned with the reason.
    """
    if kind == "TopK":
        bar = node("TopK", ["h", "k"], ["b", "bi"], name="bar", axis=1)
        inits, reason, domain = [const("k", [4])], "TopK 'bar' has no coupling rule (barrier)", None
    else:
        bar = helper.make_node("Frobnicate", ["h"], ["b"], name="bar", domain="com.example")
        inits, reason, domain = [], "Frobnicate 'bar' from domain 'com.example' has no coupling rule", "com.example"
    n0, i0 = conv_relu("x", "h0", 3, 8, k=1, prefix="c0")
    n1, i1 = conv_relu("h0", "h", 8, 8, k=1, prefix="c1")
    cout = 4 if kind == "TopK" else 8
    n2, i2 = conv("b", "y", cout, 2, prefix="c2")
    m = build_typed(n0 + n1 + [bar] + n2, {"x": (TensorProto.FLOAT, [1, 3, 6, 6])},
                    {"y": (TensorProto.FLOAT, [1, 2, 6, 6])}, i0 + i1 + inits + i2, domains=[domain] if domain else [],
                    value_info={"b": (TensorProto.FLOAT, [1, cout, 6, 6])})
    a = analyze(m)
    assert a.barriers == ["bar"]
    expect(group_of(a, "c0.w", 0), 8, {("c0.w", 0): ident(8), ("c0.b", 0): ident(8), ("c1.w", 1): ident(8)})
    expect(group_of(a, "c1.w", 0), 8, {("c1.w", 0): ident(8), ("c1.b", 0): ident(8)}, prunable=False, reason=reason)
    expect(group_of(a, "c2.w", 1), cout, {("c2.w", 1): ident(cout)}, prunable=False, reason=reason)
    if kind == "TopK":
        oracles(m, a)
    else:  # ORT cannot run the custom op: prune and check the graph instead
        plan = {group_of(a, "c0.w", 0).id: [1, 2]}
        out = prune(a, plan)
        assert value(out, "c1.w").shape == (8, 6, 1, 1) and value(out, "c2.w").shape == (2, 8, 1, 1)


def test_if_subgraph_capture():
    """A tensor read inside an If branch keeps its channels (subgraphs are not analysed).

        x -> c0 (3->8, Relu) -> h0 -> c1 (8->8, Relu) -> h ──┐ (captured)
        cond ─────────────────────────────────────── If { then: Relu(h), else: Neg(h) } -> o -> c2 (->2) -> y
    """
    then = helper.make_graph([node("Relu", ["h"], ["t_out"])], "then", [],
                             [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, 8, 6, 6])])
    other = helper.make_graph([node("Neg", ["h"], ["e_out"])], "else", [],
                              [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1, 8, 6, 6])])
    n0, i0 = conv_relu("x", "h0", 3, 8, k=1, prefix="c0")
    n1, i1 = conv_relu("h0", "h", 8, 8, k=1, prefix="c1")
    n2, i2 = conv("o", "y", 8, 2, prefix="c2")
    nodes = n0 + n1 + [node("If", ["cond"], ["o"], name="if", then_branch=then, else_branch=other)] + n2
    m = build_typed(nodes, {"x": (TensorProto.FLOAT, [1, 3, 6, 6]), "cond": (TensorProto.BOOL, [])},
                    {"y": (TensorProto.FLOAT, [1, 2, 6, 6])}, i0 + i1 + i2)
    a = analyze(m)
    assert a.barriers == ["if"]
    expect(group_of(a, "c0.w", 0), 8, {("c0.w", 0): ident(8), ("c0.b", 0): ident(8), ("c1.w", 1): ident(8)})
    expect(group_of(a, "c1.w", 0), 8, {("c1.w", 0): ident(8), ("c1.b", 0): ident(8)}, prunable=False,
           reason="'h' is read inside a subgraph")
    oracles(m, a)


@pytest.mark.parametrize("case", ["conv_to_output", "residual_from_input", "relu_output"])
def test_model_io_never_pruned(case):
    """Channel dims of model inputs and outputs keep their size, whatever couples to them.

        conv_to_output:      x[1,3] -> c1 (3->8) -> y
        residual_from_input: x[1,8] -> c1 (8->8, Relu) -> h -> Add(x) -> y
        relu_output:         x -> c1 (3->8, Relu) -> h (output too) -> c2 (->2) -> y
    """
    if case == "conv_to_output":
        n, i = conv("x", "y", 3, 8, prefix="c1")
        m = build(n, {"x": [1, 3, 6, 6]}, {"y": None}, i)
        reason = "model output 'y'"
    elif case == "residual_from_input":
        n, i = conv_relu("x", "h", 8, 8, k=1, prefix="c1")
        m = build(n + [node("Add", ["h", "x"], ["y"])], {"x": [1, 8, 6, 6]}, {"y": None}, i)
        reason = "model input 'x'"
    else:
        m = chain([], [], "h", "h", extra_outputs={"h": None})
        reason = "model output 'h'"
    a = analyze(m)
    assert all(not g.prunable for g in a.groups)
    expect(group_of(a, "c1.w", 0), 8, prunable=False, reason=reason)
    assert api.make_plan(a, 0.5) == {}
    oracles(m, a)


def _contrib_model(nodes, inits, x_shape=(2, 3, 4), y_shape=(2, 3, 5)):
    """A model using ONNX Runtime contrib ops (domain com.microsoft), shapes filled by spa."""
    return _contrib_io(nodes, inits, {"x": (TensorProto.FLOAT, list(x_shape))}, {"y": (TensorProto.FLOAT, list(y_shape))})


def test_contrib_gelu():
    """onnxruntime.transformers' FastGelu(h, bias) is elementwise: the bias is a member.

        x[2,3,4] -> MatMul W1[4,8] -> h -> FastGelu(h, b1[8]) -> g -> MatMul W2[8,5] -> y
    """
    nodes = [node("MatMul", ["x", "W1"], ["h"]), node("FastGelu", ["h", "b1"], ["g"], domain="com.microsoft"),
             node("MatMul", ["g", "W2"], ["y"])]
    m = _contrib_model(nodes, [weight("W1", 4, 8), weight("b1", 8), weight("W2", 8, 5)])
    a = analyze(m)
    expect(group_of(a, "W1", 1), 8, {("W1", 1): ident(8), ("b1", 0): ident(8), ("W2", 0): ident(8)})
    oracles(m, a)


def test_contrib_skip_layernorm():
    """SkipLayerNormalization(h, skip, gamma, beta): the residual stream is the hidden size.

        x[2,3,4] ─ MatMul Wi[4,6] -> h ─┐
                 └ MatMul Ws[4,6] -> s ─┴ SkipLayerNormalization(gamma, beta) -> n -> MatMul Wo[6,5] -> y
    """
    nodes = [node("MatMul", ["x", "Wi"], ["h"]), node("MatMul", ["x", "Ws"], ["s"]),
             node("SkipLayerNormalization", ["h", "s", "gamma", "beta"], ["n"], domain="com.microsoft", epsilon=1e-5),
             node("MatMul", ["n", "Wo"], ["y"])]
    m = _contrib_model(nodes, [weight("Wi", 4, 6), weight("Ws", 4, 6), weight("gamma", 6), weight("beta", 6),
                               weight("Wo", 6, 5)])
    a = analyze(m)
    hidden = group_of(a, "Wi", 1)
    expect(hidden, 6, {("Wi", 1): ident(6), ("Ws", 1): ident(6), ("gamma", 0): ident(6), ("beta", 0): ident(6),
                       ("Wo", 0): ident(6)}, zi=False, zi_reason="normalises over this axis")
    assert hidden.hidden and api.make_plan(a, 0.5) == {}
    pruned = api.prune(a, api.make_plan(a, 0.5, prune_hidden=True))
    out = ort_backend.run(pruned, {"x": np.ones((2, 3, 4), np.float32)})["y"]
    assert out.shape == (2, 3, 5) and np.isfinite(out).all()


def _gqa_model(heads=4, kv=2, d=32, hidden=32, past=3, seq=2):
    """One GroupQueryAttention as the GenAI builder writes it (packed QKV, rotary caches, a KV cache
    in the graph's I/O):

        x[1,S,hidden] -> MatMul Wqkv[hidden,(H+2K)D] -> GQA(past_key_values.0.*, seqlens_k, total, cos, sin)
                      -> MatMul Wo[H*D,hidden] -> y;   present.0.key/value [1,K,P+S,D]
    """
    rng = np.random.default_rng(0)
    width = (heads + 2 * kv) * d
    pos = np.arange(16)[:, None] / (10000 ** (np.arange(d // 2) / (d // 2)))
    inits = [numpy_helper.from_array(rng.standard_normal((hidden, width)).astype(np.float32) * 0.2, "Wqkv"),
             numpy_helper.from_array(rng.standard_normal((heads * d, hidden)).astype(np.float32) * 0.2, "Wo"),
             numpy_helper.from_array(np.cos(pos).astype(np.float32), "cos"),
             numpy_helper.from_array(np.sin(pos).astype(np.float32), "sin")]
    nodes = [node("MatMul", ["x", "Wqkv"], ["qkv"]),
             node("GroupQueryAttention", ["qkv", "", "", "past_key_values.0.key", "past_key_values.0.value", "seqlens_k",
                                          "total", "cos", "sin"], ["att", "present.0.key", "present.0.value"],
                  domain="com.microsoft", num_heads=heads, kv_num_heads=kv, do_rotary=1),
             node("MatMul", ["att", "Wo"], ["y"])]
    f, cache = TensorProto.FLOAT, [1, kv, "past", d]
    model = _contrib_io(nodes, inits, {"x": (f, [1, seq, hidden]), "past_key_values.0.key": (f, cache),
                                       "past_key_values.0.value": (f, cache), "seqlens_k": (TensorProto.INT32, [1]),
                                       "total": (TensorProto.INT32, [])},
                        {"y": (f, [1, seq, hidden]), "present.0.key": (f, [1, kv, "tot", d]),
                         "present.0.value": (f, [1, kv, "tot", d])})
    feeds = {"x": rng.standard_normal((1, seq, hidden)).astype(np.float32),
             "past_key_values.0.key": rng.standard_normal((1, kv, past, d)).astype(np.float32),
             "past_key_values.0.value": rng.standard_normal((1, kv, past, d)).astype(np.float32),
             "seqlens_k": np.array([past + seq - 1], np.int32), "total": np.array(past + seq, np.int32)}
    return model, feeds


def test_group_query_attention():
    """KV heads (with their query heads, output rows and cache slices), query heads per KV head, and
    the head size in rotary pairs (steps of 16, ONNX Runtime's CPU kernel); the rewriter sets
    num_heads / kv_num_heads and keeps the default scale of the old head size."""
    from spa.core import kvcache
    from spa.core.cost import dropped_positions

    model, feeds = _gqa_model()
    a = analyze(model)
    kv = next(g for g in a.groups if ("past_key_values.0.key", 1) in g.positions)
    assert kv.size == 2 and kv.prunable and kv.zero_invariant
    q_cols = kv.positions[("Wqkv", 1)][1]  # KV head 1: query heads 2, 3 and its key and value columns
    assert set(np.ravel(q_cols)) >= set(range(64, 128)) | set(range(128 + 32, 128 + 64)) | set(range(192 + 32, 256))
    rep = next(g for g in a.groups if "q_per_kv" in g.id)
    assert rep.size == 2 and rep.prunable
    rotary = next(g for g in a.groups if ("cos", 1) in g.positions)
    assert rotary.size == 16 and rotary.multiple == 8
    assert [len(np.ravel(p)) for p in rotary.positions[("past_key_values.0.key", 3)]] == [2] * 16  # pairs i, i + 16
    plan = {kv.id: [0], rotary.id: list(range(8))}
    pruned = api.prune(a, plan)
    attrs = {x.name: helper.get_attribute_value(x) for x in pruned.graph.node[1].attribute}
    assert (attrs["num_heads"], attrs["kv_num_heads"]) == (2, 1) and abs(attrs["scale"] - 32 ** -0.5) < 1e-7
    ports = kvcache.ports(a, dropped_positions(a, plan))
    assert {k: sorted(v) for k, v in ports.items()} == {n: [1, 3] for n in ("past_key_values.0.key",
                                                                          "past_key_values.0.value", "present.0.key",
                                                                          "present.0.value")}
    zero = kvcache.fit(ort_backend.run(api.zeroed(a, plan), feeds), ports)
    got = ort_backend.run(pruned, kvcache.fit(feeds, ports))
    for name, ref in zero.items():
        assert got[name].shape == ref.shape and np.allclose(got[name], ref, atol=1e-5), name
    with pytest.raises(spa.SpaError, match="multiple of 8"):
        api.prune(a, {rotary.id: [0, 1, 2]})


def _contrib_io(nodes, inits, inputs: dict, outputs: dict):
    """A com.microsoft model with several inputs/outputs ({name: (dtype, dims)}), shapes filled by spa."""
    from spa.core.model import Model, infer_shapes

    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [vi(n, t, d) for n, (t, d) in inputs.items()],
                              [vi(n, t, d) for n, (t, d) in outputs.items()], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    proto.ir_version = 8
    model = Model(proto)
    infer_shapes(model)
    return model


def test_multi_head_attention():
    """MultiHeadAttention with separate Q/K/V projections, a packed bias and a KV cache: heads go
    with their columns, bias slices, output rows and cache slices; the head size of Q/K and V
    (one group: the cache's keys and values share one head size); the rewriter sets num_heads and
    keeps the old default scale."""
    from spa.core import kvcache
    from spa.core.cost import dropped_positions

    rng = np.random.default_rng(2)
    f = TensorProto.FLOAT
    w = lambda name, *shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)
    nodes = [node("MatMul", ["x", "Wq"], ["q"]), node("MatMul", ["x", "Wk"], ["k"]), node("MatMul", ["x", "Wv"], ["v"]),
             node("MultiHeadAttention", ["q", "k", "v", "bias", "", "", "past_key_values.0.key",
                                         "past_key_values.0.value"], ["att", "present.0.key", "present.0.value"],
                  domain="com.microsoft", num_heads=2),
             node("MatMul", ["att", "Wo"], ["y"])]
    inits = [w("Wq", 8, 12), w("Wk", 8, 12), w("Wv", 8, 12), w("bias", 36), w("Wo", 12, 8)]
    m = _contrib_io(nodes, inits, {"x": (f, [1, 3, 8]), "past_key_values.0.key": (f, [1, 2, "p", 6]),
                                   "past_key_values.0.value": (f, [1, 2, "p", 6])},
                    {"y": (f, [1, 3, 8]), "present.0.key": (f, [1, 2, "t", 6]), "present.0.value": (f, [1, 2, "t", 6])})
    a = analyze(m)
    heads = next(g for g in a.groups if ("past_key_values.0.key", 1) in g.positions)
    assert heads.size == 2 and heads.prunable and heads.zero_invariant
    assert [len(np.ravel(p)) for p in heads.positions[("bias", 0)]] == [6 + 6 + 6] * 2
    d = next(g for g in a.groups if ("Wq", 1) in g.positions and g is not heads)
    dv = next(g for g in a.groups if ("Wv", 1) in g.positions and g is not heads)
    assert d.size == 6 and d is dv  # the op takes them apart, the KV cache (one head size in the config) does not
    plan = {heads.id: [1], d.id: [0, 5]}
    pruned = api.prune(a, plan)
    attrs = {x.name: helper.get_attribute_value(x) for x in pruned.graph.node[3].attribute}
    assert attrs["num_heads"] == 1 and abs(attrs["scale"] - 6 ** -0.5) < 1e-7
    feeds = {"x": rng.standard_normal((1, 3, 8)).astype(np.float32),
             "past_key_values.0.key": rng.standard_normal((1, 2, 4, 6)).astype(np.float32),
             "past_key_values.0.value": rng.standard_normal((1, 2, 4, 6)).astype(np.float32)}
    ports = kvcache.ports(a, dropped_positions(a, plan))
    zero = kvcache.fit(ort_backend.run(api.zeroed(a, plan), feeds), ports)
    got = ort_backend.run(pruned, kvcache.fit(feeds, ports))
    for name, ref in zero.items():
        assert got[name].shape == ref.shape and np.allclose(got[name], ref, atol=1e-5), name
    assert [b.heads.before for b in spa.core.blocks.attention_blocks(a)] == [2]


@pytest.mark.parametrize("layout", ["3d", "4d"])
def test_rotary_embedding(layout):
    """RotaryEmbedding keeps rotary pairs (i, i + rot/2) together with their cos/sin column; with a
    3-D input its heads are tied to num_heads, which the rewriter updates."""
    rng = np.random.default_rng(3)
    f = TensorProto.FLOAT
    pos = np.arange(8)[:, None] / (100 ** (np.arange(4) / 4))
    inits = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32) * 0.3, "Wq"),
             numpy_helper.from_array(rng.standard_normal((16, 5)).astype(np.float32) * 0.3, "Wo"),
             numpy_helper.from_array(np.cos(pos).astype(np.float32), "cos"),
             numpy_helper.from_array(np.sin(pos).astype(np.float32), "sin"),
             numpy_helper.from_array(np.array([1, 3, 2, 8], np.int64), "s4"),
             numpy_helper.from_array(np.array([1, 3, 16], np.int64), "s3")]
    rope = {"domain": "com.microsoft"}
    if layout == "3d":
        nodes = [node("MatMul", ["x", "Wq"], ["q"]), node("RotaryEmbedding", ["q", "pos", "cos", "sin"], ["r"],
                                                          num_heads=2, **rope), node("MatMul", ["r", "Wo"], ["y"])]
    else:
        nodes = [node("MatMul", ["x", "Wq"], ["q"]), node("Reshape", ["q", "s4"], ["q4"]),  # [B, S, H, D]
                 node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),  # [B, H, S, D], as the op reads it
                 node("RotaryEmbedding", ["qh", "pos", "cos", "sin"], ["rh"], **rope),
                 node("Transpose", ["rh"], ["r4"], perm=[0, 2, 1, 3]),
                 node("Reshape", ["r4", "s3"], ["r"]), node("MatMul", ["r", "Wo"], ["y"])]
    m = _contrib_io(nodes, inits, {"x": (f, [1, 3, 8]), "pos": (TensorProto.INT64, [1, 3])}, {"y": (f, [1, 3, 5])})
    a = analyze(m)
    rotary = next(g for g in a.groups if ("cos", 1) in g.positions)
    assert rotary.size == 4 and rotary.prunable and rotary.zero_invariant
    assert sorted(np.ravel(rotary.positions[("Wq", 1)][0]).tolist()) == [0, 4, 8, 12]  # pair (0, 4) of both heads
    plan = {rotary.id: [1]}
    feeds = {"x": rng.standard_normal((1, 3, 8)).astype(np.float32), "pos": np.array([[0, 1, 2]], np.int64)}
    ref = ort_backend.run(api.zeroed(a, plan), feeds)["y"]
    pruned = api.prune(a, plan)
    assert np.allclose(ort_backend.run(pruned, feeds)["y"], ref, atol=1e-5)
    if layout == "3d":
        heads = next(g for g in a.groups if any("::heads" in s[0] for s in g.positions))
        out = api.prune(a, {heads.id: [0]})
        attrs = {x.name: helper.get_attribute_value(x) for x in out.graph.node[1].attribute}
        assert attrs["num_heads"] == 1


def _nbits(rng, n, k, block=32):
    blocks = -(-k // block)
    codes = rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8)
    return codes, rng.uniform(0.01, 0.1, (n, blocks)).astype(np.float32)


def test_matmul_nbits():
    """Output rows with their scales; input channels in whole quantization blocks; the rewriter
    sets K and N. 4-bit zero points packed two blocks per byte lock the input channels."""

    rng = np.random.default_rng(1)
    b1, s1 = _nbits(rng, 64, 16)
    b2, s2 = _nbits(rng, 8, 64)
    inits = [numpy_helper.from_array(a, n) for a, n in ((b1, "B1"), (s1, "S1"), (b2, "B2"), (s2, "S2"))]
    ms = {"domain": "com.microsoft", "bits": 4, "block_size": 32}
    nodes = [node("MatMulNBits", ["x", "B1", "S1"], ["h"], K=16, N=64, **ms), node("Relu", ["h"], ["r"]),
             node("MatMulNBits", ["r", "B2", "S2"], ["y"], K=64, N=8, **ms)]
    m = _contrib_model(nodes, inits, x_shape=(2, 16), y_shape=(2, 8))
    a = analyze(m)
    blocks = next(g for g in a.groups if ("B2", 1) in g.positions)  # the codes are sliced, the scales scored
    assert blocks.size == 2 and blocks.prunable and [len(np.ravel(p)) for p in blocks.positions[("B1", 0)]] == [32, 32]
    assert {(mm.tensor, mm.axis) for mm in blocks.members} == {("S1", 0), ("S2", 1)}
    pruned = api.prune(a, {blocks.id: [1]})
    attrs = [{x.name: helper.get_attribute_value(x) for x in n.attribute} for n in pruned.graph.node]
    assert (attrs[0]["N"], attrs[2]["K"]) == (32, 32)
    x = {"x": rng.standard_normal((2, 16)).astype(np.float32)}
    ref = ort_backend.run(api.zeroed(a, {blocks.id: [1]}), x)["y"]
    assert np.allclose(ort_backend.run(pruned, x)["y"], ref, atol=1e-5)
    zp = numpy_helper.from_array(np.full((8, 1), 0x88, np.uint8), "Z2")
    nodes[2] = node("MatMulNBits", ["r", "B2", "S2", "Z2"], ["y"], K=64, N=8, **ms)
    a = analyze(_contrib_model(nodes, inits + [zp], x_shape=(2, 16), y_shape=(2, 8)))
    locked = next(g for g in a.groups if ("B1", 0) in g.positions)
    assert not locked.prunable and "packs the zero points" in locked.reason


# ---------------------------------------------------------------- the registry is covered

def _attention(x_shape, shape_mode, norm="LayerNormalization"):
    """One attention block with H=2 heads of D=3 over hidden 4, as exporters write it.

        x[B,S,4] -> MatMul Wi[4,4] -> hdn -> <norm> -> n ─┬ MatMul Wq[4,6] + bq -> Reshape [B,S,2,3] -> Transpose -> q
                                                       ├ MatMul Wk[4,6]      -> Reshape -> Transpose(0,2,3,1) -> k
                                                       └ MatMul Wv[4,6]      -> Reshape -> Transpose -> v
        Softmax(q @ k * 0.5) @ v -> Transpose -> Reshape [B,S,6] -> MatMul Wo[6,4] -> + hdn -> MatMul Wh[4,5] -> y

    shape_mode "const": shapes are constants [0,0,2,3] / [0,0,6]; "computed": Concat(Shape(x)[0:2],
    [-1], [3]) and Concat(Shape(x)[0:2], [-1]) as in TorchScript/dynamo exports (one shared
    by Q, K and V). `norm` "RMS" decomposes RMSNorm: Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul.
    """
    nodes, inits = [node("MatMul", ["x", "Wi"], ["hdn"])], [weight("Wi", 4, 4)]
    if norm == "LayerNormalization":
        nodes.append(node("LayerNormalization", ["hdn", "g", "beta"], ["n"], axis=-1))
        inits += [weight("g", 4), weight("beta", 4)]
    else:
        nodes += [node("Pow", ["hdn", "two"], ["sq"]), node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
                  node("Add", ["ms", "eps"], ["mse"]), node("Sqrt", ["mse"], ["rms"]),
                  node("Div", ["hdn", "rms"], ["nn"]), node("Mul", ["nn", "g"], ["n"])]
        inits += [const("two", 2.0, np.float32), const("eps", 1e-6, np.float32), weight("g", 4)]
    if shape_mode == "const":
        inits += [const("s4", [0, 0, 2, 3]), const("s3", [0, 0, 6])]
        split, merge = "s4", "s3"
    else:
        nodes += [node("Shape", ["x"], ["shx"], start=0, end=2), node("Concat", ["shx", "m1", "d3"], ["s4c"], axis=0),
                  node("Concat", ["shx", "m1"], ["s3c"], axis=0)]
        inits += [const("m1", [-1]), const("d3", [3])]
        split, merge = "s4c", "s3c"
    for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [node("MatMul", ["n", f"W{p}"], [f"{p}0"])]
        inits.append(weight(f"W{p}", 4, 6))
        src = f"{p}0"
        if p == "q":
            nodes.append(node("Add", [f"{p}0", "bq"], ["q1"]))
            inits.append(weight("bq", 6))
            src = "q1"
        nodes += [node("Reshape", [src, split], [f"{p}4"], name=f"rs_{p}"), node("Transpose", [f"{p}4"], [p], perm=perm)]
    nodes += [node("MatMul", ["q", "k"], ["sc"]), node("Mul", ["sc", "half"], ["sc2"]),
              node("Softmax", ["sc2"], ["pr"], axis=-1), node("MatMul", ["pr", "v"], ["ctx"]),
              node("Transpose", ["ctx"], ["ctxt"], perm=[0, 2, 1, 3]),
              node("Reshape", ["ctxt", merge], ["ctxf"], name="rs_o"), node("MatMul", ["ctxf", "Wo"], ["o"]),
              node("Add", ["o", "hdn"], ["res"]), node("MatMul", ["res", "Wh"], ["y"])]
    inits += [const("half", 0.5, np.float32), weight("Wo", 6, 4), weight("Wh", 4, 5)]
    return build(nodes, {"x": x_shape}, {"y": None}, inits)


@pytest.mark.parametrize("shape_mode", ["const", "computed"])
def test_attention_heads(shape_mode):
    """Heads and head_dim are both groups; literal sizes are rewritten where they are stored."""
    m = _attention([None, None, 4], shape_mode)
    a = analyze(m)
    heads = next(g for g in a.groups if ("q4", 2) in g.positions)
    head_dim_qk = next(g for g in a.groups if ("q4", 3) in g.positions)
    head_dim_v = next(g for g in a.groups if ("v4", 3) in g.positions)
    per_head = [[0, 1, 2], [3, 4, 5]]
    expect(heads, 2, {("Wq", 1): per_head, ("bq", 0): per_head, ("Wk", 1): per_head, ("Wv", 1): per_head,
                      ("Wo", 0): per_head})
    assert heads.zero_invariant and head_dim_qk.zero_invariant
    # Q/K and V head_dim are separate channels, also when one computed shape tensor sizes Q, K
    # and V (each Reshape gets its own copy of it: spa.analysis.untie_shapes)
    assert head_dim_qk is not head_dim_v and head_dim_qk.size == 3
    assert members(head_dim_qk)[("Wq", 1)] == [[0, 3], [1, 4], [2, 5]]
    hidden = group_of(a, "Wi", 1)
    assert hidden.prunable and not hidden.zero_invariant and hidden.hidden
    oracles(m, a)
    proto = prune(a, {heads.id: [0], head_dim_qk.id: [1]})
    out = api.reinfer(proto)
    assert out.shapes["q4"][2:] == (1, 2) and value(proto, "Wq").shape == (4, 2)
    assert value(proto, "Wo").shape[0] == 3  # 1 head x V's head_dim
    for batch in (1, 3):
        feeds = ort_backend.random_feeds(m.proto, dynamic=batch)
        assert ort_backend.run(proto, feeds)["y"].shape == (batch, batch, 5)


@pytest.mark.parametrize("norm", ["LayerNormalization", "RMS"])
def test_hidden_size_through_norms(norm):
    """The residual stream through LayerNormalization or a decomposed RMSNorm: prunable, not
    zero-invariant (statistics), pruned only with prune_hidden; the result still runs."""
    m = _attention([2, 3, 4], "const", norm)
    a = analyze(m)
    hidden = group_of(a, "Wi", 1)
    assert hidden.size == 4 and hidden.prunable and hidden.hidden and not hidden.zero_invariant
    assert {("g", 0), ("Wq", 0), ("Wo", 1), ("Wh", 0)} <= set(members(hidden))
    assert hidden.id not in api.make_plan(a, 0.5)
    plan = api.make_plan(a, 0.5, prune_hidden=True)
    assert len(plan[hidden.id]) == 2
    proto = prune(a, plan)
    assert value(proto, "g").shape == (2,)
    assert ort_backend.run(proto, ort_backend.random_feeds(m.proto))["y"].shape == (2, 3, 5)


def test_uniform_shared_constants_are_copies():
    """A zero bias shared by two unrelated layers (as exporters dedup them) is pruned per use;
    a shared non-uniform weight couples its uses."""
    nodes = [node("MatMul", ["x", "W1"], ["a"]), node("Add", ["a", "zero"], ["a1"]), node("Relu", ["a1"], ["a2"]),
             node("MatMul", ["a2", "W2"], ["b"]), node("Add", ["b", "zero"], ["b1"]), node("Relu", ["b1"], ["b2"]),
             node("MatMul", ["b2", "W3"], ["y"])]
    inits = [weight("W1", 4, 6), weight("W2", 6, 6), weight("W3", 6, 2), const("zero", np.zeros(6), np.float32)]
    m = build(nodes, {"x": [2, 4]}, {"y": None}, inits)
    a = analyze(m)
    g1, g2 = group_of(a, "W1", 1), group_of(a, "W2", 1)
    assert g1 is not g2 and g1.prunable and g2.prunable
    oracles(m, a)
    assert len({t.name for t in prune(a, {}).graph.initializer if t.name.startswith("zero")}) == 1  # merged back
    shared = build([node("MatMul", ["x", "W"], ["a"]), node("Relu", ["a"], ["a2"]), node("MatMul", ["a2", "W"], ["y"])],
                   {"x": [2, 4]}, {"y": None}, [weight("W", 4, 4)])
    assert not any(g.prunable for g in analyze(shared).groups)  # W's rows and columns: the input and output


RULE_TESTS = {
    "conv": ["test_conv", "test_conv_depthwise", "test_conv_grouped", "test_conv_transpose"],
    "unary": ["test_unary", "test_cast_round_trip", "test_gelu_erf_pattern", "test_unary_not_zero_safe",
              "test_weight_through_unary", "test_second_output"],
    "broadcast": ["test_broadcast", "test_broadcast_nhwc_vector", "test_gelu_erf_pattern", "test_contrib_gelu"],
    "constant": ["test_constant_node_weights"],
    "gemm": ["test_gemm", "test_gemm_trans_a", "test_flatten_to_linear", "test_gap_to_linear"],
    "matmul": ["test_matmul", "test_matmul_weight_left", "test_flatten_nhwc", "test_gather_embedding"],
    "batchnorm": ["test_batchnorm"],
    "instancenorm": ["test_instancenorm"],
    "lrn": ["test_lrn"],
    "softmax": ["test_softmax"],
    "transpose": ["test_transpose", "test_transpose_of_weights", "test_flatten_nhwc", "test_channel_shuffle",
                  "test_gemm_trans_a"],
    "squeeze": ["test_squeeze_unsqueeze", "test_gather_scalar_index", "test_gap_to_linear"],
    "concat": ["test_concat_densenet", "test_dynamic_flatten", "test_dynamic_reshape_keeps_channels"],
    "split": ["test_split"],
    "slice_": ["test_slice", "test_slice_step_pins"],
    "gather": ["test_gather", "test_gather_duplicates", "test_gather_permutation_merges_channels",
               "test_gather_embedding", "test_gather_scalar_index",
               "test_dynamic_flatten"],
    "reshape": ["test_attention_heads", "test_flatten_to_linear", "test_flatten_nhwc", "test_channel_shuffle", "test_dynamic_flatten",
                "test_gap_to_linear", "test_reshape_heads", "test_weight_through_reshape",
                "test_dynamic_reshape_keeps_channels"],
    "expand": ["test_expand"],
    "constant_of_shape": ["test_constant_of_shape"],
    "shape": ["test_dynamic_flatten", "test_dynamic_reshape_keeps_channels", "test_expand", "test_constant_of_shape",
              "test_shape_read_for_unknown_use"],
    "pool": ["test_pool", "test_second_output", "test_gap_to_linear"],
    "reduce": ["test_reduce", "test_dynamic_reshape_keeps_channels"],
    "pad": ["test_pad"],
    "resize": ["test_resize"],
    "layernorm": ["test_attention_heads", "test_hidden_size_through_norms"],
    "skip_layernorm": ["test_contrib_skip_layernorm"],
    "group_query_attention": ["test_group_query_attention"],
    "matmul_nbits": ["test_matmul_nbits"],
    "multi_head_attention": ["test_multi_head_attention"],
    "rotary_embedding": ["test_rotary_embedding"],
}

REWRITER_TESTS = {
    "gqa_attributes": ["test_group_query_attention"],
    "matmul_nbits_sizes": ["test_matmul_nbits"],
    "mha_attributes": ["test_multi_head_attention"],
    "rope_attributes": ["test_rotary_embedding"],
    "conv_group": ["test_conv_depthwise", "test_conv_grouped", "test_conv_transpose"],
    "split_sizes": ["test_split"],
    "slice_window": ["test_slice"],
    "gather_indices": ["test_gather", "test_gather_duplicates", "test_gather_permutation_merges_channels",
                       "test_gather_scalar_index"],
    "shape_constant": ["test_flatten_to_linear", "test_flatten_nhwc", "test_channel_shuffle", "test_reshape_heads",
                       "test_weight_through_reshape", "test_expand", "test_constant_of_shape", "test_resize"],
}


@pytest.mark.parametrize("registry,table", [(RULES, RULE_TESTS), (REWRITERS, REWRITER_TESTS)],
                         ids=["rules", "rewriters"])
def test_every_rule_has_a_test(registry, table):
    """Every rule (and rewriter) function in the registry is named here, with tests that exist."""
    names = {fn.__name__ for fn in registry.values()}
    missing = sorted(names - set(table))
    assert not missing, f"rule functions without a test in tests/test_rules.py: {missing}"
    stale = sorted(set(table) - names)
    assert not stale, f"RULE_TESTS names functions that are no longer registered: {stale}"
    for fn, tests in table.items():
        assert tests, fn
        for t in tests:
            assert callable(globals().get(t)) and t.startswith("test_"), f"{fn}: no test named {t}"


def _shape_arithmetic_graph(cast: bool):
    """x @ W1 -> Relu -> @ W2, its output reshaped to (batch, -1) through Shape -> Gather ->
    Unsqueeze -> Concat; with `cast`, the Shape's integers are also cast to floats (a coupling out
    of the shape arithmetic)."""
    from tests.graphs import build

    nodes = [node("MatMul", ["x", "W1"], ["h"]), node("Relu", ["h"], ["r"]), node("MatMul", ["r", "W2"], ["y"]),
             node("Shape", ["h"], ["s"]), node("Gather", ["s", "zero"], ["b"], axis=0),
             node("Unsqueeze", ["b", "ax0"], ["b1"]), node("Concat", ["b1", "minus1"], ["target"], axis=0),
             node("Reshape", ["y", "target"], ["z"])]
    outputs = {"z": [1, 4]}
    if cast:
        nodes.append(node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT))
        outputs["sf"] = [2]
    inits = [weight("W1", 4, 8), weight("W2", 8, 4), const("zero", np.array(0, dtype=np.int64)),
             const("ax0", np.array([0], dtype=np.int64)), const("minus1", np.array([-1], dtype=np.int64))]
    return build(nodes, {"x": [1, 4]}, outputs, inits)


@pytest.mark.parametrize("cast", [False, True])
def test_shape_arithmetic_skipped_exactly(cast, monkeypatch):
    """The rules of integer shape arithmetic are skipped (analysis._shape_arithmetic) with the same
    groups as when they run; when another node couples such a tensor with a float one, every rule runs."""
    from spa.core import analysis
    from spa.core.analysis import Analysis

    runs, run_rules = [], analysis._run_rules
    monkeypatch.setattr(analysis, "_run_rules", lambda *a, **k: runs.append(len(k.get("skip", ()))) or run_rules(*a, **k))
    skipped = Analysis.to_json(spa.analyze(_shape_arithmetic_graph(cast)))
    assert runs[0] == 3  # Gather, Unsqueeze, Concat
    assert runs[1:] == ([0] if cast else [])  # the Cast's coupling: run again with every rule
    monkeypatch.setattr(analysis, "_shape_arithmetic", lambda index: (set(), set()))
    assert Analysis.to_json(spa.analyze(_shape_arithmetic_graph(cast))) == skipped
    prunable = [g["prunable"] for g in skipped["groups"]]  # h's channels: locked where the Cast exports its shape
    assert prunable and any(prunable) != cast
