"""Issue 18, class 5 and 11: a model ONNX Runtime cannot run is refused with its whole reason unless
--no-check says to go on; ORT's messages are one clean line; dynamically quantized models are named."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa.core.errors import clip, with_flags
from spa.core.runtime import ort_reason
from tests.test_cli import EXAMPLE, assert_untouched, snapshot, spa
from tests.test_reliability import one_error


def conv_model(path, *, kernel=None, group=1, opset=17, batch=1):
    """x[batch,3,8,8] -> Conv(4, 3x3) -> Relu -> Conv(2, 1x1) -> out; `kernel` declares kernel_shape."""
    rng = np.random.default_rng(0)
    attrs = {"group": group, "pads": [1, 1, 1, 1], **({"kernel_shape": kernel} if kernel else {})}
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], **attrs), helper.make_node("Relu", ["y"], ["z"]),
             helper.make_node("Conv", ["z", "w2"], ["out"])]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 2, None, None])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


def symbolic_model(path):
    """x[N,4] -> Reshape to [2,4] -> MatMul(16) -> Relu -> MatMul(4): valid, but not at N=1."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Reshape", ["x", "s"], ["xr"]), helper.make_node("MatMul", ["xr", "w"], ["y"]),
             helper.make_node("Relu", ["y"], ["z"]), helper.make_node("MatMul", ["z", "w2"], ["out"])]
    inits = [numpy_helper.from_array(np.array([2, 4], np.int64), "s"),
             numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def text(res) -> str:
    """stdout and stderr with the console's line wrapping undone."""
    return " ".join((res.out + res.err).split())


UNRUNNABLE = {
    "kbig": ({"kernel": [5, 5]}, "kernel_shape is not compatible with W shape. kernel_shape: {5,5} W: {4,3,3,3}"),
    "group": ({"group": 2}, "Input channels C is not equal to kernel channels * group"),
    "opset99": ({"opset": 99}, "official released onnx opset versions"),
}
WRITERS = {
    "prune": ["prune", "{m}", "--ratio", "0.5"],
    "fp16": ["quantize", "{m}", "--fp16"],
    "sparsify": ["sparsify", "{m}", "--min-size", "1"],
    "compress": ["compress", "{m}", "--fp16"],
}


@pytest.mark.parametrize("kind", sorted(UNRUNNABLE))
@pytest.mark.parametrize("command", sorted(WRITERS))
def test_a_model_ort_cannot_run_is_refused_with_its_reason(capsys, tmp_path, monkeypatch, kind, command):
    monkeypatch.chdir(tmp_path)
    spec, reason = UNRUNNABLE[kind]
    conv_model(tmp_path / f"{kind}.onnx", **spec)
    before = snapshot(tmp_path)
    argv = [a.format(m=f"{kind}.onnx") for a in WRITERS[command]]
    line = one_error(spa(capsys, *argv, "-o", "out.onnx"))
    assert f"ONNX Runtime cannot run '{kind}.onnx' (" in line and reason in line, line
    assert line.endswith("Hint: pass --no-check to go on without the output check"), line
    assert "[ONNXRuntimeError]" not in line and "onnxruntime_src" not in line and "internal error" not in line
    assert_untouched(tmp_path, before)


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_no_check_goes_on_and_says_no_check_was_run(capsys, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    conv_model(tmp_path / "kbig.onnx", kernel=[5, 5])
    argv = [a.format(m="kbig.onnx") for a in WRITERS[command]]
    res = spa(capsys, *argv, "-o", "out.onnx", "--no-check")
    assert res.rc == 0, res.err
    assert "output check: NOT RUN (--no-check)" in text(res)
    (tmp_path / "out.onnx").unlink()
    res = spa(capsys, *argv, "-o", "out.onnx", "--no-check", "--json")
    assert res.rc == 0, res.err
    doc = json.loads(res.out)
    checks = [row["check"] for row in doc["stages"][1:]] if command == "compress" else [doc["check"]]
    assert checks == [{"status": "not run", "reason": "--no-check"}]
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"))


@pytest.mark.parametrize("command", ["prune", "fp16", "sparsify"])
def test_symbolic_dims_skip_the_check_with_a_visible_note(capsys, tmp_path, monkeypatch, command):
    """Random inputs are a guess where a dim is symbolic: not a refusal, but never an ok-looking line."""
    monkeypatch.chdir(tmp_path)
    symbolic_model(tmp_path / "sym.onnx")
    argv = [a.format(m="sym.onnx") for a in WRITERS[command]]
    res = spa(capsys, *argv, "-o", "out.onnx")
    assert res.rc == 0, res.err
    assert "note: output check skipped" in text(res) and "symbolic dims set to 1" in text(res)
    assert "Input shape:{1,4}, requested shape:{2,4}" in text(res)
    assert "output check: SKIPPED" in text(res) and "max relative error" not in text(res)
    (tmp_path / "out.onnx").unlink()
    doc = json.loads(spa(capsys, *argv, "-o", "out.onnx", "--json").out)
    assert doc["check"]["status"] == "skipped"
    assert any(n.startswith("output check skipped") for n in doc["notes"])


def test_the_example_still_passes_its_check(capsys, tmp_path):
    out = tmp_path / "out.onnx"
    res = spa(capsys, "prune", EXAMPLE, "--ratio", "0.5", "-o", out, "--json")
    assert res.rc == 0, res.err
    doc = json.loads(res.out)
    assert doc["check"]["status"] == "ok" and not any("output check" in n for n in doc["notes"])


@pytest.mark.parametrize("argv", [
    ["compare", "ok.onnx", "kbig.onnx"], ["eval", "kbig.onnx", "--data", "d.npz"],
    ["compare", "ok.onnx", "opset99.onnx"],
    ["sensitivity", "kbig.onnx", "--calib", "d.npz"], ["sensitivity", "opset99.onnx", "--calib", "d.npz"],
    ["bench", "kbig.onnx", "--duration-s", "0.01"], ["bench", "opset99.onnx", "--duration-s", "0.01"],
], ids=["compare", "eval", "compare-load", "sensitivity", "sensitivity-load", "bench", "bench-load"])
def test_measuring_commands_name_the_model_and_the_whole_reason(capsys, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    conv_model(tmp_path / "ok.onnx")
    conv_model(tmp_path / "kbig.onnx", kernel=[5, 5])
    conv_model(tmp_path / "opset99.onnx", opset=99)
    np.savez(tmp_path / "d.npz", x=np.ones((1, 3, 8, 8), np.float32))
    before = snapshot(tmp_path)
    line = one_error(spa(capsys, *argv))  # bench: measured at no batch size is an error, not a table of skips
    assert f"'{argv[2] if argv[0] == 'compare' else argv[1]}'" in line
    assert "internal error" not in line and "[ONNXRuntimeError]" not in line and "onnxruntime_src" not in line
    assert ("W: {" in line and "channels_last: 0" in line) or "opset versions." in line, line
    assert_untouched(tmp_path, before)


def test_ort_reasons_are_whole_and_clean():
    dims = ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: x for the following "
            "indices\n index: 0 Got: 5 Expected: 2\n Please fix either the inputs/outputs or the model.")
    assert ort_reason(dims).startswith("Got invalid dimensions for input: x for the following indices index: 0 "
                                       "Got: 5 Expected: 2")
    kernel = ("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Reshape node. Name:'r' "
              "Status Message: /onnxruntime_src/onnxruntime/core/framework/op_kernel.cc:87 virtual OrtValue* "
              "onnxruntime::OpKernelContext::OutputMLValue(int, const onnxruntime::TensorShape&) status.IsOK() was "
              "false. Shape mismatch attempting to re-use buffer. {1,2} != {2,2}.")
    assert ort_reason(kernel) == "Reshape node 'r': Shape mismatch attempting to re-use buffer. {1,2} != {2,2}."
    long = "word " * 100
    cut = clip(long.strip(), 50)
    assert cut.endswith(" …") and len(cut) <= 52 and cut[:-2].split()[-1] == "word"
    assert clip("First sentence here. " + "x" * 80, 60) == "First sentence here. …"
    assert with_flags("pass check=False to go on", {"check": "--no-check"}) == "pass --no-check to go on"


def _dynamic(tmp_path):
    quantization = pytest.importorskip("onnxruntime.quantization")
    path = tmp_path / "dyn.onnx"
    quantization.quantize_dynamic(str(EXAMPLE), str(path), weight_type=quantization.QuantType.QUInt8)
    return path


@pytest.mark.parametrize("argv", [["prune", "dyn.onnx", "--ratio", "0.5"], ["quantize", "dyn.onnx", "--fp16"]])
def test_a_dynamically_quantized_model_is_named_as_such(capsys, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    _dynamic(tmp_path)
    before = snapshot(tmp_path)
    line = one_error(spa(capsys, *argv, "-o", "out.onnx"))
    assert "dynamically quantized (ConvInteger/DynamicQuantizeLinear" in line and "QDQ" not in line, line
    assert "Hint: " in line and "float model" in line
    assert_untouched(tmp_path, before)


def test_analyze_says_integer_layers_are_not_counted(capsys, tmp_path):
    path = _dynamic(tmp_path)
    res = spa(capsys, "analyze", path)
    assert res.rc == 0, res.err
    assert "already quantized" in text(res) and "integer layers" in text(res) and "not counted" in text(res)
    doc = json.loads(spa(capsys, "analyze", path, "--json").out)
    assert doc["quantization"]["integer_layers"] > 0


def test_ratio_one_is_a_usage_error(capsys, tmp_path):
    before = snapshot(tmp_path)
    line = one_error(spa(capsys, "prune", EXAMPLE, "--ratio", "1.0", "-o", tmp_path / "out.onnx"), 2)
    assert "ratio" in line
    assert_untouched(tmp_path, before)


def _decoder_with_cache(path, mask_dim: str = "past_sequence_length + sequence_length"):
    """A decoder-shaped graph as optimum exports one with a KV cache: its attention_mask must be
    past + current long (here a Reshape to [-1, past + current] fails otherwise), present.0.key is
    the past concatenated with the current key."""
    rng = np.random.default_rng(0)
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", mask_dim]),
              helper.make_tensor_value_info("past_key_values.0.key", f, ["batch_size", 1, "past_sequence_length", 8])]
    outputs = [helper.make_tensor_value_info("logits", f, ["batch_size", "sequence_length", 8]),
               helper.make_tensor_value_info("present.0.key", f, ["batch_size", 1, "total", 8])]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("E", (10, 8)), ("W1", (8, 16)), ("W2", (16, 8)), ("Wk", (8, 8)))]
    inits += [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in (("minus1", [-1]), ("ax1", [1]),
                                                                             ("ax2", [2]))]
    n = helper.make_node
    nodes = [n("Gather", ["E", "input_ids"], ["emb"]), n("MatMul", ["emb", "W1"], ["h"]), n("Relu", ["h"], ["r"]),
             n("MatMul", ["r", "W2"], ["pre"]),
             n("Shape", ["past_key_values.0.key"], ["p"], start=2, end=3), n("Shape", ["input_ids"], ["s"], start=1),
             n("Add", ["p", "s"], ["t"]), n("Concat", ["minus1", "t"], ["target"], axis=0),
             n("Cast", ["attention_mask"], ["mf"], to=f), n("Reshape", ["mf", "target"], ["m2"]),
             n("ReduceSum", ["m2", "ax1"], ["msum"], keepdims=1), n("Unsqueeze", ["msum", "ax2"], ["m3"]),
             n("Add", ["pre", "m3"], ["logits"]),
             n("MatMul", ["emb", "Wk"], ["k"]), n("Unsqueeze", ["k", "ax1"], ["k4"]),
             n("Concat", ["past_key_values.0.key", "k4"], ["present.0.key"], axis=2)]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def test_the_check_runs_a_decoder_with_a_kv_cache(capsys, tmp_path):
    """Dims of 1 make its attention_mask one long where it needs past + current: the check used to
    be skipped on every such export. It now runs with a non-empty cache and a mask of the sum."""
    from spa.core import runtime

    model = _decoder_with_cache(tmp_path / "dec.onnx")
    proto = onnx.load(model)
    assert runtime.cache_shapes(proto) == {"input_ids": [1, 2], "attention_mask": [1, 5],
                                           "past_key_values.0.key": [1, 1, 3, 8]}
    r = spa(capsys, "prune", model, "--ratio", "0.5", "-o", tmp_path / "out.onnx", "--json")
    assert r.rc == 0, r.err
    check = json.loads(r.out)["check"]
    assert check["status"] == "ok", check
    assert check["input_shapes"]["attention_mask"] == [1, 5] and check["input_shapes"]["input_ids"] == [1, 2]
    assert check["empty_cache"]["max_rel_err"] >= 0  # and with an empty cache (mask of 2, past of 0)
    assert runtime.cache_shapes(proto, past=0)["past_key_values.0.key"] == [1, 1, 0, 8]
    res = spa(capsys, "prune", model, "--ratio", "0.5", "-o", tmp_path / "o2.onnx")
    text = res.out + res.err
    assert "attention_mask 1x5" in text and "with an empty KV cache too" in text, text
    # a mask declared as the past plus one token: the current length follows it
    one = onnx.load(_decoder_with_cache(tmp_path / "one.onnx", "past_sequence_length + 1"))
    assert runtime.cache_shapes(one)["input_ids"] == [1, 1] and runtime.cache_shapes(one)["attention_mask"] == [1, 4]
    assert runtime.cache_shapes(onnx.load(EXAMPLE)) is None  # not a decoder: unchanged
