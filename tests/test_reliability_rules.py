"""Analysis faults of issue 18: a zero-invariance claim must be proven (class 8: weights computed
at run time, sums over channels made non-zero upstream), the summary says what was removed when
a group's channels overlap (class 9), and a Slice/Split whose output size is unknown never
crashes prune (class 10)."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from spa.backends import ort as ort_backend

import spa
from spa import api
from spa.core.model import Model, infer_shapes
from tests.graphs import build, const, node, weight
from tests.oracles import assert_valid_output, assert_zero_invariance, feeds_for, rel_err
from tests.test_cli import assert_untouched, snapshot
from tests.test_cli import spa as run_cli


def _scalar(name, value):
    return numpy_helper.from_array(np.array(value, np.float32), name)


def _std_conv(stats: str):
    """x -> Conv c1 -> Relu -> Conv c2 (weight standardized at run time from stored w2) -> Relu -> Conv -> y.
    `stats`: "mean" (ReduceMean, BiT-style) or "sum" (ReduceSum times 1/72, the mean of a fixed count)."""
    if stats == "mean":
        mean = [node("ReduceMean", ["w2r"], ["mu"], axes=[1])]
        var = [node("ReduceMean", ["d2"], ["var"], axes=[1])]
    else:
        mean = [node("ReduceSum", ["w2r", "ax"], ["su"]), node("Mul", ["su", "inv"], ["mu"])]
        var = [node("ReduceSum", ["d2", "ax"], ["vs"]), node("Mul", ["vs", "inv"], ["var"])]
    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4), node("Relu", ["c1"], ["r1"]),
             node("Reshape", ["w2", "s2"], ["w2r"]), *mean, node("Sub", ["w2r", "mu"], ["d"]),
             node("Mul", ["d", "d"], ["d2"]), *var, node("Add", ["var", "eps"], ["ve"]), node("Sqrt", ["ve"], ["sd"]),
             node("Div", ["d", "sd"], ["wn"]), node("Reshape", ["wn", "s4"], ["w2s"]),
             node("Conv", ["r1", "w2s", "b2"], ["c2"], kernel_shape=[3, 3], pads=[1] * 4), node("Relu", ["c2"], ["r2"]),
             node("Conv", ["r2", "w3", "b3"], ["y"], kernel_shape=[1, 1])]
    inits = [weight("w1", 8, 3, 3, 3), weight("b1", 8), weight("w2", 4, 8, 3, 3), weight("b2", 4),
             weight("w3", 2, 4, 1, 1), weight("b3", 2), const("s2", [4, 72]), const("s4", [4, 8, 3, 3]),
             const("ax", [1]), _scalar("eps", 1e-5), _scalar("inv", 1 / 72)]
    return build(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 2, 8, 8]}, inits)


def _zeroed_vs_pruned(model, plan) -> float:
    analysis = spa.analyze(model)
    feeds = feeds_for(model)
    zero = ort_backend.run(api.zeroed(analysis, plan), feeds)["y"]
    return rel_err(zero, ort_backend.run(api.prune(analysis, plan), feeds)["y"])


def test_weight_standardization_by_fixed_count_is_not_claimed_exact():
    """The issue's fault: zeroing c1's channels zeroes columns of the stored w2, but w2 - mean
    is not zero there, so the sums of squares differ from the pruned model's."""
    model = _std_conv("sum")
    assert _zeroed_vs_pruned(model, {"w1:0": [2, 3, 4, 6]}) > 1e-3  # the claim would be false
    group = spa.analyze(model).group("w1:0")
    assert group.prunable and not group.zero_invariant
    assert "ReduceSum 'vs'" in group.zi_reason and "not zero" in group.zi_reason and "Sub 'd'" in group.zi_reason
    assert_zero_invariance(model, feeds_for(model))  # what is still claimed holds


def test_bit_style_standardization_still_prunes_its_output_channels_exactly():
    """Per output channel the statistics stay within the channel: pruning w2's rows is exact,
    the input channels (statistics across them) are the hidden kind, not claimed exact."""
    model = _std_conv("mean")
    analysis = spa.analyze(model)
    out, inp = analysis.group("w2:0"), analysis.group("w1:0")
    assert out.prunable and out.zero_invariant
    assert not inp.zero_invariant and "ReduceMean 'mu'" in inp.zi_reason
    plan = assert_zero_invariance(model, feeds_for(model))
    assert plan.get("w2:0")
    pruned = api.prune(analysis, {"w2:0": [1, 3]})
    assert_valid_output(model, pruned, feeds_for(model))
    assert [list(t.dims) for t in pruned.graph.initializer if t.name == "w2"] == [[2, 8, 3, 3]]


def _computed_weight_model():
    """Conv c2 reads Sigmoid(c1) (f(0) = 0.5) with a weight computed as 2 * w2 + 0.1."""
    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
             node("Sigmoid", ["c1"], ["r1"]), node("Mul", ["w2", "two"], ["w2m"]),
             node("Add", ["w2m", "tenth"], ["w2s"]),
             node("Conv", ["r1", "w2s", "b2"], ["y"], kernel_shape=[1, 1])]
    inits = [weight("w1", 8, 3, 3, 3), weight("b1", 8), weight("w2", 2, 8, 1, 1), weight("b2", 2),
             _scalar("two", 2.0), _scalar("tenth", 0.1)]
    return build(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 2, 8, 8]}, inits)


def test_a_weight_computed_at_run_time_is_not_assumed_zeroed():
    model = _computed_weight_model()
    assert _zeroed_vs_pruned(model, {"w1:0": [0, 5]}) > 1e-3
    group = spa.analyze(model).group("w1:0")
    assert group.prunable and not group.zero_invariant and not group.hidden
    assert group.zi_reason.startswith("the weight of Conv 'y' is computed at run time: zeroing its stored "
                                      "channels does not zero it (Add 'w2s'")


def test_a_sum_over_channels_shifted_upstream_is_not_claimed_exact():
    """Conv -> Add 1 -> ReduceSum over the channels: a zeroed channel adds 1 to the sum."""
    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
             node("Add", ["c1", "one"], ["a"]), node("ReduceSum", ["a", "ax"], ["s"], keepdims=1),
             node("Mul", ["s", "x1"], ["y"])]
    inits = [weight("w1", 8, 3, 3, 3), weight("b1", 8), _scalar("one", 1.0), const("ax", [1])]
    model = build(nodes, {"x": [1, 3, 8, 8], "x1": [1, 1, 8, 8]}, {"y": [1, 1, 8, 8]}, inits)
    assert _zeroed_vs_pruned(model, {"w1:0": [1, 2]}) > 1e-3
    group = spa.analyze(model).group("w1:0")
    assert not group.zero_invariant and "ReduceSum 's' sums over this axis" in group.zi_reason
    # a sum over channels that stay zero (Relu) is still exact
    nodes[1] = node("Relu", ["c1"], ["a"])
    model = build(nodes, {"x": [1, 3, 8, 8], "x1": [1, 1, 8, 8]}, {"y": [1, 1, 8, 8]}, inits)
    assert spa.analyze(model).group("w1:0").zero_invariant
    assert_zero_invariance(model, feeds_for(model))


def test_the_reason_reaches_the_cli(capsys, tmp_path):
    path = tmp_path / "std.onnx"
    onnx.save(_std_conv("sum").proto, path)
    before = snapshot(tmp_path)
    res = run_cli(capsys, "analyze", str(path), "--json")
    assert res.rc == 0
    group = next(g for g in json.loads(res.out)["groups"] if g["id"] == "w1:0")
    assert group["zero_invariant"] is False and "ReduceSum 'vs'" in group["zi_reason"]
    assert_untouched(tmp_path, before)


# ---------------------------------------------------------------- class 9: overlapping channels


def _shuffle_model():
    """Conv (4 out) -> channel shuffle (2 x 2) -> Mul with the unshuffled copy -> Conv."""
    nodes = [node("Conv", ["x", "w1", "b1"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             node("Reshape", ["c", "s5"], ["c5"]), node("Transpose", ["c5"], ["t5"], perm=[0, 2, 1, 3, 4]),
             node("Reshape", ["t5", "s4"], ["s"]), node("Mul", ["c", "s"], ["m"]),
             node("Conv", ["m", "w2", "b2"], ["y"], kernel_shape=[1, 1])]
    inits = [weight("w1", 4, 3, 3, 3), weight("b1", 4), weight("w2", 2, 4, 1, 1), weight("b2", 2),
             const("s5", [1, 2, 2, 8, 8]), const("s4", [1, 4, 8, 8])]
    return build(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 2, 8, 8]}, inits)


def test_overlapping_channels_are_reported_as_removed(capsys, tmp_path):
    model = _shuffle_model()
    assert_zero_invariance(model, feeds_for(model))  # the model is right; the report must be too
    src = tmp_path / "shuffle.onnx"
    onnx.save(model.proto, src)
    res = run_cli(capsys, "prune", str(src), "--ratio", "0.5", "-o", str(tmp_path / "a.onnx"), "--json")
    assert res.rc == 0, res.err
    doc = json.loads(res.out)
    assert doc["channels_removed"] == 1
    assert doc["overlapping"] == [{"group": "c5:1", "channels": 1, "tensor": "w1", "axis": 0, "slices": 3, "of": 4}]
    kept = [list(t.dims) for t in onnx.load(tmp_path / "a.onnx").graph.initializer if t.name == "w1"]
    assert kept == [[1, 3, 3, 3]]  # 3 of 4 filters are gone, as the document says
    res = run_cli(capsys, "prune", str(src), "--ratio", "0.5", "-o", str(tmp_path / "b.onnx"))
    assert "1 channel(s) removed 3 of 4 slices of 'w1' (axis 0)" in res.out
    doc = api.prune(str(src), ratio=0.5).to_json()  # the API says the same
    assert doc["overlapping"][0]["slices"] == 3


def test_no_overlap_line_for_ordinary_groups(capsys, tmp_path):
    res = run_cli(capsys, "prune", "examples/tiny_resnet.onnx", "--ratio", "0.5", "-o", str(tmp_path / "o.onnx"),
                  "--json")
    assert res.rc == 0 and json.loads(res.out)["overlapping"] == []


# ---------------------------------------------------------------- class 10: unknown sizes


def _empty_slice_model(path):
    """Slice r[:, 8:] of 8 channels (empty), its bounds also model inputs (old exports), so
    shape inference leaves the output's size unknown while the analysis reads the bounds."""
    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4), node("Relu", ["c1"], ["r"]),
             node("Slice", ["r", "st", "en", "ax"], ["e"]), node("Conv", ["r", "w2", "b2"], ["y"], kernel_shape=[1, 1])]
    inits = [weight("w1", 8, 3, 3, 3), weight("b1", 8), weight("w2", 2, 8, 1, 1), weight("b2", 2),
             const("st", [8]), const("en", [2**62]), const("ax", [1])]
    vi = lambda n, s, t=TensorProto.FLOAT: helper.make_tensor_value_info(n, t, s)
    inputs = [vi("x", [1, 3, 4, 4])] + [vi(n, [1], TensorProto.INT64) for n in ("st", "en", "ax")]
    graph = helper.make_graph(nodes, "g", inputs, [vi("y", [1, 2, 4, 4]), vi("e", [1, "c", 4, 4])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 7
    onnx.save(proto, path)
    return path


def test_prune_through_a_slice_of_unknown_size(capsys, tmp_path):
    """Was: internal error (TypeError: unsupported operand type(s) for +: 'int' and 'NoneType')."""
    src = _empty_slice_model(tmp_path / "slice.onnx")
    analysis = spa.analyze(str(src))
    assert analysis.model.shapes["e"][1] is None and analysis.group("w1:0").prunable
    res = run_cli(capsys, "prune", str(src), "--ratio", "0.3", "-o", str(tmp_path / "out.onnx"))
    assert res.rc == 0 and not res.error_lines, res.err
    x = np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)
    got = ort_backend.run(onnx.load(tmp_path / "out.onnx"), {"x": x})
    assert got["e"].shape == (1, 0, 4, 4) and got["y"].shape == (1, 2, 4, 4)


def test_a_split_with_a_piece_of_unknown_size_keeps_its_sizes():
    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4), node("Relu", ["c1"], ["r"]),
             node("Split", ["r"], ["s0", "s1"], axis=1), node("Conv", ["s0", "w2", "b2"], ["y"], kernel_shape=[1, 1]),
             node("Conv", ["s1", "w3", "b3"], ["z"], kernel_shape=[1, 1])]
    inits = [weight("w1", 8, 3, 3, 3), weight("b1", 8), weight("w2", 2, 4, 1, 1), weight("b2", 2),
             weight("w3", 2, 4, 1, 1), weight("b3", 2)]
    model = build(nodes, {"x": [1, 3, 4, 4]}, {"y": [1, 2, 4, 4], "z": [1, 2, 4, 4]}, inits)
    model = Model(model.proto)
    infer_shapes(model)
    model.shapes["s1"] = (1, None, 4, 4)  # as an export whose shapes inference could not finish
    analysis = spa.analyze(model)
    locked = [g for g in analysis.groups if any(m.tensor == "w1" and m.axis == 0 for m in g.members)]
    assert locked and not any(g.prunable for g in locked)
    assert "split into pieces of unknown size by Split 's0'" in locked[0].reason
    plan = {g.id: [0] for g in analysis.groups if g.prunable}
    api.prune(analysis, plan)  # no crash; nothing on the split axis moves
