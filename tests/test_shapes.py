"""Costs, targets, checks and benchmarks at the shape a model really runs at (--shape, or the data's).

The model: x [N, 3, H, W] (H and W dynamic) -> Conv 3->8 -> Relu -> Conv 8->8 -> Relu ->
GlobalAveragePool -> Flatten -> Gemm 8->4. Its MACs by hand at 1x3xHxW:
8*H*W*27 (conv1) + 8*H*W*72 (conv2) + 4*8 (the Gemm).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa.api import analyze, prune
from tests.test_cli import spa as spa_cli

bench_api = importlib.import_module("spa.api.bench")  # the module (spa.api.bench is also the function)


def hand_macs(h: int, w: int) -> int:
    return 8 * h * w * 27 + 8 * h * w * 72 + 4 * 8


def dynamic_model(path: Path, unnamed: bool = False) -> Path:
    """The model above; `unnamed`: H and W are unnamed axes (shown as ?), as in some paddle2onnx exports."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (8, 8, 3, 3)), ("b2", (8,)), ("w3", (4, 8)), ("b3", (4,)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1)]
    dims = ["N", 3, None, None] if unnamed else ["N", 3, "H", "W"]
    graph = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    res = spa_cli(capsys, *args)
    return res.rc, res.out, res.err


@pytest.fixture
def model(tmp_path) -> Path:
    return dynamic_model(tmp_path / "dyn.onnx")


def test_macs_at_the_given_shape_are_the_hand_count(model, capsys):
    rc, out, _ = run(capsys, "analyze", model, "--json", "--shape", "x:1x3x16x20")
    doc = json.loads(out)
    assert rc == 0 and doc["macs"] == hand_macs(16, 20)
    assert doc["input_shapes"] == {"x": [1, 3, 16, 20]} and doc["input_shapes_from"] == "shape"
    plain = analyze(str(model)).to_json()  # no shape: dynamic dims count as 1
    assert plain["macs"] == hand_macs(1, 1) and plain["input_shapes_from"] == "model"
    assert plain["input_shapes"] == {"x": [1, 3, 1, 1]} and plain["params"] == doc["params"]
    api = analyze(str(model), shape={"x": (1, 3, 16, 20)}).to_json()
    assert api["macs"] == doc["macs"]


def test_shape_from_calibration_data(model, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((4, 3, 12, 10)).astype(np.float32))
    doc = analyze(str(model), calib=str(calib)).to_json()
    assert doc["macs"] == hand_macs(12, 10)
    assert doc["input_shapes"] == {"x": [1, 3, 12, 10]} and doc["input_shapes_from"] == "calib"
    res = prune(str(model), ratio=0.25, calib=str(calib), criterion="obspa").to_json()
    assert res["before"]["macs"] == hand_macs(12, 10) and res["input_shapes_from"] == "calib"
    assert res["check"]["input_shapes"] == {"x": [1, 3, 12, 10]}
    given = prune(str(model), ratio=0.25, calib=str(calib), criterion="obspa", shape="x:1x3x8x8").to_json()
    assert given["before"]["macs"] == hand_macs(8, 8) and given["input_shapes_from"] == "shape"


def test_prune_costs_and_output_check_at_the_shape(model, tmp_path, capsys):
    out = tmp_path / "p.onnx"
    rc, text, _ = run(capsys, "prune", model, "--ratio", "0.5", "-o", out, "--json", "--shape", "x:1x3x16x20")
    doc = json.loads(text)
    assert rc == 0 and doc["before"]["macs"] == hand_macs(16, 20)
    assert doc["after"]["macs"] == 4 * 320 * 27 + 4 * 320 * 36 + 4 * 4  # 8 -> 4 channels in both groups
    assert doc["check"]["status"] == "ok" and doc["check"]["input_shapes"] == {"x": [1, 3, 16, 20]}
    assert doc["input_shapes"] == {"x": [1, 3, 16, 20]} and doc["input_shapes_from"] == "shape"
    plain = prune(str(model), ratio=0.5).to_json()  # without: the check ran on a 1x1 image
    assert plain["check"]["input_shapes"] == {"x": [1, 3, 1, 1]} and plain["before"]["macs"] == hand_macs(1, 1)


@pytest.mark.parametrize("target", [0.6, 0.3])
def test_target_macs_is_a_fraction_of_the_macs_at_the_shape(model, target):
    doc = prune(str(model), target_macs=target, shape={"x": (1, 3, 32, 32)}).to_json()
    fraction = doc["after"]["macs"] / doc["before"]["macs"]
    assert doc["before"]["macs"] == hand_macs(32, 32)
    assert target - 0.15 < fraction <= target + 1e-9, fraction


@pytest.mark.parametrize("shape, says", [
    ("x:1x3x16", "has rank 3"),
    ("x:0x3x16x20", "not positive"),
    ("y:1x3x16x20", "not an input"),
    ("x:1x4x16x20", "sets axis 1 to 4, but the model fixes it to 3"),
    ("x:1x3xAx20", "is not a shape"),
    ("1x3x16x20", "expected NAME:DIMS"),
])
@pytest.mark.parametrize("command", ["analyze", "prune"])
def test_bad_shapes_are_usage_errors(model, tmp_path, capsys, shape, says, command):
    extra = ["--ratio", "0.5", "-o", tmp_path / "o.onnx"] if command == "prune" else []
    rc, _, err = run(capsys, command, model, *extra, "--shape", shape)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and says in lines[0] and "--shape" in lines[0], err
    assert not (tmp_path / "o.onnx").exists()


def test_bench_on_ort_takes_the_shape(model, monkeypatch, capsys):
    seen = []
    real = bench_api.feeds_for

    def spy(*args, **kwargs):
        feeds = real(*args, **kwargs)
        seen.append({k: v.shape for k, v in feeds.items()})
        return feeds

    monkeypatch.setattr(bench_api, "feeds_for", spy)
    rc, out, _ = run(capsys, "bench", model, "--json", "--shape", "x:1x3x24x16", "--batch", "1,2",
                     "--duration-s", "0.02", "--warmup-ms", "0", "--min-iterations", "2")
    doc = json.loads(out)
    assert rc == 0 and doc["options"]["input_shapes"] == {"x": [1, 3, 24, 16]}
    assert {"x": (1, 3, 24, 16)} in seen and {"x": (2, 3, 24, 16)} in seen  # the first axis follows --batch
    seen.clear()
    rc, _, _ = run(capsys, "bench", model, "--json", "--shapes", "x:1x3x8x8/1x3x40x40/1x3x64x64",
                   "--duration-s", "0.02", "--warmup-ms", "0", "--min-iterations", "2")
    assert rc == 0 and seen == [{"x": (1, 3, 40, 40)}]  # ort runs the OPT shape of the TensorRT profile


def test_dim_sets_an_unnamed_axis(tmp_path, capsys):
    model = dynamic_model(tmp_path / "unnamed.onnx", unnamed=True)
    rc, out, _ = run(capsys, "compare", model, model, "--json", "--dim", "x:2=16", "--dim", "x:3=20")
    assert rc == 0 and "x 1x3x16x20" in json.loads(out)["inputs"]
    rc, _, err = run(capsys, "compare", model, model, "--dim", "x:1=5")
    assert rc == 2 and "'x' has no dynamic axis 1" in err
    assert prune(str(model), ratio=0.5, shape="x:1x3x16x20").to_json()["check"]["input_shapes"] == \
        {"x": [1, 3, 16, 20]}


def test_ppocr_recognizer_at_48x320():
    rapidocr = pytest.importorskip("rapidocr_onnxruntime")
    rec = Path(rapidocr.__file__).parent / "models" / "ch_PP-OCRv4_rec_infer.onnx"
    if not rec.is_file():
        pytest.skip("rapidocr_onnxruntime ships no PP-OCRv4 recognizer")
    plain = analyze(str(rec)).to_json()
    doc = analyze(str(rec), shape="x:1x3x48x320").to_json()
    assert doc["params"] == plain["params"] and doc["input_shapes"] == {"x": [1, 3, 48, 320]}
    assert doc["macs"] > 100 * plain["macs"]  # measured: 702.5 M against 2.67 M with every dynamic dim 1


def test_every_stage_of_compress_checks_at_the_shape(model, tmp_path, capsys):
    rc, out, _ = run(capsys, "compress", model, "--ratio", "0.5", "--fp16", "-o", tmp_path / "c.onnx", "--json",
                     "--shape", "x:1x3x16x20")
    doc = json.loads(out)
    assert rc == 0 and doc["input_shapes"] == {"x": [1, 3, 16, 20]} and doc["input_shapes_from"] == "shape"
    assert [s["check"]["input_shapes"] for s in doc["stages"][1:]] == [{"x": [1, 3, 16, 20]}] * 2
    assert doc["stages"][1]["detail"]["macs_before"] == hand_macs(16, 20)
    rc, out, _ = run(capsys, "sparsify", model, "-o", tmp_path / "s.onnx", "--json", "--min-size", "8",
                     "--shape", "x:1x3x16x20")
    assert rc == 0 and json.loads(out)["check"]["input_shapes"] == {"x": [1, 3, 16, 20]}


def test_report_counts_macs_and_draws_random_inputs_at_the_shape(model, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pruned = tmp_path / "p.onnx"
    prune(str(model), ratio=0.5, output=str(pruned))
    page = tmp_path / "r.html"
    rc, text, err = run(capsys, "report", model, pruned, "-o", page, "--json", "--shape", "x:1x3x16x20")
    doc = json.loads(text)
    assert rc == 0, err
    assert doc["summary"][0]["macs"] == hand_macs(16, 20) and doc["input_shapes"] == {"x": [1, 3, 16, 20]}
    assert sum(v["macs"] for v in doc["breakdown"]["models"][0].values()) == hand_macs(16, 20)
    assert "x 1x3x16x20" in doc["fidelity"]["inputs"] and "x 1x3x16x20 (from --shape)" in page.read_text()
    plain = json.loads(run(capsys, "report", model, pruned, "-o", tmp_path / "p.html", "--json")[1])
    assert plain["summary"][0]["macs"] == hand_macs(1, 1) and plain["input_shapes_from"] == "model"
    rc, _, err = run(capsys, "report", model, pruned, "-o", tmp_path / "q.html", "--shape", "x:1x4x16x20")
    assert rc == 2 and "--shape" in err and not (tmp_path / "q.html").exists()


def test_shape_inference_does_not_import_torch():
    """The symbolic shape inference comes from onnxruntime.tools, whose package __init__ imports
    torch when it is installed (about 300 MB): spa loads the module file alone."""
    import subprocess
    import sys

    pytest.importorskip("torch")
    code = ("import sys, spa; from spa.core import model as m; from onnx import helper, TensorProto; "
            "x = helper.make_tensor_value_info('x', TensorProto.FLOAT, ['n', 4]); "
            "y = helper.make_tensor_value_info('y', TensorProto.FLOAT, None); "
            "g = helper.make_graph([helper.make_node('Relu', ['x'], ['y'])], 'g', [x], [y]); "
            "m._symbolic_shape_infer(); spa.analyze(helper.make_model(g)); "
            "print('torch' in sys.modules, m._symbolic_shape_infer().__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "spa_symbolic_shape_infer"]


def test_batches_of_large_inputs_hold_fewer_samples():
    """A whole-model run holds every activation of its batch: inputs of many values go fewer per batch."""
    from spa.core import data

    crops = {"x": np.zeros((64, 3, 320, 320), np.float32)}
    assert data.bounded_batch(crops, 16) == data.BATCH_VALUES // (3 * 320 * 320) == 6
    assert data.bounded_batch({"x": np.zeros((64, 3, 48, 320), np.float32), "n": np.float32(1)}, 16) == 16
    assert data.bounded_batch({"x": np.zeros((2, 3, 2048, 2048), np.float32)}, 16) == 1
    assert data.bounded_batch([{"x": crops["x"][:32]}], 16) == 16  # feed dicts: batched as given


# ---------------------------------------------------------------- shape folding (spa.core.shapefold)


def _attention_reshape_model():
    """x [batch, seq, 64] -> Reshape to (batch, seq, -1, 16) with the shape computed from Shape ->
    Gather -> Div (what transformers exports for `view(*shape, -1, head_dim)` and rotate_half's
    x.shape[-1] // 2): ONNX's data propagation stops at the -1 over symbolic dims and at Div."""
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
             helper.make_node("Gather", ["s", "one"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["b", "ax0"], ["bu"]),
             helper.make_node("Unsqueeze", ["n", "ax0"], ["nu"]),
             helper.make_node("Concat", ["bu", "nu", "minus1", "sixteen"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["h"]),
             helper.make_node("Shape", ["h"], ["hs"]),
             helper.make_node("Gather", ["hs", "three"], ["d"], axis=0),
             helper.make_node("Div", ["d", "two"], ["half"]),
             helper.make_node("Unsqueeze", ["half", "ax0"], ["end"]),
             helper.make_node("Slice", ["h", "ax0", "end", "three1"], ["y"])]
    inits = [i64("zero", 0), i64("one", 1), i64("three", 3), i64("two", 2), i64("ax0", [0]), i64("three1", [3]),
             i64("minus1", [-1]), i64("sixteen", [16])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_computed_shapes_fold_without_the_symbolic_fallback(monkeypatch):
    """The Reshape's head axis (4) and the Slice's half head (8) come out static and the batch and
    sequence axes dynamic, from ONNX inference and spa.core.shapefold alone (two sets of sizes),
    without ONNX Runtime's symbolic inference (sympy: 2 s on a 64-layer LLM export)."""
    from spa.core import model as m

    monkeypatch.setattr(m, "_symbolic_fallback", lambda *a: pytest.fail("the symbolic fallback ran"))
    model = m.Model(_attention_reshape_model())
    m.infer_shapes(model)
    assert model.shapes["h"] == (None, None, 4, 16) and model.shapes["y"] == (None, None, 4, 8)
    assert not m._missing(model)


def test_fold_sizes_keep_token_axes_small_and_signals_large():
    """Token and cache lengths stay below an LLM's position table (a clamped slice would look
    static); an image side or audio length gets a size strided layers cannot shrink to 0."""
    from spa.core.model import fold_sizes

    g = helper.make_graph([], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
                                    helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "past + seq"]),
                                    helper.make_tensor_value_info("img", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
                          [])
    first, second = fold_sizes(g)
    assert max(first[k] for k in ("batch", "seq", "past")) < 32 and min(first["h"], first["w"]) > 320 * 3
    assert len(set(first.values())) == 5 and second == {k: 2 * v for k, v in first.items()}


@pytest.mark.parametrize("text,size", [("seq", 5), ("past + seq", 12), ("2*seq - 1", 9), ("past+seq+1", 13),
                                       ("floor(seq/2)", None), ("unk__3", None), ("seq +", None), ("", None)])
def test_symbolic_dims_as_sizes(text, size):
    from spa.core.shapefold import dim_value

    assert dim_value(text, {"seq": 5, "past": 7}) == size


CASES = [  # (op, attributes, inputs): every op spa.core.shapefold evaluates, against ONNX's reference
    ("Gather", {"axis": 0}, [np.array([3, 5, 7, 16]), np.array([-1, 1])]),
    ("Unsqueeze", {}, [np.array([3, 5]), np.array([0, -1])]),
    ("Squeeze", {}, [np.array([[3], [5]]), np.array([1])]),
    ("Concat", {"axis": 0}, [np.array([3]), np.array([5, -1])]),
    ("Slice", {}, [np.arange(10), np.array([-3]), np.array([100]), np.array([0]), np.array([1])]),
    ("Slice", {}, [np.arange(10), np.array([8]), np.array([-100]), np.array([0]), np.array([-3])]),
    ("Slice", {}, [np.arange(24).reshape(2, 3, 4), np.array([1, 0]), np.array([3, 2]), np.array([2, 1]), None]),
    ("Cast", {"to": TensorProto.FLOAT}, [np.array([3, 5])]),
    ("Reshape", {}, [np.arange(12), np.array([3, -1, 2])]),
    ("Reshape", {}, [np.arange(12).reshape(3, 4), np.array([0, 2, -1])]),
    ("Range", {}, [np.array(2), np.array(11), np.array(3)]),
    ("ConstantOfShape", {"value": numpy_helper.from_array(np.array([1], np.int64))}, [np.array([2, 3])]),
    ("Expand", {}, [np.array([[1], [2]]), np.array([2, 3])]),
    ("Where", {}, [np.array([True, False]), np.array([1, 2]), np.array([3, 4])]),
    ("Transpose", {"perm": [1, 0]}, [np.arange(6).reshape(2, 3)]),
    ("Tile", {}, [np.array([1, 2]), np.array([3])]),
    ("Div", {}, [np.array([7, -7, 64]), np.array([2, 2, 16])]),
    ("Mod", {}, [np.array([7, -7]), np.array([3, 3])]),
    ("Mod", {"fmod": 1}, [np.array([7.5, -7.5], np.float32), np.array([2, 2], np.float32)]),
    ("Pow", {}, [np.array([2, 3]), np.array([3, 2])]),
    ("Add", {}, [np.array([1, 2]), np.array(3)]),
    ("Sub", {}, [np.array([1, 2]), np.array(3)]),
    ("Mul", {}, [np.array([1, 2]), np.array(3)]),
    ("Equal", {}, [np.array([1, 2]), np.array(2)]),
    ("Less", {}, [np.array([1, 2]), np.array(2)]),
    ("LessOrEqual", {}, [np.array([1, 2]), np.array(2)]),
    ("Greater", {}, [np.array([1, 2]), np.array(1)]),
    ("GreaterOrEqual", {}, [np.array([1, 2]), np.array(2)]),
    ("And", {}, [np.array([True, False]), np.array([True, True])]),
    ("Or", {}, [np.array([True, False]), np.array([False, False])]),
    ("Not", {}, [np.array([True, False])]),
    ("Neg", {}, [np.array([1, -2])]),
    ("Abs", {}, [np.array([1, -2])]),
    ("Floor", {}, [np.array([1.5, -2.5], np.float32)]),
    ("Ceil", {}, [np.array([1.5, -2.5], np.float32)]),
    ("Sqrt", {}, [np.array([4.0, 2.0], np.float32)]),
    ("Min", {}, [np.array([1, 5]), np.array([3, 2]), np.array(4)]),
    ("Max", {}, [np.array([1, 5]), np.array([3, 2])]),
    ("Sum", {}, [np.array([1, 5]), np.array([3, 2]), np.array(1)]),
    ("ReduceProd", {"keepdims": 0}, [np.array([[2, 3], [4, 5]]), np.array([1])]),
    ("ReduceSum", {}, [np.array([[2, 3], [4, 5]]), None]),
    ("ReduceMin", {"keepdims": 0}, [np.array([[2, 3], [4, 5]]), np.array([0])]),
    ("ReduceMax", {}, [np.array([[2, 3], [4, 5]]), np.array([-1])]),
    ("Identity", {}, [np.array([1, 2])]),
]


@pytest.mark.parametrize("op,attrs,args", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_folded_ops_match_the_onnx_reference(op, attrs, args):
    """Each op of the table gives what ONNX's reference implementation gives (opset 18)."""
    from onnx.reference import ReferenceEvaluator

    from spa.core.shapefold import OPS

    names = [f"i{k}" if a is not None else "" for k, a in enumerate(args)]
    node = helper.make_node(op, names, ["y"], **attrs)
    expected = ReferenceEvaluator(node).run(None, {n: a for n, a in zip(names, args) if n})[0]
    got = OPS[op](node, {a.name: helper.get_attribute_value(a) for a in node.attribute}, *args)
    assert got.shape == expected.shape and got.dtype == expected.dtype and np.array_equal(got, expected)


def test_shape_and_constant_fold():
    from spa.core.shapefold import OPS

    node = helper.make_node("Shape", ["x"], ["y"], start=-2)
    assert OPS["Shape"](node, {"start": -2}, (3, 5, 7)).tolist() == [5, 7]
    assert OPS["Size"](node, {}, (3, 5, 7)) == 105
    c = helper.make_node("Constant", [], ["c"], value_ints=[1, 2])
    assert OPS["Constant"](c, {"value_ints": [1, 2]}).tolist() == [1, 2]
