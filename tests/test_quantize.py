"""INT8 QDQ placed for ONNX Runtime's CPU kernels or for TensorRT, and FP16 with float32 edges
(spa quantize, passes/quantize.py)."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from spa.backends import ort as ort_backend
from spa.passes import quantize

import spa
from spa.api.quantize import quantize as quantize_api
from spa.cli.app import main
from spa.core.errors import SpaError, UsageError
from tests.conftest import CORPUS, corpus_params
from tests.oracles import feeds_for

RNG = np.random.default_rng(0)


def residual_model() -> onnx.ModelProto:
    """x -> Conv -> Relu (a) -> Conv (b) -> Add(b, a) -> Relu -> GAP -> Flatten -> Gemm, and a
    LayerNormalization on the logits (a sensitive op for FP16)."""
    inits = {"w1": RNG.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3,
             "b1": RNG.standard_normal(16).astype(np.float32) * 0.1,
             "w2": RNG.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.1,
             "b2": np.zeros(16, np.float32),
             "w3": RNG.standard_normal((10, 16)).astype(np.float32) * 0.3,
             "b3": np.zeros(10, np.float32), "g": np.ones(10, np.float32), "be": np.zeros(10, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["a"]),
             helper.make_node("Conv", ["a", "w2", "b2"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["b", "a"], ["s"]),
             helper.make_node("Relu", ["s"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["l"], transB=1),
             helper.make_node("LayerNormalization", ["l", "g", "be"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def calib(n=64):
    return {"x": np.abs(RNG.standard_normal((n, 3, 8, 8))).astype(np.float32)}


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.mark.parametrize("method", quantize.METHODS)
def test_int8_qdq_is_placed_for_tensorrt(method):
    proto = residual_model()
    q = quantize.int8(proto, calib(), method, target="tensorrt")
    onnx.checker.check_model(q, full_check=True)
    producer = {o: n for n in q.graph.node for o in n.output}
    layers = [n for n in q.graph.node if n.op_type in ("Conv", "Gemm")]
    cov = quantize.coverage(q)
    assert cov["quantized"] == cov["layers"] == 3
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    for n in q.graph.node:  # symmetric: every zero point is 0
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
            assert not inits[n.input[2]].any()
    for layer in layers:
        w_dq = producer[layer.input[1]]
        assert inits[w_dq.input[1]].size == {"Conv": 16, "Gemm": 10}[layer.op_type]  # a scale per output channel
        assert len(layer.input) < 3 or layer.input[2] in inits and inits[layer.input[2]].dtype == np.float32  # bias
    add = next(n for n in q.graph.node if n.op_type == "Add")
    kinds = sorted(producer[i].op_type for i in add.input)
    assert kinds == ["Conv", "DequantizeLinear"]  # the conv branch fuses, the residual is quantized
    feeds = calib(16)
    assert _rel(ort_backend.run(proto, feeds)["y"], ort_backend.run(q, feeds)["y"]) < 0.1


@pytest.mark.parametrize("method", quantize.METHODS)
def test_int8_for_ort_cpu_runs_in_onnx_runtimes_integer_kernels(method):
    """Placed for ONNX Runtime's CPU provider, every Conv and the Gemm become integer kernels in the
    graph ORT's optimizer makes (QLinearConv, QGemm; the residual Add a QLinearAdd): uint8
    activations with zero points, Q/DQ on layer outputs too. The TensorRT placement of the same
    model fuses nothing there (the reason it was slower than float32 on ORT)."""
    proto = residual_model()
    q = quantize.int8(proto, calib(), method)  # target="ort-cpu", the default
    onnx.checker.check_model(q, full_check=True)
    fused = quantize.fused_kernels(q)
    assert fused.get("QLinearConv") == 2 and fused.get("QGemm") == 1 and fused.get("QLinearAdd") == 1, fused
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    zero_points = [inits[n.input[2]] for n in q.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(z.dtype == np.uint8 for z in zero_points)
    ln = next(n for n in q.graph.node if n.op_type == "LayerNormalization")
    assert inits[ln.input[1]].dtype == np.float32  # normalizations stay float: their scale is not quantized
    assert not any(n.op_type == "QuantizeLinear" and ln.output[0] in n.input for n in q.graph.node)
    assert quantize.fused_kernels(quantize.int8(proto, calib(), method, target="tensorrt")) == {}
    feeds = calib(16)
    assert _rel(ort_backend.run(proto, feeds)["y"], ort_backend.run(q, feeds)["y"]) < 0.1


def test_int8_target_reaches_the_document_and_a_bad_one_is_a_usage_error(tmp_path, capsys):
    onnx.save(residual_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **calib())
    for target in quantize.TARGETS:
        res = quantize_api(tmp_path / "m.onnx", calib=tmp_path / "calib.npz", target=target)
        doc = res.to_json()
        assert doc["target"] == target and doc["coverage"]["quantized"] == 3
        assert (doc["fused_kernels"].get("QLinearConv", 0) == 2) == (target == "ort-cpu")
        assert any("CUDA provider" in n for n in doc["notes"]) == (target == "ort-cuda")
        q = res.model
        inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
        zero_points = [inits[n.input[2]] for n in q.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
        symmetric = all(z.dtype == np.int8 and not z.any() for z in zero_points)
        assert symmetric == (target != "ort-cpu")  # TensorRT's explicit quantization: int8, zero point 0
        assert (doc["speed"] is not None) == (target == "ort-cpu")  # measured where it can be: ORT's CPU
        if doc["speed"]:
            assert doc["speed"]["speedup"] == pytest.approx(doc["speed"]["float_cpu_s"] / doc["speed"]["int8_cpu_s"])
            assert any("as fast as float32" in w for w in doc["warnings"]) == (doc["speed"]["speedup"] < 1)
    with pytest.raises(UsageError, match="invalid target"):
        quantize_api(tmp_path / "m.onnx", calib=tmp_path / "calib.npz", target="cpu")
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib.npz"), "--target", "gpu"])
    assert exc.value.code == 2 and "--target" in capsys.readouterr().err


def mlp_model() -> onnx.ModelProto:
    """x [N, 64] -> MatMul 64x128 -> Relu -> MatMul 128x32: a transformer's MLP, no convolution."""
    inits = [numpy_helper.from_array(RNG.standard_normal((64, 128)).astype(np.float32) * 0.1, "w1"),
             numpy_helper.from_array(RNG.standard_normal((128, 32)).astype(np.float32) * 0.1, "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_dynamic_int8_for_transformer_matmuls(tmp_path, capsys):
    """mode="dynamic" needs no calibration and runs in ORT's dynamic integer MatMul kernels; "auto"
    times static against dynamic on a transformer-like model and keeps the faster, but never
    tries dynamic on a convolutional one (ConvInteger is slow) nor for TensorRT."""
    onnx.save(mlp_model(), tmp_path / "mlp.onnx")
    data = {"x": RNG.standard_normal((32, 64)).astype(np.float32)}
    dyn = quantize_api(tmp_path / "mlp.onnx", mode="dynamic").to_json()
    assert dyn["mode"] == "dynamic" and dyn["coverage"]["quantized"] == dyn["coverage"]["layers"] == 2
    assert set(dyn["fused_kernels"]) & {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}, dyn["fused_kernels"]
    assert dyn["check"]["status"] == "ok"
    auto = quantize_api(tmp_path / "mlp.onnx", calib=data).to_json()
    assert auto["mode"] in ("static", "dynamic") and set(auto["cpu_s_per_run"]) == {"static", "dynamic"}
    assert auto["cpu_s_per_run"][auto["mode"]] == min(auto["cpu_s_per_run"].values())
    onnx.save(residual_model(), tmp_path / "cnn.onnx")
    conv = quantize_api(tmp_path / "cnn.onnx", calib=calib()).to_json()
    assert conv["mode"] == "static" and conv["cpu_s_per_run"] is None
    with pytest.raises(UsageError, match="mode='dynamic' is for target='ort-cpu'"):
        quantize_api(tmp_path / "mlp.onnx", mode="dynamic", target="tensorrt")
    with pytest.raises(UsageError, match="INT8 needs calib"):
        quantize_api(tmp_path / "mlp.onnx")
    assert main(["quantize", str(tmp_path / "mlp.onnx"), "--mode", "dynamic", "-o", str(tmp_path / "d.onnx")]) == 0
    assert "(dynamic) for ort-cpu" in capsys.readouterr().err and (tmp_path / "d.onnx").exists()


def test_a_layer_that_int8_ruins_keeps_float_math_with_int8_weights(tmp_path):
    """One activation channel 1000x the others (an outlier channel, as in LLMs): the layer reading
    it loses most of its signal to the coarse activation scale. Its own error, measured on the
    data, sends it back to float math with a weight-only int8 weight (DequantizeLinear on the
    weight, none on its input); the other layer stays INT8, and the whole agrees better."""
    w1 = RNG.standard_normal((64, 128)).astype(np.float32) * 0.1
    w1[:, 0] *= 1000  # channel 0 of the hidden activation: an outlier
    w2 = RNG.standard_normal((128, 32)).astype(np.float32) * 0.1
    w2[0] = 1e-5  # which the next layer barely reads
    proto = mlp_model()
    for t in proto.graph.initializer:
        t.CopyFrom(numpy_helper.from_array({"w1": w1, "w2": w2}[t.name], t.name))
    data = {"x": RNG.standard_normal((64, 64)).astype(np.float32)}
    doc = quantize_api(proto, calib=data, mode="static", output=tmp_path / "q.onnx").to_json()
    layers = {e["output"]: e for e in doc["layers"]}  # the nodes are unnamed: known by their outputs
    assert doc["fallback"] == 1 and layers["y"]["kept"] == "weight-only int8" and layers["y"]["rel_err"] > 0.1
    assert layers["h"]["kept"] == "int8" and len(layers) == 2
    q = onnx.load(tmp_path / "q.onnx")
    assert not any(n.name for n in q.graph.node if n.op_type == "MatMul")  # names as they came
    producer = {o: n for n in q.graph.node for o in n.output}
    node = producer["y"]
    assert producer[node.input[1]].op_type == "DequantizeLinear" and producer[node.input[0]].op_type != \
        "DequantizeLinear"
    assert {t.name: t.data_type for t in q.graph.initializer}["w2_int8"] == TensorProto.INT8
    plain = quantize.int8(proto, data, target="ort-cpu")  # every layer INT8
    want = ort_backend.run(proto, data)["y"]
    assert _rel(want, ort_backend.run(q, data)["y"]) < _rel(want, ort_backend.run(plain, data)["y"]) / 3


def test_probabilities_are_handed_back_in_float():
    """A classifier ending in Softmax over many classes of about the same probability: 8-bit
    probabilities would be zeros (ORT's own quantize_static gives cosine 0 on such a model); the
    tail before the output stays float, and the agreement is measured (`elementwise`)."""
    w = RNG.standard_normal((64, 1000)).astype(np.float32) * 0.01
    nodes = [helper.make_node("MatMul", ["x", "w"], ["l"], name="fc"),
             helper.make_node("Softmax", ["l"], ["p"], name="softmax", axis=-1),
             helper.make_node("Reshape", ["p", "shape"], ["y"], name="flat")]
    graph = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1000])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-1, 1000]), "shape")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    data = {"x": RNG.standard_normal((16, 64)).astype(np.float32)}
    doc = quantize_api(proto, calib=data, mode="static").to_json()
    q = quantize_api(proto, calib=data, mode="static").model
    assert "QLinearSoftmax" not in doc["fused_kernels"] and doc["fused_kernels"].get("QLinearMatMul") == 1
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in ("p", "y") for n in q.graph.node)
    assert quantize.output_cosine(proto, q, data) > 0.99 and doc["elementwise"]["int8"] > 0.99


def test_fp16_keeps_float32_edges_and_sensitive_ops():
    proto = residual_model()
    h = quantize.fp16(proto)
    onnx.checker.check_model(h, full_check=True)  # topologically sorted again
    assert h.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert h.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    types = {t.name: t.data_type for t in h.graph.initializer}
    assert types["w1"] == TensorProto.FLOAT16 and types["g"] == TensorProto.FLOAT
    producer = {o: n for n in h.graph.node for o in n.output}
    ln = next(n for n in h.graph.node if n.op_type == "LayerNormalization")
    assert producer[ln.input[0]].op_type == "Cast"  # fed float32
    feeds = calib(8)
    assert _rel(ort_backend.run(proto, feeds)["y"], ort_backend.run(h, feeds)["y"]) < 1e-2


def test_cli_quantize_reports_size_coverage_and_fidelity(tmp_path, capsys):
    onnx.save(residual_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **calib())
    assert main(["quantize", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib.npz"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "int8" and doc["output"].endswith("m.int8.onnx") and doc["target"] == "ort-cpu"
    assert doc["fused_kernels"]["QLinearConv"] == 2
    assert doc["coverage"]["quantized"] == 3 and doc["fidelity_on_calib"]["max_rel_err"] < 0.1
    assert doc["bytes"]["after"] < doc["bytes"]["before"]
    assert main(["analyze", doc["output"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantization"]["quantized"] == 3
    assert main(["quantize", str(tmp_path / "m.onnx"), "--fp16", "--json"]) == 0
    fp = json.loads(capsys.readouterr().out)
    assert fp["kind"] == "fp16" and fp["coverage"]["float16_initializers"] > 0
    # a quantized model is not quantized again
    code = main(["quantize", doc["output"], "--fp16", "-o", str(tmp_path / "again.onnx"), "--json"])
    err = capsys.readouterr().err
    assert code == 1 and "already quantized" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "again.onnx").exists()


@pytest.mark.parametrize("args,message,exit_code", [
    (["--calib", "missing.npz"], "no such file", 1),
    (["--calib", "CALIB", "--calib-samples", "0"], "invalid --calib-samples", 2),
    (["--calib", "WRONG"], "no array for model input", 1),
])
def test_cli_quantize_bad_input_is_one_line(tmp_path, capsys, args, message, exit_code):
    onnx.save(residual_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **calib())
    np.savez(tmp_path / "wrong.npz", z=np.zeros((4, 3)))
    args = [str(tmp_path / "calib.npz") if a == "CALIB" else str(tmp_path / "wrong.npz") if a == "WRONG" else a
            for a in args]
    code = main(["quantize", str(tmp_path / "m.onnx"), *args, "-o", str(tmp_path / "q.onnx"), "--json"])
    err = capsys.readouterr().err
    assert code == exit_code and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "q.onnx").exists()


# corpus models spa refuses to quantize, with the reason it gives
REFUSED = {"winml/SqueezeNet_fp16.onnx": "float16 model", "winml/candy.onnx": "opset 7",
           "winml/mnist_uwp_model.onnx": "opset 7"}


@pytest.mark.parametrize("entry", corpus_params())
def test_corpus_int8_works_or_refuses_with_a_reason(entry):
    model = spa.load(CORPUS / entry["file"])
    feeds = feeds_for(model, entry)
    if entry["file"] in REFUSED:
        with pytest.raises(SpaError, match=REFUSED[entry["file"]]):
            quantize.int8(model.proto, feeds, max_samples=4)
        return
    q = quantize.int8(model.proto, feeds, max_samples=4)
    onnx.checker.check_model(q)
    out = ort_backend.run(q, feeds)
    assert set(out) == {o.name for o in model.proto.graph.output}
    assert quantize.coverage(q)["qdq_nodes"] > 0 or not quantize.coverage(model.proto)["layers"] \
        or "gpt2" in entry["file"] or "silero_vad" in entry["file"]  # contrib Attention / If bodies: no QDQ


# onnxruntime.transformers.float16 produces graphs that fail the checker or ORT's type checks on
# these (duplicate Cast names, Casts placed before their inputs in If bodies, float32-only
# parameters of InstanceNormalization/ZipMap fed float16): refused with that reason. The bidi
# LSTM's graph is valid from onnxruntime 1.32 on, but that version's NCHWc optimiser crashes
# loading it: refused too (the load runs in a child process)
REFUSED_FP16 = {
    "ort-genai/tiny-random-gpt2-fp32_past.onnx": "bound to different types",
    "silero-vad/silero_vad.onnx": "topologically sorted",
    "silero-vad/silero_vad_op18_ifless.onnx": "topologically sorted",
    "silero-vad/silero_vad_16k_op15.onnx": "topologically sorted",
    "tract/byte_sb_bidi_lstm.onnx": "single static assignment|crashed",
    "winml/candy.onnx": "bound to different types",
    "winml/mnist_uwp_model.onnx": "ZipMap",
}


@pytest.mark.parametrize("entry", corpus_params())
def test_corpus_fp16_runs_with_float32_io(entry):
    """FP16 over every corpus model: the checker passes, ORT runs it on the same feeds, the
    input/output types are unchanged and the outputs stay finite (or the input itself does not
    run on random feeds)."""
    model = spa.load(CORPUS / entry["file"])
    feeds = feeds_for(model, entry)
    try:
        ref = ort_backend.run(model.proto, feeds)
    except Exception:  # noqa: BLE001 - the input model does not run on these feeds
        pytest.skip("the input model does not run on random feeds")
    if entry["file"] in REFUSED_FP16:
        with pytest.raises(SpaError, match=REFUSED_FP16[entry["file"]]):
            quantize.fp16(model.proto)
        return
    h = quantize.fp16(model.proto)
    onnx.checker.check_model(h)
    # weights listed as graph inputs (IR-3 zoo exports) become float16 constants: the rest keeps its types
    weights = {t.name for t in model.proto.graph.initializer}
    io = {v.name: v.type.tensor_type.elem_type for v in list(model.proto.graph.input) + list(model.proto.graph.output)
          if v.name not in weights}
    assert {v.name: v.type.tensor_type.elem_type for v in list(h.graph.input) + list(h.graph.output)
            if v.name in io} == io
    assert not weights & {v.name for v in h.graph.input}
    feeds = {k: v for k, v in feeds.items() if k not in weights}
    out = ort_backend.run(h, feeds)
    assert set(out) == set(ref)
    for name, v in out.items():
        if isinstance(v, np.ndarray) and v.dtype.kind == "f" and np.isfinite(ref[name]).all():
            assert v.dtype == ref[name].dtype and np.isfinite(v).all(), name


def test_api_quantize_is_the_cli_document(tmp_path, capsys):
    """spa.api.quantize.quantize without the CLI: the same document as `spa quantize --json` (INT8 and
    FP16), and from a ModelProto in memory the same numbers, bytes counted serialized."""
    proto, data = residual_model(), calib()
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **data)
    for kind, options in (("int8", {"calib": str(tmp_path / "calib.npz")}), ("fp16", {"fp16": True})):
        out = str(tmp_path / f"q.{kind}.onnx")
        argv = ["--calib", options["calib"]] if kind == "int8" else ["--fp16"]
        assert main(["quantize", str(tmp_path / "m.onnx"), *argv, "-o", out, "--json"]) == 0
        cli = json.loads(capsys.readouterr().out)
        result = quantize_api(str(tmp_path / "m.onnx"), output=out, **options)
        assert _untimed(result.to_json()) == _untimed(cli)
        onnx.checker.check_model(result.model)
        memory = quantize_api(proto, **({"calib": data} if kind == "int8" else options)).to_json()
        assert memory["bytes"] == {"before": proto.ByteSize(), "after": result.model.ByteSize()}
        assert _untimed({**memory, "bytes": cli["bytes"]}) == _untimed({**cli, "input": None, "output": None})


def _untimed(doc: dict) -> dict:
    """A quantize document without what differs from run to run: the measured CPU times."""
    return {**doc, "speed": None, "cpu_s_per_run": None,
            "warnings": [w for w in doc["warnings"] if "as fast as float32" not in w]}


@pytest.mark.parametrize("options, message", [
    ({}, "INT8 needs calib=DATA"),
    ({"calib": "CALIB", "fp16": True}, "give exactly one of calib=DATA"),
    ({"calib": "CALIB", "target": "gpu"}, "invalid target='gpu'"),
    ({"calib": "CALIB", "mode": "fast"}, "invalid mode='fast'"),
    ({"calib": "CALIB", "calib_samples": 0}, "invalid calib_samples=0"),
    ({"calib": "CALIB", "method": "nope"}, "invalid method='nope'"),
])
def test_api_quantize_bad_values_are_usage_errors(tmp_path, options, message):
    options = {k: calib(4) if v == "CALIB" else v for k, v in options.items()}
    with pytest.raises(UsageError, match=re.escape(message)):
        quantize_api(residual_model(), output=tmp_path / "q.onnx", **options)
    assert not (tmp_path / "q.onnx").exists()


def test_quantize_does_not_import_torch(tmp_path):
    """spa quantize's own cost: ONNX Runtime's quantization tooling and spa's shape inference
    never pull in torch (about a second and 300 MB where it is installed)."""
    import subprocess
    import sys

    pytest.importorskip("torch")
    onnx.save(residual_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **calib())
    code = ("import sys, spa; spa.quantize(sys.argv[1], calib=sys.argv[2], output=sys.argv[3]); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.onnx"), str(tmp_path / "calib.npz"),
                          str(tmp_path / "q.onnx")], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False"] and (tmp_path / "q.onnx").exists()


def test_bench_on_ort_says_when_qdq_is_not_fused(tmp_path):
    """spa bench on ONNX Runtime counts each Q/DQ model's fused integer kernels and warns where
    there are none (a model placed for TensorRT runs in float plus the Q/DQ work there)."""
    proto = residual_model()
    for target in ("ort-cpu", "tensorrt"):
        onnx.save(quantize.int8(proto, calib(), target=target), tmp_path / f"{target}.onnx")
    onnx.save(proto, tmp_path / "fp32.onnx")
    doc = spa.bench([tmp_path / "fp32.onnx", tmp_path / "ort-cpu.onnx", tmp_path / "tensorrt.onnx"], warmup_ms=0,
                    duration_s=0.05, min_iterations=2).to_json()
    fused = [m.get("fused_kernels") for m in doc["models"]]
    assert fused[0] is None and fused[1]["QLinearConv"] == 2 and fused[2] == {}
    assert len(doc["warnings"]) == 1 and doc["warnings"][0].startswith("tensorrt.onnx") \
        and "--target ort-cpu" in doc["warnings"][0]
