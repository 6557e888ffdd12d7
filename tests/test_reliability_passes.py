"""Issue 18, the passes' part: fixed-batch models take any number of samples (class 6), compress
leaves nothing when a stage fails (class 6), a pass that changes nothing says so (class 10), and
no pass or training run writes a non-finite weight (class 2)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from spa.passes import quantize as quantize_pass
from spa.passes.base import require_finite_weights

from spa.core.data import Batch, model_batches, trim
from spa.core.errors import VerificationError
from spa.core.model import Model
from tests.test_cli import EXAMPLE, assert_untouched, snapshot, spa
from tests.test_reliability import one_error

SAMPLES = 5  # not a multiple of the fixed batch: the last batch is padded


def _conv(batch, seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> GlobalAveragePool -> Flatten: [batch, 3, 8, 8] -> [batch, 4] class scores;
    `batch` None for a dynamic batch axis."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["c"]), helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Flatten", ["p"], ["out"])]
    dim = batch if batch is not None else "n"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [dim, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [dim, 4])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def batches(tmp_path, monkeypatch):
    """fixed.onnx (batch 2), dynamic.onnx (the same weights), ref_*.onnx (other weights), data.npz
    (5 samples, labels under 'y'); the cwd."""
    for name, batch, seed in (("fixed", 2, 0), ("dynamic", None, 0), ("ref_fixed", 2, 1), ("ref_dynamic", None, 1)):
        onnx.save(_conv(batch, seed), tmp_path / f"{name}.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((SAMPLES, 3, 8, 8)).astype(np.float32),
             y=rng.integers(0, 4, SAMPLES))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _json(res) -> dict:
    assert res.rc == 0, res.err
    return json.loads(res.out)


# ---------------------------------------------------------------- class 6: fixed batch


def test_padded_batches_drop_their_padding():
    feeds = {"x": np.arange(5 * 2, dtype=np.float32).reshape(5, 2), "rate": np.array(16000)}
    got = model_batches(feeds, 64, fixed=2)
    assert [len(b["x"]) for b in got] == [2, 2, 2] and isinstance(got[-1], Batch) and got[-1].rows == 1
    assert np.array_equal(got[-1]["x"][1], feeds["x"][4]) and got[-1]["rate"] == 16000
    assert trim({"out": np.ones((2, 3)), "n": np.array(7)}, got[-1])["out"].shape == (1, 3)
    assert not isinstance(model_batches(feeds, 2)[-1], Batch)  # a dynamic batch is never padded


def test_eval_on_a_fixed_batch_equals_the_dynamic_batch(capsys, batches):
    before = snapshot(batches)
    got = [_json(spa(capsys, "eval", f"{kind}.onnx", "--data", "data.npz", "--labels", "y", "--reference",
                     f"ref_{kind}.onnx", "--json")) for kind in ("fixed", "dynamic")]
    assert got[0]["samples"] == got[1]["samples"] == SAMPLES
    assert got[0]["accuracy"] == got[1]["accuracy"]
    for key, value in got[1]["fidelity"]["out"].items():
        assert got[0]["fidelity"]["out"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert_untouched(batches, before)


def test_sensitivity_on_a_fixed_batch_equals_the_dynamic_batch(capsys, batches):
    got = [_json(spa(capsys, "sensitivity", f"{kind}.onnx", "--calib", "data.npz", "--json"))
           for kind in ("fixed", "dynamic")]
    assert got[0]["groups"] and [g["id"] for g in got[0]["groups"]] == [g["id"] for g in got[1]["groups"]]
    for a, b in zip(got[0]["groups"], got[1]["groups"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("criterion", ["mean-act", "apoz", "obspa", "taylor", "snip", "grasp", "l1"])
def test_prune_with_every_data_criterion_takes_a_fixed_batch(capsys, batches, criterion):
    plans = []
    for kind in ("fixed", "dynamic"):
        res = spa(capsys, "prune", f"{kind}.onnx", "--ratio", "0.5", "--criterion", criterion, "--calib", "data.npz",
                  "--labels", "y", "--save-plan", f"{kind}.plan.json", "-o", f"{kind}.pruned.onnx")
        assert res.rc == 0, res.err
        plans.append(json.loads((batches / f"{kind}.plan.json").read_text())["groups"])
    assert plans[0] == plans[1]  # the same scores: padding never counts


@pytest.mark.parametrize("argv", [
    ["quantize", "fixed.onnx", "--calib", "data.npz", "-o", "q.onnx"],
    ["sparsify", "fixed.onnx", "--method", "obs", "--calib", "data.npz", "--min-size", "1", "-o", "s.onnx"],
    ["compress", "fixed.onnx", "--ratio", "0.25", "--int8", "--calib", "data.npz", "--eval", "data.npz", "-o",
     "c.onnx"],
], ids=["quantize", "sparsify-obs", "compress"])
def test_calibrating_passes_take_a_fixed_batch(capsys, batches, argv):
    res = spa(capsys, *argv)
    assert res.rc == 0, res.err
    assert (batches / argv[-1]).is_file()


def test_compare_data_on_a_fixed_batch_counts_real_samples(capsys, batches):
    doc = _json(spa(capsys, "compare", "fixed.onnx", "fixed.onnx", "--data", "data.npz", "--json"))
    assert doc["samples"] == SAMPLES and doc["pass"]


# ---------------------------------------------------------------- class 6: compress


@pytest.fixture
def work(tmp_path, monkeypatch):
    shutil.copy(EXAMPLE, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x)
    np.savez(tmp_path / "other.npz", other=x)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("argv, says", [
    (["--ratio", "0.3", "--sparsify", "2:4", "--int8", "--calib", "other.npz"], "stage 'pruned' failed"),
    (["--int8", "--calib", "other.npz"], "stage 'int8' failed"),
], ids=["prune-stage", "int8-stage"])
def test_a_failed_compress_stage_is_one_line_and_leaves_nothing(capsys, work, argv, says):
    before = snapshot(work)
    line = one_error(spa(capsys, "compress", "m.onnx", *argv, "--save-stages", "-o", "out.onnx"))
    assert says in line and "'input'" in line and "nothing written" in line
    assert_untouched(work, before)


def test_compress_refuses_an_unwritable_stage_file_before_work(capsys, work):
    (work / "out.pruned.onnx").mkdir()
    before = snapshot(work)
    line = one_error(spa(capsys, "compress", "m.onnx", "--ratio", "0.3", "--save-stages", "-o", "out.onnx"))
    assert "out.pruned.onnx" in line and "directory" in line
    assert_untouched(work, before)
    assert not (work / "out.onnx").exists()


def test_compress_refuses_a_stage_file_that_is_its_input(capsys, work):
    shutil.copy(EXAMPLE, work / "x.pruned.onnx")
    before = snapshot(work)
    line = one_error(spa(capsys, "compress", "x.pruned.onnx", "--ratio", "0.3", "--save-stages", "-o", "x.onnx"))
    assert "x.pruned.onnx" in line and "input" in line
    assert_untouched(work, before)


def test_compress_success_still_writes_its_stages(capsys, work):
    doc = _json(spa(capsys, "compress", "m.onnx", "--ratio", "0.3", "--sparsify", "2:4", "--min-size", "8",
                    "--save-stages", "-o", "out.onnx", "--json"))
    assert [r["file"] for r in doc["stages"]] == ["m.onnx", "out.pruned.onnx", "out.onnx"]  # the last is OUT
    for name in ("out.onnx", "out.pruned.onnx", "out.sparse.onnx"):
        onnx.checker.check_model(onnx.load(str(work / name)))
    assert not [p for p in work.iterdir() if p.name.startswith(".spa-")]


# ---------------------------------------------------------------- class 10: no silent no-ops


def _weights_as_inputs(tmp_path, old: bool) -> str:
    """The example with every initializer also listed as a graph input; `old`: an IR-3, opset-8
    export (the Caffe2 / ONNX-zoo style) of a small conv net."""
    if old:
        proto = _conv(1)
        proto.opset_import[0].version = 8
        proto.ir_version = 3
        name = "ir3.onnx"
    else:
        proto = onnx.load(str(EXAMPLE))
        name = "listed.onnx"
    for t in proto.graph.initializer:
        proto.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.save(proto, tmp_path / name)
    return name


@pytest.mark.parametrize("old", [False, True], ids=["listed", "ir3"])
def test_fp16_converts_weights_listed_as_inputs(capsys, work, old):
    name = _weights_as_inputs(work, old)
    doc = _json(spa(capsys, "quantize", name, "--fp16", "-o", "half.onnx", "--json"))
    out = onnx.load(str(work / "half.onnx"))
    assert out.graph.initializer and all(t.data_type == TensorProto.FLOAT16 for t in out.graph.initializer
                                         if len(t.dims) > 1)
    assert {i.name for i in out.graph.input} == {"x" if old else "input"}
    assert doc["coverage"]["weights_unlisted_from_inputs"] == len(out.graph.initializer)
    assert doc["check"]["status"] == "ok"
    assert old or doc["bytes"]["after"] < 0.7 * doc["bytes"]["before"]  # the tiny IR-3 net is mostly graph


def _exp_only(tmp_path) -> str:
    graph = helper.make_graph([helper.make_node("Exp", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "exp.onnx")
    np.savez(tmp_path / "exp.npz", x=np.ones((3, 4), np.float32))
    return "exp.onnx"


@pytest.mark.parametrize("argv, says", [
    (["quantize", "exp.onnx", "--fp16", "-o", "o.onnx"], ["fp16: nothing converted", "Exp", "float32"]),
    (["quantize", "exp.onnx", "--calib", "exp.npz", "-o", "o.onnx"], ["int8: nothing to quantize", "Conv"]),
    (["sparsify", "exp.onnx", "-o", "o.onnx"], ["sparsify: nothing to sparsify", "2:4"]),
    (["sparsify", "m.onnx", "--min-size", "100000", "-o", "o.onnx"], ["nothing to sparsify", "--min-size"]),
], ids=["fp16", "int8", "sparsify-no-layer", "sparsify-min-size"])
def test_a_pass_with_nothing_to_do_says_so(capsys, work, argv, says):
    _exp_only(work)
    before = snapshot(work)
    line = one_error(spa(capsys, *argv))
    assert all(s in line for s in says), line
    assert_untouched(work, before)


# ---------------------------------------------------------------- class 2: no non-finite weight written


def test_a_pass_never_writes_a_new_non_finite_weight(capsys, work, monkeypatch):
    real = quantize_pass.fp16

    def broken(proto, *args, **kwargs):
        out = real(proto, *args, **kwargs)
        t = out.graph.initializer[0]
        a = numpy_helper.to_array(t).copy()
        a.flat[0] = np.inf
        t.CopyFrom(numpy_helper.from_array(a, t.name))
        return out

    monkeypatch.setattr(quantize_pass, "fp16", broken)
    before = snapshot(work)
    line = one_error(spa(capsys, "quantize", "m.onnx", "--fp16", "-o", "half.onnx"), code=3)
    name = onnx.load(str(EXAMPLE)).graph.initializer[0].name
    assert f"fp16: the result's tensor '{name}'" in line and "non-finite" in line and "nothing written" in line
    assert_untouched(work, before)


def test_a_weight_already_non_finite_in_the_input_is_left_alone():
    proto = _conv(1)
    mask = numpy_helper.from_array(np.array([-np.inf, 0.0], np.float32), "mask")
    proto.graph.initializer.append(mask)
    require_finite_weights(Model(proto), proto, "test")  # the input's own -inf: no refusal
    changed = onnx.ModelProto()
    changed.CopyFrom(proto)
    changed.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        np.full((8, 3, 3, 3), np.nan, np.float32), "w1"))
    with pytest.raises(VerificationError, match="'w1' holds 216 non-finite"):
        require_finite_weights(Model(proto), changed, "test")


def test_a_diverging_training_writes_nothing(capsys, work):
    pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    np.savez(work / "train.npz", input=x, labels=np.arange(16) % 10)
    before = snapshot(work)
    line = one_error(spa(capsys, "finetune", "m.onnx", "--data", "train.npz", "--labels", "labels", "--lr", "1e30",
                         "--epochs", "2", "--batch", "8", "-o", "out.onnx"))
    assert "training diverged" in line and "--lr" in line
    assert_untouched(work, before)  # no out.onnx, and no out.onnx.ckpt from the epoch before
