"""Distillation on unlabeled data (issue 19, point 3): each output gets the loss its kind needs
(class scores, distributions, maps), every shared output is distilled when there are no labels,
and the recovered model agrees with the dense one better than the pruned one did."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")

import spa
from spa.training.distill import Distiller, output_kind
from tests.graphs import build, node, weight
from tests.test_cli import snapshot
from tests.test_cli import spa as run


@pytest.mark.parametrize("values, kind", [
    (np.random.default_rng(0).standard_normal((4, 10)), "logits"),
    (np.full((4, 5), 0.2), "probs"),
    (np.random.default_rng(0).dirichlet(np.ones(7), size=(2, 40)), "probs"),  # [N, T, C] after a softmax
    (np.random.default_rng(0).random((2, 1, 8, 8)), "map"),
    (np.random.default_rng(0).standard_normal((2, 6, 16)), "map"),  # features, not class scores
    (np.random.default_rng(0).standard_normal((4, 1)), "map"),  # one regression value
])
def test_output_kinds(values, kind):
    assert output_kind(values) == kind


def test_each_kind_is_zero_only_at_the_teacher():
    t = {"c": torch.randn(4, 10), "p": torch.softmax(torch.randn(4, 6), -1), "m": torch.randn(2, 1, 8, 8)}
    d = Distiller(["c", "p", "m"], temperature=2.0)
    assert float(d.loss(dict(t), t)) == pytest.approx(0.0, abs=1e-5)
    assert d.kinds == {"c": "logits", "p": "probs", "m": "map"}
    worse = {"c": t["c"].flip(-1), "p": t["p"].flip(-1), "m": t["m"] * 0}
    assert float(d.loss(worse, t)) > 0.1


def scaled(t):
    """He-style scale: activations stay of order one, so the sigmoid map is not saturated."""
    w = numpy_helper.to_array(t)
    return numpy_helper.from_array((w * np.sqrt(2 / np.prod(w.shape[1:]))).astype(np.float32), t.name)


def two_headed(path):
    """x[N,3,8,8] -> Conv(8) -> Relu -> Conv(8) -> Relu -> {GAP -> Flatten -> Gemm(5): 'scores',
    Conv(1) -> Sigmoid: 'map'}: a classifier head and a detection-like map."""
    nodes = [node("Conv", ["x", "c1.w", "c1.b"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
             node("Relu", ["c1"], ["r1"]),
             node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], kernel_shape=[3, 3], pads=[1] * 4),
             node("Relu", ["c2"], ["r2"]),
             node("GlobalAveragePool", ["r2"], ["g"]), node("Flatten", ["g"], ["f"]),
             node("Gemm", ["f", "fc.w", "fc.b"], ["scores"], transB=1),
             node("Conv", ["r2", "m.w", "m.b"], ["mc"], kernel_shape=[1, 1]), node("Sigmoid", ["mc"], ["map"])]
    inits = [scaled(weight("c1.w", 8, 3, 3, 3)), weight("c1.b", 8), scaled(weight("c2.w", 8, 8, 3, 3)),
             weight("c2.b", 8), scaled(weight("fc.w", 5, 8)), weight("fc.b", 5), scaled(weight("m.w", 1, 8, 1, 1)),
             weight("m.b", 1)]
    model = build(nodes, {"x": [None, 3, 8, 8]}, {"scores": [None, 5], "map": [None, 1, 8, 8]}, inits)
    onnx.save(model.proto, path)
    return path


def test_unlabeled_distillation_recovers_every_output(capsys, tmp_path):
    dense = two_headed(tmp_path / "dense.onnx")
    x = np.random.default_rng(1).standard_normal((96, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    pruned = tmp_path / "pruned.onnx"
    spa.prune(str(dense), ratio=0.5, output=str(pruned))
    before = snapshot(tmp_path)
    res = run(capsys, "finetune", pruned, "--distill-from", dense, "--data", tmp_path / "data.npz", "--epochs", "10",
              "--lr", "1e-2", "--batch", "16", "-o", tmp_path / "rec.onnx", "--json")
    assert res.rc == 0, res.err
    doc = json.loads(res.out)
    assert doc["labels"] is None and doc["distilled"] == {"scores": "logits", "map": "map"}
    after = {p: v for p, v in snapshot(tmp_path).items() if p != "rec.onnx"}
    assert all(after[p] == before[p] for p in before)  # the output is new; every input stays as it was

    def fidelity(path):
        got = spa.evaluate(str(path), tmp_path / "data.npz", reference=str(dense)).to_json()["fidelity"]
        return {name: f["rel_err"] for name, f in got.items()}

    was, now = fidelity(pruned), fidelity(tmp_path / "rec.onnx")
    assert set(now) == {"scores", "map"}
    for name in now:  # both heads recovered, not only the first output
        assert now[name] < 0.8 * was[name], (was, now)


def test_compress_runs_distillation_as_a_stage(capsys, tmp_path):
    """`spa compress --distill-epochs N`: the pruned model recovers from the input on the --calib
    inputs; a recovery stage never ends worse than it started on its validation samples."""
    dense = two_headed(tmp_path / "dense.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).standard_normal((96, 3, 8, 8)).astype(np.float32))
    res = run(capsys, "compress", dense, "--ratio", "0.5", "--criterion", "l1", "--calib", tmp_path / "calib.npz",
              "--distill-epochs", "4", "-o", tmp_path / "c.onnx", "--json")
    assert res.rc == 0, res.err
    stages = {r["stage"]: r for r in json.loads(res.out)["stages"]}
    assert list(stages) == ["input", "pruned", "distilled"]
    assert stages["distilled"]["detail"]["distilled"] == {"scores": "logits", "map": "map"}
    assert stages["distilled"]["check"]["status"] == "written back"
    assert stages["distilled"]["calib"]["rel_err"] <= stages["pruned"]["calib"]["rel_err"] + 1e-6
    bad = run(capsys, "compress", dense, "--fp16", "--calib", tmp_path / "calib.npz", "--distill-epochs", "2")
    assert bad.rc == 2 and "--distill-epochs" in bad.error_lines[0] and "--ratio" in bad.error_lines[0]


def test_weights_in_constant_nodes_train_too(capsys, tmp_path):
    """paddle2onnx keeps every weight in a Constant node (the PP-OCR models): finetune trains
    them as weights instead of failing on an empty parameter list."""
    dense = onnx.load(str(two_headed(tmp_path / "dense.onnx")))
    consts = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in dense.graph.initializer]
    nodes = consts + list(dense.graph.node)
    del dense.graph.node[:], dense.graph.initializer[:]
    dense.graph.node.extend(nodes)
    onnx.save(dense, tmp_path / "const.onnx")
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(1).standard_normal((32, 3, 8, 8)).astype(np.float32))
    res = run(capsys, "finetune", tmp_path / "const.onnx", "--distill-from", tmp_path / "dense.onnx", "--data",
              tmp_path / "data.npz", "--epochs", "1", "-o", tmp_path / "out.onnx", "--json")
    assert res.rc == 0, res.err
    assert json.loads(res.out)["write_back_max_rel_err"] < 1e-4
    trained = onnx.load(str(tmp_path / "out.onnx"))
    assert len(trained.graph.initializer) == 7  # every weight of more than one value; the 1-value bias stays
    assert [n.output[0] for n in trained.graph.node if n.op_type == "Constant"] == ["m.b"]
