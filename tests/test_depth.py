"""Depth pruning: erasable units found from tiny graphs, erased exactly, scored and chosen, and
the API / CLI / plan-file surface (the erasure oracle over real models is in the model tests)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import numpy_helper
from spa.backends import ort as ort_backend
from spa.passes.erase import erase

import spa
from spa.cli import main
from spa.core import depth
from spa.core.errors import SpaError
from tests.graphs import build, conv_relu, node, weight
from tests.oracles import assert_erasure, rel_err


def _blocks(n: int = 3, c: int = 8, last_output: bool = False):
    """x -> stem -> [h_i = h_{i-1} + Conv(Relu(Conv(h_{i-1})))] x n -> y  (identity residuals)"""
    nodes, inits = conv_relu("x", "h0", 3, c, prefix="stem")
    for i in range(1, n + 1):
        a, ia = conv_relu(f"h{i - 1}", f"r{i}", c, c, prefix=f"b{i}.1")
        nodes += a + [node("Conv", [f"r{i}", f"b{i}.2.w", f"b{i}.2.b"], [f"f{i}"], kernel_shape=[3, 3], pads=[1] * 4),
                      node("Add", [f"h{i - 1}", f"f{i}"], [f"h{i}"])]
        inits += ia + [weight(f"b{i}.2.w", c, c, 3, 3), weight(f"b{i}.2.b", c)]
    outputs = {f"h{n}": (1, c, 6, 6)} if last_output else {}
    if not last_output:
        nodes.append(node("Relu", [f"h{n}"], ["y"]))
        outputs = {"y": (1, c, 6, 6)}
    return build(nodes, {"x": (1, 3, 6, 6)}, outputs, inits)


def _feeds(model):
    return ort_backend.random_feeds(model.proto, seed=0)


def test_identity_residuals_are_exact_units():
    model = _blocks()
    units, rejected = depth.find(model)
    assert [u.id for u in units] == ["h1", "h2", "h3"] and not rejected
    u = units[0]
    assert (u.skip, u.branch, u.kind, u.exact) == ("h0", "f1", "conv", True)
    assert sorted(u.zero) == ["b1.2.b", "b1.2.w"] and u.contraction == "f1"
    assert set(u.initializers) == {"b1.1.w", "b1.1.b", "b1.2.w", "b1.2.b"}
    assert u.params == 2 * (8 * 8 * 9 + 8)
    assert assert_erasure(model, _feeds(model)) == 3


def test_erasing_changes_the_outputs_and_removes_the_weights():
    model = _blocks()
    feeds = _feeds(model)
    out = erase(_copy(model.proto), ["h2"])
    names = {t.name for t in out.graph.initializer}
    assert "b2.1.w" not in names and "b2.2.w" not in names and "b1.1.w" in names
    assert len(out.graph.node) == len(model.graph.node) - 4  # Conv, Relu, Conv, Add
    ref, got = ort_backend.run(model.proto, feeds)["y"], ort_backend.run(out, feeds)["y"]
    assert rel_err(ref, got) > 1e-3  # a real removal, not a no-op


def test_units_in_a_row_and_a_unit_that_is_the_graph_output():
    model = _blocks(last_output=True)
    out = erase(_copy(model.proto), ["h2", "h3"])
    assert [o.name for o in out.graph.output] == ["h3"]
    assert [n.op_type for n in out.graph.node if n.output[0] == "h3"] == ["Identity"]
    assert assert_erasure(model, _feeds(model)) == 3


def test_projection_shortcut_is_not_a_unit():
    """x -> Conv(proj) ─┐
       x -> Conv -> Add ┘   neither side is a plain skip"""
    nodes, inits = conv_relu("x", "h", 3, 8, prefix="stem")
    nodes += [node("Conv", ["h", "p.w"], ["s"], kernel_shape=[1, 1]),
              node("Conv", ["h", "f.w"], ["f"], kernel_shape=[3, 3], pads=[1] * 4), node("Add", ["s", "f"], ["y"])]
    inits += [weight("p.w", 8, 8, 1, 1), weight("f.w", 8, 8, 3, 3)]
    units, rejected = depth.find(build(nodes, {"x": (1, 3, 6, 6)}, {"y": (1, 8, 6, 6)}, inits))
    assert not units and rejected == [{"id": "y", "reason": rejected[0]["reason"]}]
    assert "projection shortcut" in rejected[0]["reason"]


def test_a_branch_without_weights_or_writing_an_output_is_not_a_unit():
    nodes, inits = conv_relu("x", "h", 3, 8, prefix="stem")
    nodes += [node("Sigmoid", ["h"], ["g"]), node("Add", ["h", "g"], ["y"])]
    assert depth.find(build(nodes, {"x": (1, 3, 6, 6)}, {"y": (1, 8, 6, 6)}, inits)) == ([], [])
    nodes, inits = conv_relu("x", "h", 3, 8, prefix="stem")
    nodes += [node("Conv", ["h", "f.w"], ["f"], kernel_shape=[1, 1]), node("Add", ["h", "f"], ["y"])]
    inits += [weight("f.w", 8, 8, 1, 1)]
    units, rejected = depth.find(build(nodes, {"x": (1, 3, 6, 6)}, {"y": (1, 8, 6, 6), "f": (1, 8, 6, 6)}, inits))
    assert not units and "writes a graph output" in rejected[0]["reason"]


def test_parallel_branches_summed_into_one_residual_are_one_exact_unit():
    """GPT-NeoX's parallel residual: y = x + (Conv_a(x) + Conv_b(x)) erases both at once."""
    nodes, inits = conv_relu("x", "h", 3, 8, prefix="stem")
    nodes += [node("Conv", ["h", "a.w"], ["a"], kernel_shape=[1, 1]), node("Conv", ["h", "b.w", "b.b"], ["b"],
                                                                          kernel_shape=[1, 1]),
              node("Add", ["a", "b"], ["f"]), node("Mul", ["f", "s"], ["g"]), node("Add", ["h", "g"], ["y"])]
    inits += [weight("a.w", 8, 8, 1, 1), weight("b.w", 8, 8, 1, 1), weight("b.b", 8), weight("s", 1, 8, 1, 1)]
    model = build(nodes, {"x": (1, 3, 6, 6)}, {"y": (1, 8, 6, 6)}, inits)
    units, rejected = depth.find(model)
    assert [u.id for u in units] == ["y"] and units[0].exact and units[0].zero == ["a.w", "b.b", "b.w"]
    assert rejected == [{"id": "f", "reason": rejected[0]["reason"]}]  # a + b: neither is a skip
    assert assert_erasure(model, _feeds(model)) == 1


def test_a_branch_ending_in_a_sigmoid_is_erasable_but_not_exact():
    nodes, inits = conv_relu("x", "h", 3, 8, prefix="stem")
    nodes += [node("Conv", ["h", "f.w"], ["c"], kernel_shape=[1, 1]), node("Sigmoid", ["c"], ["f"]),
              node("Add", ["h", "f"], ["y"])]
    inits += [weight("f.w", 8, 8, 1, 1)]
    units, _ = depth.find(build(nodes, {"x": (1, 3, 6, 6)}, {"y": (1, 8, 6, 6)}, inits))
    assert len(units) == 1 and not units[0].exact and "Sigmoid" in units[0].reason and units[0].zero == []


def test_sum_of_two_paths_is_no_residual():
    """Embeddings plus positions: y = Gather(E, ids) + Gather(P, pos) reads no common skip."""
    nodes = [node("MatMul", ["x", "a.w"], ["a"]), node("MatMul", ["z", "b.w"], ["b"]), node("Add", ["a", "b"], ["y"])]
    model = build(nodes, {"x": (2, 4), "z": (2, 4)}, {"y": (2, 4)}, [weight("a.w", 4, 4), weight("b.w", 4, 4)])
    assert depth.find(model) == ([], [{"id": "y", "reason": depth.find(model)[1][0]["reason"]}])


def _plain_net():
    """x -> Conv(3->8) -> Relu -> [Conv(8->8) -> BN -> Relu] -> MaxPool -> [Conv(8->8)] -> Conv(8->4) -> y
    (no residual: the bracketed layers keep their input's shape, so they are chains)"""
    nodes, inits = conv_relu("x", "h0", 3, 8, prefix="stem")
    nodes += [node("Conv", ["h0", "c1.w"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
              node("BatchNormalization", ["c1", "bn.s", "bn.b", "bn.m", "bn.v"], ["n1"]), node("Relu", ["n1"], ["h1"]),
              node("MaxPool", ["h1"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
              node("Conv", ["p", "c2.w", "c2.b"], ["h2"], kernel_shape=[1, 1]),
              node("Conv", ["h2", "c3.w"], ["y"], kernel_shape=[1, 1])]
    inits += [weight("c1.w", 8, 8, 3, 3), weight("c2.w", 8, 8, 1, 1), weight("c2.b", 8), weight("c3.w", 4, 8, 1, 1)]
    inits += [numpy_helper.from_array(np.abs(np.random.default_rng(k).standard_normal(8)).astype(np.float32) + 0.5,
                                      f"bn.{n}") for k, n in enumerate("sbmv")]
    return build(nodes, {"x": (1, 3, 8, 8)}, {"y": (1, 4, 4, 4)}, inits)


def test_layers_that_keep_their_shape_are_chains():
    model = _plain_net()
    units, rejected = depth.find(model)
    assert [(u.id, u.skip, u.kind, u.exact) for u in units] == [("h1", "h0", "chain", False), ("h2", "p", "chain", False)]
    assert units[0].nodes == ["c1", "n1", "h1"] and set(units[0].initializers) == {"c1.w", "bn.s", "bn.b", "bn.m",
                                                                                     "bn.v"}
    assert "bypassed" in units[0].reason and not rejected
    feeds = _feeds(model)
    out = erase(_copy(model.proto), ["h1", "h2"])
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu", "MaxPool", "Conv"]
    got = ort_backend.run(out, feeds)["y"]
    assert got.shape == (1, 4, 4, 4) and rel_err(ort_backend.run(model.proto, feeds)["y"], got) > 1e-3
    doc = spa.prune(model.proto, erase=1).to_json()
    assert doc["depth"]["erased"][0]["kind"] == "chain" and doc["check"]["status"] == "ok"


def test_a_chain_ending_in_a_bias_add_is_located():
    """MatMul -> Add(bias): the Add is no residual, and erasing the chain finds it all the same."""
    nodes = [node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["h"]), node("MatMul", ["h", "v"], ["y"])]
    model = build(nodes, {"x": (2, 4)}, {"y": (2, 3)}, [weight("w", 4, 4), weight("b", 4), weight("v", 4, 3)])
    assert [(u.id, u.kind) for u in depth.find(model)[0]] == [("h", "chain")]
    out = erase(_copy(model.proto), ["h"])
    assert [n.op_type for n in out.graph.node] == ["MatMul"] and out.graph.node[0].input[0] == "x"


def test_prune_erases_the_lowest_influence_units(tmp_path):
    model = _blocks(n=4)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.proto.SerializeToString())
    doc = spa.prune(str(path), erase=2, output=str(tmp_path / "out.onnx"), save_plan=str(tmp_path / "plan.json")).to_json()
    d = doc["depth"]
    assert (d["units"], d["units_after"], len(d["erased"]), d["scored_on"]) == (4, 2, 2, "random")
    scores = sorted(u["influence"] for u in d["erased"])
    assert all(0 <= s < 1 for s in scores)
    assert doc["after"]["params"] < doc["before"]["params"] and doc["after"]["macs"] < doc["before"]["macs"]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["erase"] == [u["id"] for u in d["erased"]] and plan["groups"] == {}
    again = spa.prune(str(path), plan=str(tmp_path / "plan.json"), output=str(tmp_path / "again.onnx")).to_json()
    assert [u["id"] for u in again["depth"]["erased"]] == plan["erase"] and again["depth"]["scored_on"] is None
    a, b = (spa.load(tmp_path / f).proto for f in ("out.onnx", "again.onnx"))
    assert [n.name for n in a.graph.node] == [n.name for n in b.graph.node]


def test_erase_with_channel_pruning_and_by_ratio(tmp_path):
    model = _blocks(n=4)
    both = spa.prune(model.proto, ratio=0.25, erase_ratio=0.5).to_json()
    assert both["channels_removed"] > 0 and len(both["depth"]["erased"]) == 2
    assert both["after"]["params"] < spa.prune(model.proto, ratio=0.25).to_json()["after"]["params"]
    plan = tmp_path / "plan.json"
    first = spa.prune(model.proto, ratio=0.25, erase=1, save_plan=str(plan))
    doc = json.loads(plan.read_text())
    assert doc["erase"] and any(doc["groups"].values())
    again = spa.prune(model.proto, plan=str(plan))
    assert again.to_json()["after"] == first.to_json()["after"]
    feeds = _feeds(model)
    np.testing.assert_array_equal(ort_backend.run(first.model, feeds)["y"], ort_backend.run(again.model, feeds)["y"])


def test_one_macs_budget_for_both_axes():
    """erase= with target_macs=: the target bounds the final model; channels take what erasing left."""
    model = _blocks(n=4)
    doc = spa.prune(model.proto, target_macs=0.5, erase=1).to_json()
    assert doc["after"]["macs"] <= 0.5 * doc["before"]["macs"] * 1.01
    assert doc["channels_removed"] > 0 and len(doc["depth"]["erased"]) == 1
    assert 0.5 < doc["depth"]["channel_target"] < 1  # rescaled to the erased model
    assert doc["check"]["status"] == "ok" and doc["check"]["max_rel_err"] > 0  # against the input, not the erased one
    met = spa.prune(model.proto, target_macs=0.95, erase=2).to_json()  # erasing alone meets it
    assert met["depth"]["channel_target"] == 1.0 and met["channels_removed"] == 0
    assert met["after"]["macs"] < 0.95 * met["before"]["macs"]


def test_auto_searches_the_split_within_one_budget(tmp_path, capsys):
    model = _blocks(n=4)
    doc = spa.prune(model.proto, target_macs=0.6, erase="auto").to_json()
    trials = doc["depth"]["auto"]
    assert [t["erase"] for t in trials] == list(range(len(trials))) and len(trials) >= 2
    assert all(t["macs"] <= 0.6 * doc["before"]["macs"] * 1.01 for t in trials)
    best = max(trials, key=lambda t: (t["agreement"], -t["erase"]))
    assert len(doc["depth"]["erased"]) == best["erase"] and doc["agreement"]["agreement"] == best["agreement"]
    path = tmp_path / "m.onnx"
    path.write_bytes(model.proto.SerializeToString())
    assert main(["prune", str(path), "--target-macs", "0.6", "--erase", "auto", "-o", str(tmp_path / "o.onnx")]) == 0
    with pytest.raises(SystemExit) as exit_:
        main(["prune", str(path), "--erase", "some"])
    assert exit_.value.code == 2 and "a number of units or 'auto'" in capsys.readouterr().err


def test_with_calibration_an_erased_branch_becomes_its_mean():
    """compensate=True: y = x + f(x) -> y = x + E[f(x)] per channel, closer to the input model than
    y = x on the same data (least squares); plain erasure by default."""
    model = _blocks(n=3)
    calib = {"x": np.random.default_rng(0).standard_normal((16, 3, 6, 6)).astype(np.float32)}
    kept = spa.prune(model.proto, plan={"schema_version": 1, "groups": {}, "erase": ["h2"]}, calib=calib,
                     compensate=True)
    plain = spa.prune(model.proto, plan={"schema_version": 1, "groups": {}, "erase": ["h2"]}, calib=calib)
    assert kept.to_json()["depth"]["compensated"] == ["h2"] and "compensated" not in plain.to_json()["depth"]
    mean = numpy_helper.to_array(next(t for t in kept.model.graph.initializer if t.name == "h2.erased_mean"))
    assert mean.shape == (1, 8, 1, 1) and np.abs(mean).max() > 0
    samples = [{"x": calib["x"][k:k + 1]} for k in range(8)]  # the model takes batch 1
    ref = np.concatenate([ort_backend.run(model.proto, f)["y"] for f in samples])
    err = {k: rel_err(ref, np.concatenate([ort_backend.run(r.model, f)["y"] for f in samples]))
           for k, r in (("kept", kept), ("plain", plain))}
    assert err["kept"] < err["plain"]
    assert {n.op_type for n in kept.model.graph.node} == {n.op_type for n in plain.model.graph.node}
    assert len(kept.model.graph.node) == len(plain.model.graph.node) + 1  # the Add of the mean


def test_a_latency_budget_is_shared_by_measuring_the_erased_model():
    doc = spa.prune(_blocks(n=4).proto, target_latency=0.8, erase=1).to_json()
    d = doc["depth"]
    assert 0 < d["latency_ratio"] < 1.5 and d["channel_target"] == pytest.approx(min(1.0, 0.8 / d["latency_ratio"]))
    assert len(d["erased"]) == 1 and doc["check"]["status"] == "ok"


@pytest.mark.parametrize("kwargs,message", [
    ({"erase": 9}, "has 4 erasable units"),
    ({"plan": {"schema_version": 1, "groups": {}, "erase": ["nope"]}}, "cannot erase unit 'nope'"),
    ({"plan": {"schema_version": 1, "groups": {}, "erase": "h1"}}, "list of unit ids"),
])
def test_bad_erasure_is_a_clear_error(kwargs, message):
    with pytest.raises(SpaError, match=message):
        spa.prune(_blocks(n=4).proto, **kwargs)


@pytest.mark.parametrize("kwargs", [{"erase": -1}, {"erase": 1, "erase_ratio": 0.5}, {"erase_ratio": 1.0},
                                    {"erase": 1, "zeros": True}, {"erase": "auto", "ratio": 0.3},
                                    {"erase": "auto", "target_macs": 0.5, "check": False}])
def test_bad_erase_options_are_usage_errors(kwargs):
    with pytest.raises(SpaError):
        spa.prune(_blocks(n=2).proto, **kwargs)


def test_cli_erase_and_analyze_list_units(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    path.write_bytes(_blocks(n=3).proto.SerializeToString())
    assert main(["prune", str(path), "--erase", "1", "-o", str(tmp_path / "o.onnx")]) == 0
    assert "erased 1 of 3 erasable units (1 conv" in capsys.readouterr().out
    assert main(["analyze", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [u["id"] for u in doc["erasable"]] == ["h1", "h2", "h3"] and doc["not_erasable"] == []
    assert all(u["exact"] and u["nodes"] and u["initializers"] for u in doc["erasable"])
    assert main(["prune", str(path), "--erase", "1", "--zeros"]) == 2


def test_no_way_at_all_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    path.write_bytes(_blocks(n=1).proto.SerializeToString())
    assert main(["prune", str(path)]) == 2
    assert "erase" in capsys.readouterr().err


def test_calibrated_influence_ranks_a_silent_branch_first():
    """A branch whose weights are tiny barely changes the stream: it is erased first."""
    model = _blocks(n=3)
    for t in model.proto.graph.initializer:
        if t.name == "b2.2.w":
            t.CopyFrom(numpy_helper.from_array(np.full((8, 8, 3, 3), 1e-4, np.float32), t.name))
        if t.name == "b2.2.b":
            t.CopyFrom(numpy_helper.from_array(np.zeros(8, np.float32), t.name))
    calib = {"x": np.random.default_rng(0).standard_normal((4, 3, 6, 6)).astype(np.float32)}
    doc = spa.prune(model.proto, erase=1, calib=calib).to_json()["depth"]
    assert doc["erased"][0]["id"] == "h2" and doc["scored_on"] == "calibration"
    assert doc["erased"][0]["relative"] < 0.1
    by_output = spa.prune(model.proto, erase=1, calib=calib, erase_by="fidelity").to_json()["depth"]["erased"][0]
    assert by_output["id"] == "h2" and 0 <= by_output["fidelity"] < 0.01  # the output barely moves
    with pytest.raises(SpaError, match="erase_by"):
        spa.prune(model.proto, erase=1, erase_by="magic")


def _copy(proto):
    out = type(proto)()
    out.CopyFrom(proto)
    return out
