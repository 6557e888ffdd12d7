"""spa.sensitivity: fidelity loss per group and ratio, protection of sensitive groups, table and plot."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from onnx import helper, numpy_helper

import spa
from spa.core.errors import SpaError
from spa.core.model import Model, infer_shapes
from spa.planning import planner, sensitivity
from spa.scoring import criteria
from tests.graphs import build, node, weight

RATIOS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)


def _conv(x, y, cin, cout, prefix, scale=1.0, relu=False, positive=False):
    """x -> Conv(W * scale) [-> Relu] -> y (no bias); `positive`: |W|."""
    w = numpy_helper.to_array(weight(f"{prefix}.w", cout, cin, 3, 3)) * np.float32(scale)
    w = np.abs(w) if positive else w
    conv_out = f"{prefix}.c" if relu else y
    nodes = [node("Conv", [x, f"{prefix}.w"], [conv_out], kernel_shape=[3, 3], pads=[1] * 4)]
    nodes += [node("Relu", [conv_out], [y])] if relu else []
    return nodes, [numpy_helper.from_array(w, f"{prefix}.w")]


def _model(parts, output="y"):
    nodes = [n for p in parts for n in p[0]]
    inits = [i for p in parts for i in p[1]]
    return build(nodes, {"x": [None, 3, 6, 6]}, {output: [None, 4, 6, 6]}, inits)


def chain(positive=False):
    """x[N,3,6,6] -> A (3->8, Relu) -> a -> B (8->8, Relu) -> b -> C (8->4) -> y"""
    return _model([_conv("x", "a", 3, 8, "A", relu=True, positive=positive),
                   _conv("a", "b", 8, 8, "B", relu=True, positive=positive), _conv("b", "y", 8, 4, "C", positive=positive)])


def branches(scale=0.01):
    """x -> A (3->8, Relu) -> C (8->4)           -> c ┐
       x -> B (3->8, Relu) -> D (8->4, W*scale) -> d ┴ Add -> y     (B's channels barely matter)"""
    return _model([_conv("x", "a", 3, 8, "A", relu=True), _conv("a", "c", 8, 4, "C"),
                   _conv("x", "b", 3, 8, "B", relu=True), _conv("b", "d", 8, 4, "D", scale),
                   ([node("Add", ["c", "d"], ["y"])], [])])


def softmax_chain():
    """x -> A (3->8, Relu) -> Softmax(axis=1) -> C (8->4) -> y     (A's group is not zero-invariant)"""
    return _model([_conv("x", "a", 3, 8, "A", relu=True), ([node("Softmax", ["a"], ["s"], axis=1)], []),
                   _conv("s", "y", 8, 4, "C")])


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal((40, 3, 6, 6)).astype(np.float32)


def _row(sens, gid):
    return next(g for g in sens["groups"] if g["id"] == gid)


def _pruned_loss(analysis, gid, ratio, x):
    """1 - cosine of the physically pruned model against the original, via spa.evaluate."""
    g = analysis.group(gid)
    plan = planner.uniform([g], criteria.score(analysis, "l1", groups=[g]), ratio)
    doc = spa.evaluate(spa.prune(analysis, plan), {"x": x}, reference=analysis.model.proto)
    return 1 - doc["fidelity"]["y"]["cosine"], doc["fidelity"]["y"]["rel_err"]


def test_loss_is_zero_until_channels_drop_then_grows(x):
    """Non-negative weights and inputs: each channel adds a non-negative part to every output
    value, so the drop sets (nested as the ratio grows) take the outputs ever further away."""
    a = spa.analyze(chain(positive=True))
    sens = sensitivity.sensitivity(a, {"x": np.abs(x)}, RATIOS)
    assert [g["id"] for g in sens["groups"]] == ["A.w:0", "B.w:0"]  # prunable groups, in analysis order
    for g in sens["groups"]:
        assert g["channels_dropped"] == [0, 0, 2, 4, 5, 7]  # int(8 * ratio)
        assert g["loss"][:2] == [0.0, 0.0] and g["rel_err"][:2] == [0.0, 0.0]
        for key in ("loss", "rel_err"):
            assert all(lo <= hi for lo, hi in zip(g[key], g[key][1:])), (key, g[key])
        assert g["loss"][2] > 0 and g["rel_err"][-1] > 0.1 and g["zero_invariant"]


def test_zero_invariant_trials_equal_physical_pruning(x):
    """The overridable-initializer shortcut measures what pruning the group really costs."""
    a = spa.analyze(chain())
    sens = sensitivity.sensitivity(a, {"x": x}, (0.3, 0.7))
    for gid in ("A.w:0", "B.w:0"):
        for i, r in enumerate((0.3, 0.7)):
            loss, rel = _pruned_loss(a, gid, r, x)
            assert _row(sens, gid)["loss"][i] == pytest.approx(loss, abs=1e-6)
            assert _row(sens, gid)["rel_err"][i] == pytest.approx(rel, rel=1e-4)


def _stored_as(model, how):
    """The chain with A's weight stored another way: a Constant node, an Identity of an
    initializer, or IR version 3 (every initializer listed as a graph input)."""
    graph = model.proto.graph
    w = next(t for t in graph.initializer if t.name == "A.w")
    if how == "constant":
        graph.initializer.remove(w)
        graph.node.insert(0, node("Constant", [], ["A.w"], value=w))
    elif how == "identity":
        w.name = "A.w.raw"
        graph.node.insert(0, node("Identity", ["A.w.raw"], ["A.w"]))
    elif how == "ir3":
        model.proto.ir_version = 3
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer)
    out = Model(model.proto)
    infer_shapes(out)
    return out


@pytest.mark.parametrize("how,gid", [("constant", "A.w:0"), ("identity", "A.w.raw:0"), ("ir3", "A.w:0")])
def test_weights_stored_otherwise_still_take_the_fast_path(x, how, gid, monkeypatch):
    a = spa.analyze(_stored_as(chain(), how))
    assert a.group(gid).zero_invariant
    expected = _pruned_loss(a, gid, 0.5, x)[0]

    def no_prune(*args, **kwargs):
        raise AssertionError("a zero-invariant group was pruned instead of fed zeroed weights")

    monkeypatch.setattr(sensitivity.prune_pass, "apply", no_prune)  # what sensitivity prunes with
    sens = sensitivity.sensitivity(a, {"x": x}, (0.5,), groups=[gid, "B.w:0"])
    assert _row(sens, gid)["loss"][0] == pytest.approx(expected, abs=1e-6) and expected > 1e-3


def test_not_zero_invariant_group_is_pruned_for_real(x):
    a = spa.analyze(softmax_chain())
    sens = sensitivity.sensitivity(a, {"x": x}, (0.5,))
    row = _row(sens, "A.w:0")
    assert not row["zero_invariant"] and row["channels_dropped"] == [4]
    loss, _ = _pruned_loss(a, "A.w:0", 0.5, x)
    assert row["loss"][0] == pytest.approx(loss, abs=1e-6) and loss > 1e-4


def test_group_feeding_little_is_less_sensitive(x):
    a = spa.analyze(branches(scale=0.01))
    sens = sensitivity.sensitivity(a, {"x": x}, (0.3, 0.5, 0.9))
    strong, weak = _row(sens, "A.w:0"), _row(sens, "B.w:0")
    assert all(w < s / 100 for w, s in zip(weak["rel_err"], strong["rel_err"])), (weak, strong)
    assert all(w < s for w, s in zip(weak["loss"], strong["loss"]))
    assert sensitivity.table_rows(sens)[0][0] == "A.w:0"  # most sensitive first


def test_data_forms_and_sample_cap(x):
    a = spa.analyze(chain())
    from_dict = sensitivity.sensitivity(a, {"x": x, "labels": np.zeros(40)}, (0.5,), max_samples=10, batch_size=4)
    feeds = ({"x": x[i:i + 5]} for i in range(0, 40, 5))  # a one-shot iterable of feed dicts, used whole
    from_iter = sensitivity.sensitivity(a, feeds, (0.5,), max_samples=8)
    assert from_dict["samples"] == from_iter["samples"] == 10
    for g, h in zip(from_dict["groups"], from_iter["groups"]):
        assert g["loss"][0] == pytest.approx(h["loss"][0], abs=1e-6) and g["loss"][0] > 0
    full = sensitivity.sensitivity(a, {"x": x}, (0.5,))
    assert full["samples"] == 40


def test_progress_and_json(x):
    a = spa.analyze(chain())
    calls = []
    sens = sensitivity.sensitivity(a, {"x": x}, (0.5, 0.1), progress=lambda d, t: calls.append((d, t)),
                                   groups=["B.w:0"])
    assert calls == [(0, 1), (1, 1)]  # a trial per ratio that drops channels: 0.1 of 8 drops none
    assert sens["groups"][0]["channels_dropped"] == [0, 4] and sens["groups"][0]["loss"][0] == 0.0
    assert sens["ratios"] == [0.1, 0.5] and [g["id"] for g in sens["groups"]] == ["B.w:0"]
    assert json.loads(json.dumps(sens, allow_nan=False)) == sens
    assert sens["schema_version"] == 1 and sens["criterion"] == "l1"


@pytest.mark.parametrize("criterion", ["l2", "fpgm", "random", "mean-act", "apoz", "obspa"])
def test_every_criterion_including_data_ones(x, criterion):
    """Criteria that need activation statistics get them from the calibration samples."""
    a = spa.analyze(chain())
    sens = sensitivity.sensitivity(a, {"x": x}, (0.5,), criterion=criterion)
    assert sens["criterion"] == criterion and all(g["channels_dropped"] == [4] for g in sens["groups"])
    assert all(0 < g["loss"][0] <= sensitivity.WORST for g in sens["groups"])


@pytest.mark.parametrize("kwargs,message", [
    ({"groups": ["nope:0"]}, "no channel group 'nope:0'"),
    ({"groups": ["C.w:0"]}, "not prunable"),
    ({"ratios": (0.5, 1.0)}, "invalid ratios=1.0"),
    ({"ratios": ()}, "no ratios"),
    ({"output": "z"}, "no float output 'z'"),
    ({"max_samples": 0}, "must be positive"),
    ({"criterion": "nope"}, "unknown criterion 'nope'"),
])
def test_errors(x, kwargs, message):
    a = spa.analyze(chain())
    with pytest.raises(SpaError, match=message.replace("(", r"\(").replace(".", r"\.")):
        sensitivity.sensitivity(a, {"x": x}, **{"ratios": (0.5,), **kwargs})


def test_missing_input_in_data(x):
    a = spa.analyze(chain())
    with pytest.raises(SpaError, match="no array for model input"):
        sensitivity.sensitivity(a, {"z": x}, (0.5,))
    with pytest.raises(SpaError, match="lack model input"):
        sensitivity.sensitivity(a, [{"z": x}], (0.5,))


def test_infinite_outputs():
    """-inf in the dense outputs (a mask) counts only where a trial differs; NaN data is refused."""
    dense = [{"y": np.array([1.0, 2.0, -np.inf], np.float32)}]
    same = [{"y": np.array([1.0, 2.0, -np.inf], np.float32)}]
    assert sensitivity._fidelity(same, dense) == (0.0, 0.0)
    for bad in ([1.0, 2.0, 0.0], [1.0, np.nan, -np.inf], [np.inf, 2.0, -np.inf]):
        assert sensitivity._fidelity([{"y": np.array(bad, np.float32)}], dense) == (sensitivity.WORST, None)
    a = spa.analyze(chain())
    with pytest.raises(SpaError, match="NaN outputs"):
        sensitivity.sensitivity(a, {"x": np.full((2, 3, 6, 6), np.nan, np.float32)}, (0.5,))


def _fake():
    return {"schema_version": 1, "criterion": "l1", "ratios": [0.1, 0.3, 0.5, 0.7], "samples": 1, "groups": [
        {"id": "g1", "size": 8, "zero_invariant": True, "loss": [0.0, 0.001, 0.02, 0.5]},
        {"id": "g2", "size": 8, "zero_invariant": True, "loss": [0.05, 0.1, 0.2, 0.3]},
        {"id": "g3", "size": 8, "zero_invariant": False, "loss": [0.0, 0.0, 0.005, 0.009]},
    ]}


def test_protect_honours_max_loss():
    sens = _fake()
    assert sensitivity.protect(sens, 0.5, 0.01) == {"g1": 0.3, "g2": 0.0, "g3": 0.5}
    assert sensitivity.protect(sens, 0.6, 0.01) == {"g1": 0.3, "g2": 0.0, "g3": 0.5}  # never above `ratio`
    assert sensitivity.protect(sens, 0.7, 0.5) == {"g1": 0.7, "g2": 0.7, "g3": 0.7}
    assert sensitivity.protect(sens, 0.05, 1.0) == {"g1": 0.0, "g2": 0.0, "g3": 0.0}
    with pytest.raises(SpaError, match="invalid max loss"):
        sensitivity.protect(sens, 0.5, -1)


@pytest.mark.parametrize("text,message", [
    (None, "no such file"), ("{", "not valid JSON"), ('{"schema_version": 2, "ratios": [], "groups": []}', "not a spa"),
    ('{"schema_version": 1, "ratios": [0.5], "groups": [{"id": "g", "loss": []}]}', "one loss per ratio"),
])
def test_read(tmp_path, text, message):
    good = tmp_path / "sens.json"
    good.write_text(json.dumps(_fake()))
    assert sensitivity.read(good) == _fake()
    bad = tmp_path / "bad.json"
    if text is not None:
        bad.write_text(text)
    with pytest.raises(SpaError, match=message):
        sensitivity.read(bad)


def test_table_rows_most_sensitive_first():
    sens = _fake()
    rows = sensitivity.table_rows(sens)
    assert [r[0] for r in rows] == ["g1", "g2", "g3"]
    assert rows[2] == ["g3", "8", "no", "0", "0", "0.005", "0.009"]
    assert len(sensitivity.table_columns(sens)) == len(rows[0])


def test_plan_with_ratios_respects_them(x):
    a = spa.analyze(branches())
    scores = criteria.score(a, "l1")
    plan = sensitivity.plan_with_ratios(a, scores, {"A.w:0": 0.5, "B.w:0": 0.0})
    assert list(plan) == ["A.w:0"] and plan["A.w:0"] == planner.uniform([a.group("A.w:0")], scores, 0.5)["A.w:0"]
    assert len(sensitivity.plan_with_ratios(a, scores, {"A.w:0": 0.3, "B.w:0": 0.3}, round_to=3)["B.w:0"]) == 2
    with pytest.raises(SpaError, match="no channel group 'gone:0'"):
        sensitivity.plan_with_ratios(a, scores, {"gone:0": 0.5})


def test_protect_then_plan_keeps_every_group_within_max_loss(x):
    """End to end: measure, protect at 1e-3, plan; each group's own measured loss stays under it."""
    a = spa.analyze(branches())
    sens = sensitivity.sensitivity(a, {"x": x}, (0.3, 0.5, 0.9))
    ratios = sensitivity.protect(sens, 0.9, 1e-3)
    assert ratios["A.w:0"] < ratios["B.w:0"] == 0.9  # the sensitive branch is protected
    plan = sensitivity.plan_with_ratios(a, criteria.score(a, "l1"), ratios)
    for gid, r in ratios.items():
        row = _row(sens, gid)
        dropped = row["channels_dropped"][sens["ratios"].index(r)] if r else 0
        assert len(plan.get(gid, [])) == dropped
        assert r == 0 or row["loss"][sens["ratios"].index(r)] <= 1e-3


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".svg", b"<?xml")])
def test_plot_writes_file(tmp_path, suffix, magic):
    pytest.importorskip("matplotlib")
    sens = _fake()
    sens["groups"] += [dict(sens["groups"][0], id=f"more{i}") for i in range(12)]  # legend: top 10 only
    path = sensitivity.plot(sens, tmp_path / f"sens{suffix}")
    assert path.stat().st_size > 1000 and path.read_bytes().startswith(magic)


def test_plot_errors(tmp_path, monkeypatch):
    with pytest.raises(SpaError, match="unsupported format"):
        sensitivity.plot(_fake(), tmp_path / "sens.jpg")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SpaError, match=r"matplotlib is needed for plot=\. Hint: pip install 'spa\[plot\]'"):
        sensitivity.plot(_fake(), tmp_path / "sens.png")
    assert not (tmp_path / "sens.png").exists()
