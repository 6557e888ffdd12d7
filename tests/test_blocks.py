"""Attention blocks as `spa analyze` shows them (spa/core/blocks.py), on the one-block graph of
tests/test_rules.py (H=2 heads of D=3 over hidden 4) and from the CLI."""

from __future__ import annotations

import json

import spa
from spa import api
from spa.cli.app import main
from spa.core.blocks import attention_blocks
from tests.test_rules import _attention


def _ids(analysis, *spaces):
    return [next(g.id for g in analysis.groups if s in g.positions) for s in spaces]


def test_one_block_before_and_after():
    a = spa.analyze(_attention([None, None, 4], "const"))
    heads, head_dim, v_head_dim = _ids(a, ("q4", 2), ("q4", 3), ("v4", 3))
    (block,) = attention_blocks(a)
    assert block.softmax == "pr"
    assert (block.heads.before, block.heads.after, block.heads.groups) == (2, 2, [heads])
    assert (block.head_dim.before, block.head_dim.groups) == (3, [head_dim])
    assert (block.v_head_dim.before, block.v_head_dim.groups) == (3, [v_head_dim])
    assert block.intermediate == []  # Wh's outputs are the model output; the hidden size is not an MLP width
    (after,) = attention_blocks(a, {heads: [1], v_head_dim: [0, 2]})
    assert (after.heads.after, after.head_dim.after, after.v_head_dim.after) == (1, 3, 1)
    assert after.heads.text() == "2 -> 1" and after.head_dim.text() == "3"


def test_no_attention_no_blocks():
    from tests.graphs import build, node, weight

    m = build([node("MatMul", ["x", "W"], ["h"]), node("Softmax", ["h"], ["y"], axis=-1)], {"x": [2, 4]},
              {"y": [2, 3]}, [weight("W", 4, 3)])
    assert attention_blocks(spa.analyze(m)) == []  # a classifier's Softmax has no value MatMul


def test_cli_preview_and_prune(tmp_path, capsys):
    src = tmp_path / "attn.onnx"
    spa.save(_attention([None, None, 4], "const").proto, src)
    assert main(["analyze", str(src), "--ratio", "0.5", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (block,) = doc["attention_blocks"]
    assert (block["heads"]["before"], block["heads"]["after"]) == (2, 1)
    assert (block["head_dim"]["before"], block["head_dim"]["after"]) == (3, 2)
    assert doc["preview"]["channels_removed"] > 0 and doc["simplify"] is None
    assert main(["analyze", str(src), "--ratio", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "attention blocks (before -> after, ratio 0.5)" in text and "2 -> 1" in text
    plan = tmp_path / "plan.json"
    out = tmp_path / "out.onnx"
    assert main(["prune", str(src), "--ratio", "0.5", "-o", str(out), "--save-plan", str(plan), "--json"]) == 0
    pruned_doc = json.loads(capsys.readouterr().out)
    assert pruned_doc["attention_blocks"] == doc["attention_blocks"]
    assert main(["analyze", str(src), "--plan", str(plan), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["attention_blocks"] == doc["attention_blocks"]
    (now,) = attention_blocks(spa.analyze(api.reinfer(spa.load(out).proto)))  # the pruned model itself
    assert (now.heads.before, now.head_dim.before, now.v_head_dim.before) == (1, 2, 2)


def test_a_fixed_axis_says_why():
    """An attention size no plan can change carries a reason in the table and the JSON: here the
    keys are also a graph output (as a KV cache's present.N.key is), so heads and head_dim stay."""
    import onnx

    from spa.core.model import Model, infer_shapes

    (free,) = attention_blocks(spa.analyze(_attention([None, None, 4], "const")))
    assert free.heads.fixed is None and free.head_dim.to_json()["fixed"] is None
    model = _attention([None, None, 4], "const")
    model.proto.graph.output.append(onnx.helper.make_tensor_value_info("k0", onnx.TensorProto.FLOAT, None))
    locked = Model(model.proto)
    infer_shapes(locked)
    (block,) = attention_blocks(spa.analyze(locked))
    assert block.heads.text().startswith("2 (fixed: no channel group reaches this axis")
    assert "graph input or output" in block.head_dim.to_json()["fixed"] and "--simplify" in block.heads.fixed
    assert block.v_head_dim.fixed is None  # values are not an output: still prunable


def test_alike_blocks_share_one_row(capsys):
    from spa.reporting import report

    a = spa.analyze(_attention([None, None, 4], "const"))
    (block,) = [b.to_json() for b in attention_blocks(a)]
    other = json.loads(json.dumps(block))
    other["heads"]["after"] = 1
    report.print_blocks([block, block, block, other, block], "attention blocks")
    rows = [line for line in capsys.readouterr().out.splitlines() if "│ pr" in line]
    assert [r.split("│")[1].strip() for r in rows] == ["0-2", "3", "4"]  # only neighbours alike merge
    assert "(and 2 alike)" in rows[0] and "alike" not in rows[1]
