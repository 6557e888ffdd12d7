"""The TensorRT backend and `spa build`.

Without TensorRT (every machine): the pure parts (--shapes parsing and the optimization profile,
precision against the model's types, the engine inspector's JSON, the builder's sparsity log, the
parser's error line) and every `spa build` error path that fails before TensorRT is needed.
With TensorRT and a CUDA GPU (skipped elsewhere): engines built from examples/tiny_resnet.onnx,
run and compared with ONNX Runtime, in float32, float16 and with --sparse.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from spa.backends import base
from spa.backends import trt as T

from spa.cli import app as cli
from spa.core.errors import SpaError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_resnet.onnx"


# ---------------------------------------------------------------- parse_shapes


@pytest.mark.parametrize("text, expected", [
    ("input:1x3x224x224/8x3x224x224/32x3x224x224",
     {"input": ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))}),
    ("x:4x16", {"x": ((4, 16), (4, 16), (4, 16))}),  # one shape: min = opt = max
    ("ids:1x1/1x128/4x512, mask:1x1/1x128/4x512",
     {"ids": ((1, 1), (1, 128), (4, 512)), "mask": ((1, 1), (1, 128), (4, 512))}),
    ("input:0:1x3/2x3/4x3", {"input:0": ((1, 3), (2, 3), (4, 3))}),  # tf2onnx names: the last ':' splits
    (" a : 2X8 ", {"a": ((2, 8), (2, 8), (2, 8))}),
])
def test_parse_shapes_valid(text, expected):
    assert T.parse_shapes(text) == expected


@pytest.mark.parametrize("text, says", [
    ("", "empty"),
    ("1x3x224x224", "expected NAME:SHAPE"),
    ("input:", "expected NAME:SHAPE"),
    (":1x3", "expected NAME:SHAPE"),
    ("input:1x3/2x3", "not 2 shapes"),
    ("input:1x3/2x3/3x3/4x3", "not 4 shapes"),
    ("input:1x3x/2x3/3x3", "is not a shape"),
    ("input:1x-3", "is not a shape"),
    ("input:1x3.5", "is not a shape"),
    ("input:axb", "is not a shape"),
    ("input:1x3/2x3x4/3x3", "different ranks"),
    ("input:8x3/1x3/32x3", "MIN <= OPT <= MAX"),
    ("input:1x3/8x3/4x3", "MIN <= OPT <= MAX"),
    ("a:1x2,a:1x2", "twice"),
    ("a:1x2,", "expected NAME:SHAPE"),
])
def test_parse_shapes_invalid(text, says):
    with pytest.raises(SpaError) as exc:
        T.parse_shapes(text)
    message = str(exc.value)
    assert says in message
    assert "\n" not in message and "shapes=NAME:MINxDIMS/OPTxDIMS/MAXxDIMS" in message  # one line, with the syntax (the CLI says --shapes)


# ---------------------------------------------------------------- profile_shapes


def test_profile_dynamic_batch_alone_defaults_to_the_batch():
    profile, notes = T.profile_shapes({"input": [-1, 3, 32, 32]}, {}, batch=8)
    assert profile == {"input": ((1, 3, 32, 32), (8, 3, 32, 32), (8, 3, 32, 32))}
    assert len(notes) == 1 and "input" in notes[0]


def test_profile_static_inputs_need_none():
    assert T.profile_shapes({"input": [1, 3, 32, 32]}, {}) == ({}, [])


def test_profile_takes_the_given_range():
    rng = ((1, 3, 8, 8), (2, 3, 16, 16), (4, 3, 32, 32))
    profile, notes = T.profile_shapes({"input": [-1, 3, -1, -1]}, {"input": rng})
    assert profile == {"input": rng} and notes == []


def test_profile_dynamic_non_batch_axis_without_shapes_names_the_input_and_syntax():
    with pytest.raises(SpaError) as exc:
        T.profile_shapes({"ids": [-1, -1], "image": [1, 3, 8, 8]}, {})
    message = str(exc.value)
    assert "input 'ids'" in message and "?x?" in message
    assert "shapes=ids:1x1/8x8/32x32" in message  # in the API's words; the CLI prints --shapes


@pytest.mark.parametrize("given, says", [
    ({"nope": ((1, 3), (1, 3), (1, 3))}, "'nope', which is not an input"),
    ({"input": ((1, 3), (1, 3), (1, 3))}, "rank 2, but the input has rank 4"),
    ({"input": ((1, 4, 32, 32), (1, 4, 32, 32), (1, 4, 32, 32))}, "axis 1 is fixed to 3"),
])
def test_profile_rejects_ranges_that_do_not_fit(given, says):
    with pytest.raises(SpaError) as exc:
        T.profile_shapes({"input": [-1, 3, 32, 32]}, given)
    assert says in str(exc.value)


def test_onnx_inputs_marks_dynamic_axes_and_skips_initializers():
    proto = onnx.load(str(EXAMPLE))
    assert T.onnx_inputs(proto) == {"input": [-1, 3, 32, 32]}


# ---------------------------------------------------------------- precision


def _matmul_model(dtype=TensorProto.FLOAT, cast_to=None) -> onnx.ModelProto:
    """x ─MatMul(W)─▶ y, W in `dtype` (and x cast to it when cast_to is given)."""
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    w = numpy_helper.from_array(np.ones((4, 4), dtype=np_type), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    if cast_to is not None:
        nodes.insert(0, helper.make_node("Cast", ["x0"], ["x"], to=cast_to))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x0" if cast_to else "x", dtype, [1, 4])],
                              [helper.make_tensor_value_info("y", dtype, [1, 4])], [w])
    return helper.make_model(graph)


def test_model_float_types():
    assert T.model_float_types(_matmul_model()) == {"float32"}
    assert T.model_float_types(_matmul_model(TensorProto.FLOAT16)) == {"float16"}
    assert "bfloat16" in T.model_float_types(_matmul_model(cast_to=TensorProto.BFLOAT16))


@pytest.mark.parametrize("precision, hint", [("fp16", "spa quantize MODEL --fp16"), ("bf16", "bfloat16 first")])
def test_precision_of_a_float32_model_needs_a_conversion_when_strongly_typed(precision, hint):
    with pytest.raises(SpaError) as exc:
        T.check_precision(_matmul_model(), precision, strongly_typed=True)
    assert f"--{precision}" in str(exc.value) and "strongly typed" in str(exc.value) and hint in str(exc.value)


def test_precision_comes_from_the_model_types():
    assert "float16" in T.check_precision(_matmul_model(TensorProto.FLOAT16), "fp16")
    assert "float32" in T.check_precision(_matmul_model(), "fp32")
    assert "builder flag" in T.check_precision(_matmul_model(), "fp16", strongly_typed=False)  # TensorRT < 10


def _fake_trt(network_flags: dict, builder_flags: dict):
    return types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace(**network_flags),
                                 BuilderFlag=types.SimpleNamespace(**builder_flags))


@pytest.mark.parametrize("network_flags, builder_flags, strongly, flags", [
    ({"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}, {"FP16": 0, "SPARSE_WEIGHTS": 7}, True, 2),  # 10.x: opt in
    ({"STRONGLY_TYPED": 1}, {"SPARSE_WEIGHTS": 7}, True, 2),  # 11.x: accepted, always on
    ({}, {"SPARSE_WEIGHTS": 7}, True, 0),  # a TensorRT without the flag and without weak typing
    ({"EXPLICIT_BATCH": 0}, {"FP16": 0}, False, 1),  # 8.x: weakly typed, explicit batch
])
def test_strongly_typed_where_tensorrt_has_it(network_flags, builder_flags, strongly, flags):
    fake = _fake_trt(network_flags, builder_flags)
    assert T.strongly_typed(fake) is strongly
    assert T._network_flags(fake, strongly) == flags


# ---------------------------------------------------------------- engine inspector JSON

# A DETAILED inspector document in the shape of TensorRT's developer guide example ("Engine
# Inspector") and trex/parser.py (keys 'Layers' and 'Bindings'); kernel names follow TensorRT's
# naming, sparse kernels carrying "sparse". The dense "fc" comes from an ONNX node named
# "sparse_fc": only the tactic decides.
INSPECTOR_10 = {
    "Layers": [
        {"Name": "conv1 + relu1", "LayerType": "CaskConvolution", "ParameterType": "Convolution",
         "Inputs": [{"Name": "input", "Dimensions": [8, 64, 56, 56], "Format/Datatype": "Row major linear FP16 format"}],
         "Outputs": [{"Name": "c1", "Dimensions": [8, 64, 56, 56], "Format/Datatype": "Row major linear FP16 format"}],
         "Metadata": "[ONNX Layer: /conv1/Conv]\x1e[ONNX Layer: /relu1/Relu]",
         "TacticName": "sm80_xmma_fprop_sparse_conv_interleaved_f16f16_f32_nhwc_tilesize128x128x64", "TacticValue": "0x1"},
        {"Name": "conv2", "LayerType": "CaskConvolution", "ParameterType": "Convolution",
         "Outputs": [{"Name": "c2", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
         "Metadata": "[ONNX Layer: /conv2/Conv]",
         "TacticName": "sm80_xmma_fprop_implicit_gemm_f16f16_f16f16_f16_nhwckrsc_nhwc_tilesize64x64x64", "TacticValue": "0x2"},
        {"Name": "fc", "LayerType": "gemm", "Metadata": "[ONNX Layer: sparse_fc]",
         "Outputs": [{"Name": "logits", "Format/Datatype": "Row major linear FP32 format"}],
         "TacticName": "sm80_xmma_gemm_f32f32_f32f32_f32_tn_n_tilesize64x64x8", "TacticValue": "0x3"},
        {"Name": "shuffle", "LayerType": "Shuffle", "Outputs": [{"Name": "out", "Format/Datatype": "N/A"}]},
    ],
    "Bindings": ["input", "out"],
}
# TensorRT 11: "I/O Tensors" replaces "Bindings", "DataType" is its own field.
INSPECTOR_11 = {
    "Layers": [
        {"Name": "gemm_0", "LayerType": "gemm", "Metadata": "[ONNX Layer: /fc/MatMul]",
         "Outputs": [{"Name": "y", "Format": "Row major linear", "DataType": "Half"}],
         "TacticName": "sm90_xmma_sparse_gemm_f16f16_f16f32_f32_tn"},
        {"Name": "act_0", "LayerType": "pointwise", "Outputs": [{"Name": "z", "DataType": "Float"}],
         "TacticName": "pointwise_vectorized"},
    ],
    "I/O Tensors": [{"Name": "x", "IOMode": "Input", "DataType": "Float", "Dimensions": [1, 64]}],
}


def test_sparse_layers_reads_the_tactic_names():
    doc = T.sparse_layers(INSPECTOR_10)
    assert doc["layers"] == 4
    assert doc["sparse"] == ["conv1 + relu1"]
    assert doc["onnx_nodes"] == ["/conv1/Conv", "/relu1/Relu"]
    assert "eligible" in doc["eligible_note"] and "eligible" not in doc


def test_sparse_layers_takes_a_json_string_and_the_build_logs_eligible_list():
    doc = T.sparse_layers(json.dumps(INSPECTOR_11), eligible=["gemm_0", "gemm_1"])
    assert doc["sparse"] == ["gemm_0"] and doc["onnx_nodes"] == ["/fc/MatMul"]
    assert doc["eligible"] == ["gemm_0", "gemm_1"] and doc["layers"] == 2


def test_sparse_layers_of_a_names_only_engine_says_why_nothing_is_seen():
    doc = T.sparse_layers({"Layers": ["conv1 + relu1", "fc"], "Bindings": ["input", "out"]})
    assert doc["sparse"] == [] and doc["layers"] == 2 and "DETAILED" in doc["eligible_note"]


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]"])
def test_sparse_layers_rejects_what_is_not_inspector_json(bad):
    with pytest.raises(SpaError, match="engine inspector's JSON"):
        T.sparse_layers(bad)


def test_layer_types_counts_the_output_types_of_both_schemas():
    assert T.layer_types(INSPECTOR_10) == {"float16": 2, "float32": 1, "unknown": 1}
    assert T.layer_types(INSPECTOR_11) == {"float16": 1, "float32": 1}


def test_sparsity_log_reads_the_builders_two_lines():
    # the log format of TensorRT's developer guide, "Structured Sparsity"
    picked = "(Sparsity) TRT inference plan picked sparse implementation for layers: conv2, conv3"
    lines = ["[03/23/2021-00:14:05] [I] [TRT] (Sparsity) Layers eligible for sparse math: conv1, conv2, conv3",
             f"[03/23/2021-00:14:05] [I] [TRT] {picked}"]
    assert T.sparsity_log(lines) == {"eligible": ["conv1", "conv2", "conv3"], "picked": ["conv2", "conv3"]}
    assert T.sparsity_log(["[I] [TRT] something else"]) == {"eligible": None, "picked": None}


# ---------------------------------------------------------------- parser errors, files


class _ParserError:
    def __init__(self, name, op, desc, node=3):
        self._name, self._op, self._desc, self._node = name, op, desc, node

    def node_name(self):
        return self._name

    def node_operator(self):
        return self._op

    def node(self):
        return self._node

    def desc(self):
        return self._desc


class _Parser:
    def __init__(self, *errors):
        self.errors = errors
        self.num_errors = len(errors)

    def get_error(self, i):
        return self.errors[i]


def test_parser_error_is_one_line_with_the_first_node():
    line = T._parser_error(_Parser(_ParserError("/blocks.0/attn/Einsum", "Einsum", "unsupported equation\nmore"),
                                   _ParserError("other", "Relu", "x")))
    assert line == ("TensorRT cannot parse the model for node '/blocks.0/attn/Einsum' (Einsum): "
                    "unsupported equation (+1 more)")


def test_parser_error_without_a_node_name_uses_the_index_or_nothing():
    assert "for node '#3'" in T._parser_error(_Parser(_ParserError("", "", "bad")))
    assert T._parser_error(_Parser(_ParserError("", "", "bad graph", node=-1))) == \
        "TensorRT cannot parse the model: bad graph"


# ---------------------------------------------------------------- without TensorRT


@pytest.fixture
def no_tensorrt(monkeypatch):
    """`import tensorrt` fails as on a machine without it, whether or not it is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def _run(capsys, *args):
    capsys.readouterr()
    try:
        rc = cli.main([str(a) for a in args])
    except SystemExit as exc:
        rc = exc.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "tiny.onnx"
    path.write_bytes(EXAMPLE.read_bytes())
    return path


def _assert_clean_failure(rc, out, err, folder: Path, model: Path, digest: str, says: str, code: int = 1):
    lines = err.strip().splitlines()
    assert rc == code and out == ""
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], err
    assert sorted(p.name for p in folder.iterdir()) == [model.name]  # no engine, no temp file
    assert _digest(model) == digest


def test_build_without_trt_says_it_is_the_only_format(capsys, model):
    digest = _digest(model)
    rc, out, err = _run(capsys, "build", model, "-o", model.with_suffix(".engine"))
    _assert_clean_failure(rc, out, err, model.parent, model, digest, "--trt", code=2)


def test_build_without_tensorrt_names_the_install(capsys, model, no_tensorrt):
    digest = _digest(model)
    rc, out, err = _run(capsys, "build", model, "--trt", "-o", model.with_suffix(".engine"), "--sparse")
    _assert_clean_failure(rc, out, err, model.parent, model, digest, "pip install 'spa[tensorrt]'")


def test_build_json_without_tensorrt_keeps_stdout_empty(capsys, model, no_tensorrt):
    rc, out, err = _run(capsys, "build", model, "--trt", "--json")
    assert rc == 1 and out == "" and "spa[tensorrt]" in err
    assert not model.with_suffix(".engine").exists()


def test_build_missing_model(capsys, tmp_path, no_tensorrt):
    rc, _, err = _run(capsys, "build", tmp_path / "absent.onnx", "--trt")
    assert rc == 1 and "no such file" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_build_rejects_a_file_that_is_not_onnx(capsys, tmp_path, no_tensorrt):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x00garbage\xff" * 10)
    rc, _, err = _run(capsys, "build", bad, "--trt")
    assert rc == 1 and "not a valid ONNX file" in err


@pytest.mark.parametrize("shapes, says", [
    ("input:1x3x32", "rank 3, but the input has rank 4"),
    ("image:1x3x32x32", "'image', which is not an input"),
    ("input:4x3x32x32/1x3x32x32", "not 2 shapes"),
    ("input:8x3x32x32/1x3x32x32/32x3x32x32", "MIN <= OPT <= MAX"),
])
def test_build_checks_shapes_before_tensorrt(capsys, model, no_tensorrt, shapes, says):
    digest = _digest(model)
    rc, out, err = _run(capsys, "build", model, "--trt", "--shapes", shapes)
    _assert_clean_failure(rc, out, err, model.parent, model, digest, says)


def test_build_asks_for_shapes_of_dynamic_non_batch_axes(capsys, tmp_path, no_tensorrt):
    """x[batch, seq] ─Relu─▶ y: seq is dynamic, so a profile is needed."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])])
    path = tmp_path / "seq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    digest = _digest(path)
    rc, out, err = _run(capsys, "build", path, "--trt")
    _assert_clean_failure(rc, out, err, tmp_path, path, digest, "--shapes x:1x1/8x8/32x32")


@pytest.mark.parametrize("extra, says, code", [
    (["-o", "{tmp}/no/such/dir/m.engine"], "does not exist", 1),
    (["-o", "{model}"], "it is the input model", 1),
    (["-o", "{tmp}/m.onnx"], "name it .engine", 1),
    (["--workspace", "0"], "--workspace 0: it must be a positive", 2),  # a usage error
    (["--timing-cache", "{tmp}/nowhere/t.cache"], "does not exist", 1),
])
def test_build_checks_arguments_before_tensorrt(capsys, model, no_tensorrt, extra, says, code):
    digest = _digest(model)
    args = [a.format(tmp=model.parent, model=model) for a in extra]
    rc, out, err = _run(capsys, "build", model, "--trt", *args)
    _assert_clean_failure(rc, out, err, model.parent, model, digest, says, code)


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """The TensorRT backend's three TensorRT calls replaced: a build gives fixed engine bytes and
    an inspector report with one sparse layer, so spa build's own logic runs without a GPU."""
    info = {"Layers": [{"Name": "conv1", "TacticName": "sm80_xmma_fprop_sparse_conv", "Outputs": [
        {"DataType": "Float"}], "Metadata": "[ONNX Layer: /conv1/Conv]"}]}
    built = T.Built(b"fake engine", "fp32", True, {"input": ((1, 3, 32, 32),) * 3}, {"eligible": ["conv1"]}, 1.5,
                    ["a note"])
    monkeypatch.setattr(T, "tensorrt", lambda: types.SimpleNamespace(__version__="10.0-fake"))
    monkeypatch.setattr(T, "build", lambda *a, **k: built)
    monkeypatch.setattr(T, "inspect_plan", lambda plan, what="": info)


def test_build_api_document_is_the_commands(capsys, model, fake_tensorrt):
    """spa.api.build.build without the CLI: the same document as `spa build --json`, the engine
    written to output= (or only held by the result, and saved by result.save)."""
    from spa.api.build import build

    engine = model.with_suffix(".engine")
    rc, out, err = _run(capsys, "build", model, "--trt", "--sparse", "-o", engine, "--json")
    assert rc == 0, err
    cli_doc = json.loads(out)
    engine.unlink()
    result = build(str(model), sparse=True, output=engine)
    assert result.to_json() == cli_doc and engine.read_bytes() == b"fake engine"
    assert cli_doc["sparse"]["sparse"] == ["conv1"] and cli_doc["precision"]["layer_types"] == {"float32": 1}
    in_memory = build(onnx.load(str(model)), sparse=True)
    assert in_memory.to_json()["output"] is None and in_memory.to_json()["input"] is None
    assert in_memory.save(model.parent / "m2.engine").read_bytes() == b"fake engine"


def test_build_api_without_tensorrt_and_bad_values(model, no_tensorrt, capsys):
    from spa.api.build import build
    from spa.core.errors import UsageError

    with pytest.raises(SpaError, match=r"spa\[tensorrt\]"):
        build(model)
    with pytest.raises(UsageError, match="invalid workspace=0"):
        build(model, workspace=0)
    with pytest.raises(UsageError, match="exclude each other"):
        build(model, fp16=True, bf16=True)
    rc, out, err = _run(capsys, "build", model, "--trt", "--workspace", "-1")
    assert rc == 2 and out == "" and "invalid --workspace -1" in err


def test_open_session_without_tensorrt_names_the_install(no_tensorrt):
    with pytest.raises(SpaError) as exc:
        base.open_session(EXAMPLE, "trt")
    assert "backend 'trt' needs tensorrt" in str(exc.value) and "spa[tensorrt]" in str(exc.value)


def test_open_session_without_torch_cuda_names_it(monkeypatch):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # present, never reached
    with pytest.raises(SpaError) as exc:
        base.open_session(EXAMPLE, "trt")
    message = str(exc.value)
    if torch.version.cuda is None:
        assert "torch with CUDA for device buffers" in message and "spa[tensorrt]" in message
    else:
        assert "no CUDA device" in message


# ---------------------------------------------------------------- with TensorRT and a GPU


def _gpu():
    trt = pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    return trt


def _close(got: np.ndarray, ref: np.ndarray, tol: float) -> float:
    """Largest error relative to the reference's largest magnitude (TF32/FP16 round differently)."""
    err = float(np.max(np.abs(got.astype(np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-12))
    assert err <= tol, err
    return err


def test_trt_session_matches_onnxruntime():
    _gpu()
    from spa.backends import ort

    rng = ((1, 3, 32, 32), (4, 3, 32, 32), (4, 3, 32, 32))
    sess = base.open_session(EXAMPLE, "trt", base.Options(shapes={"input": rng}))
    assert [i.name for i in sess.inputs] == ["input"] and sess.inputs[0].shape == ["1..4", 3, 32, 32]
    feeds = base.feeds_for(sess.inputs, batch=4)
    got, ref = sess.run(feeds), ort.run(str(EXAMPLE), feeds)
    assert set(got) == set(ref) and got["output"].shape == ref["output"].shape
    _close(got["output"], ref["output"], 1e-2)  # TF32 is on for float32 layers
    desc = sess.describe()
    assert desc["runtime"].startswith("tensorrt ") and desc["device"]
    assert desc["sparse"]["layers"] > 0 and desc["layer_types"]
    with pytest.raises(SpaError, match="outside the engine's profile"):
        sess.run(base.feeds_for(sess.inputs, batch=8))


def test_trt_runner_times_with_cuda_events():
    _gpu()
    sess = base.open_session(EXAMPLE, "trt", base.Options(cuda_graph=True))
    step = sess.runner(base.feeds_for(sess.inputs, batch=1))
    times = [step() for _ in range(5)]
    assert step.clock == "cuda events" and all(t > 0 for t in times)
    assert sess.describe()["cuda_graph"].startswith(("captured", "capture failed"))


def test_trt_fp16_build_of_a_converted_model(tmp_path):
    _gpu()
    from spa.backends import ort
    from spa.passes import quantize

    from spa.core.model import load, save

    with pytest.raises(SpaError, match="spa quantize"):
        T.build_engine(EXAMPLE, base.Options(precision="fp16"))
    half = tmp_path / "tiny.fp16.onnx"
    save(quantize.fp16(load(EXAMPLE).proto), half)
    sess = base.open_session(half, "trt", base.Options(precision="fp16"))
    feeds = base.feeds_for(sess.inputs, batch=1)
    _close(sess.run(feeds)["output"], ort.run(str(EXAMPLE), feeds)["output"], 5e-2)
    assert "float16" in sess.describe()["precision"]
    assert sess.describe()["layer_types"].get("float16", 0) > 0


def test_spa_build_sparse_reports_the_inspector(capsys, tmp_path):
    _gpu()
    from spa.backends import ort
    from spa.passes.sparsify import sparsify

    from spa.core.model import load, save

    sparse_model = tmp_path / "tiny.sparse.onnx"
    save(sparsify(load(EXAMPLE).proto)[0], sparse_model)
    engine, cache = tmp_path / "tiny.engine", tmp_path / "timing.cache"
    rc, out, err = _run(capsys, "build", sparse_model, "--trt", "--sparse", "--json", "-o", engine,
                        "--timing-cache", cache)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["schema_version"] == 1 and doc["output"] == str(engine) and doc["bytes"] == engine.stat().st_size
    assert doc["sparse"]["requested"] is True and isinstance(doc["sparse"]["sparse"], list)
    assert doc["sparse"]["layers"] > 0 and doc["profiles"]["input"]["max"] == [1, 3, 32, 32]
    assert cache.stat().st_size > 0 and not [p for p in tmp_path.iterdir() if p.name.startswith(".spa-tmp-")]
    sess = base.open_session(engine, "trt")
    feeds = base.feeds_for(sess.inputs, batch=1)
    _close(sess.run(feeds)["output"], ort.run(str(sparse_model), feeds)["output"], 1e-2)
