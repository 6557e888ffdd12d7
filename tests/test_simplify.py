"""The simplification pre-pass (passes/simplify.py, onnxslim) on tiny graphs and from the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from spa.backends import ort as ort_backend

import spa
from spa import api
from spa.cli.app import main
from spa.reporting import report
from tests.graphs import build, const, node, weight
from tests.oracles import assert_valid_output, assert_zero_invariance

pytest.importorskip("onnxslim")
from spa.passes.simplify import _io, simplify


def _rotary(shared_weight: bool = False):
    """TorchScript's rotate_half with dynamic axes: the half is computed from Shape at run time.

        x[B,S,8] -> MatMul W[8,8] -> h ─┬─ Slice [0, d/2) ──────────┐   d = Shape(h)[2]
                                       └─ Slice [d/2, end) -> Neg ─┴ Concat -> r
        h * cos + r * sin -> MatMul W2[8,4] -> y

    `shared_weight`: W2 is read through Identity(W2s) as well as a second head MatMul.
    """
    nodes = [node("MatMul", ["x", "W"], ["h"]), node("Shape", ["h"], ["sh"]),
             node("Gather", ["sh", "last"], ["d"]), node("Div", ["d", "two"], ["half"]),
             node("Unsqueeze", ["half", "zero"], ["half1"]),
             node("Slice", ["h", "zero1", "half1", "ax"], ["lo"]), node("Slice", ["h", "half1", "big", "ax"], ["hi"]),
             node("Neg", ["hi"], ["nhi"]), node("Concat", ["nhi", "lo"], ["r"], axis=2),
             node("Mul", ["h", "cos"], ["hc"]), node("Mul", ["r", "sin"], ["rs"]), node("Add", ["hc", "rs"], ["e"])]
    inits = [weight("W", 8, 8), const("last", 2), const("two", 2), const("zero", [0]), const("zero1", [0]),
             const("big", [1 << 62]), const("ax", [2]), weight("cos", 8), weight("sin", 8)]
    outputs = {"y": [None, None, 4]}
    if shared_weight:
        nodes += [node("Identity", ["W2s"], ["W2"]), node("MatMul", ["e", "W2"], ["y"]),
                  node("MatMul", ["e", "W2s"], ["y2"])]
        inits.append(weight("W2s", 8, 4))
        outputs["y2"] = [None, None, 4]
    else:
        nodes.append(node("MatMul", ["e", "W2"], ["y"]))
        inits.append(weight("W2", 8, 4))
    return build(nodes, {"x": [None, None, 8]}, outputs, inits)


def _group(analysis, tensor, axis):
    return next(g for g in analysis.groups if any(m.tensor == tensor and m.axis == axis for m in g.members))


def test_folds_run_time_slice_windows():
    """Unsimplified, the run-time window locks W's outputs; folded, they prune as rotary pairs."""
    before = spa.analyze(_rotary())
    assert not _group(before, "W", 1).prunable
    assert report.shape_locked(before)  # "its size is read by Shape 'sh' ..."
    model, stats = simplify(_rotary())
    assert stats["status"] == "ok" and stats["nodes_after"] < stats["nodes_before"]
    assert _io(model.proto) == _io(_rotary().proto)  # same names, types and dynamic dims
    g = _group(spa.analyze(model), "W", 1)
    assert g.prunable and g.zero_invariant and g.size == 4  # channel i and i+4 move together
    assert [list(p) for p in g.positions[("W", 1)]] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert_zero_invariance(model, ort_backend.random_feeds(model.proto, dynamic=2))
    analysis = spa.analyze(model)
    pruned = api.prune(analysis, api.make_plan(analysis, 0.5))
    for batch in (1, 3):  # dynamic axes keep working, against the unsimplified input
        assert_valid_output(_rotary(), pruned, ort_backend.random_feeds(model.proto, dynamic=batch))


def test_shared_weight_stays_shared():
    """Folding Identity(W2s) must not give W2's second use its own copy (ALBERT-style sharing)."""
    original = _rotary(shared_weight=True)
    model, stats = simplify(_rotary(shared_weight=True))
    assert stats["status"] == "ok"
    assert spa.cost.params(model) <= spa.cost.params(original)
    assert sum(t.name.startswith("W2") for t in model.graph.initializer) == 1


def test_failure_leaves_the_model_alone(monkeypatch):
    import onnxslim

    def boom(*a, **k):
        raise RuntimeError("unsupported thing\nsecond line")

    monkeypatch.setattr(onnxslim, "slim", boom)
    model = _rotary()
    same, stats = simplify(model)
    assert same is model
    assert stats == {"nodes_before": len(model.graph.node), "nodes_after": len(model.graph.node),
                     "status": "skipped", "reason": "onnxslim failed: unsupported thing"}


def test_changed_outputs_are_refused(monkeypatch):
    """A simplification that changes what the model computes is not used."""
    import onnxslim

    def wrong(model, **kwargs):
        for t in model.graph.initializer:
            if t.name == "W2":
                t.CopyFrom(weight("W2", 8, 4, seed=7))
        return model

    monkeypatch.setattr(onnxslim, "slim", wrong)
    model = _rotary()
    same, stats = simplify(model)
    assert same is model and stats["status"] == "skipped" and "changes output 'y'" in stats["reason"]


def test_cli_simplify(tmp_path, capsys):
    src = tmp_path / "rot.onnx"
    spa.save(_rotary().proto, src)
    assert main(["analyze", str(src)]) == 0
    assert "--simplify" in capsys.readouterr().err  # the hint
    out = tmp_path / "out.onnx"
    assert main(["prune", str(src), "--ratio", "0.5", "--simplify", "-o", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["simplify"]["status"] == "ok" and doc["check"]["status"] == "ok"
    assert doc["after"]["params"] < doc["before"]["params"]
    feeds = {"x": np.ones((2, 5, 8), np.float32)}
    assert ort_backend.run(str(out), feeds)["y"].shape == (2, 5, 4)
    assert main(["prune", str(src), "--ratio", "0.5", "-o", str(out), "--json"]) == 1  # nothing prunable without


def test_missing_onnxslim_is_a_clear_error(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "onnxslim", None)  # import fails
    with pytest.raises(spa.SpaError, match="needs onnxslim"):
        simplify(_rotary())
    src = tmp_path / "rot.onnx"
    spa.save(_rotary().proto, src)
    assert main(["prune", str(src), "--ratio", "0.5", "--simplify", "-o", str(tmp_path / "o.onnx")]) == 1
    err = capsys.readouterr().err
    assert "pip install 'spa[simplify]'" in err and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()
