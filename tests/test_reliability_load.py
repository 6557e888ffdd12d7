"""Hostile model files (issue 18, classes 6 and 7): tensors whose bytes do not match their dims
and type, external data with a bad offset, length or location, a graph input no machine could
feed, and sparse initializers whose external data lies outside the model's folder. Each is one
line naming the file and the tensor, exit 1, nothing written, every input byte-identical, for
every command that reads a model; valid neighbours (external data beside the model, sparse
initializers included) still load."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa.core.model import load
from tests.test_cli import EXAMPLE, assert_untouched, snapshot, spa
from tests.test_reliability import one_error

# ---------------------------------------------------------------- models


def conv_model() -> onnx.ModelProto:
    """x [1,3,8,8] -> Conv(w) -> Relu -> Conv(w2) -> out: two weights, 'w' is the one spoiled."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["y"], ["z"]),
             helper.make_node("Conv", ["z", "w2"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 8, 8])], [w, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _external(folder, spoil) -> str:
    """m.onnx with its weights in m.data beside it; `spoil(tensor 'w')` edits w's entry."""
    folder.mkdir(exist_ok=True)
    onnx.save(conv_model(), str(folder / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    model = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    spoil(model.graph.initializer[0])
    onnx.save(model, str(folder / "m.onnx"))
    return f"{folder.name}/m.onnx"


def _entry(key: str, value: str):
    def spoil(tensor):
        for e in tensor.external_data:
            if e.key == key:
                e.value = value
                return
        tensor.external_data.add(key=key, value=value)
    return spoil


def _embedded(folder, spoil) -> str:
    model = conv_model()
    spoil(model.graph.initializer[0])
    onnx.save(model, str(folder / "bad.onnx"))
    return "bad.onnx"


def _float_data(tensor):
    tensor.ClearField("raw_data")
    tensor.float_data.extend([1.0] * 5)


def _int64_data(tensor):
    tensor.ClearField("raw_data")
    tensor.data_type = TensorProto.INT64
    tensor.int64_data.extend([1] * 7)


def _dims(*dims):
    def spoil(tensor):
        del tensor.dims[:]
        tensor.dims.extend(dims)
    return spoil


def _truncate(folder, _tensor):
    data = folder / "m.data"
    data.write_bytes(data.read_bytes()[:100])


def _data_dir(folder, tensor):
    (folder / "d").mkdir()
    _entry("location", "d")(tensor)


def _constant(folder) -> str:
    """The weight as a Constant node whose value holds 5 bytes fewer than its shape needs."""
    model = conv_model()
    w = model.graph.initializer[0]
    value = onnx.TensorProto()
    value.CopyFrom(w)
    value.raw_data = w.raw_data[:-5]
    del model.graph.initializer[0]
    model.graph.node.insert(0, helper.make_node("Constant", [], ["w"], value=value))
    onnx.save(model, str(folder / "const.onnx"))
    return "const.onnx"


# (builder(folder) -> model path relative to the folder, words the error line must hold)
FAULTS = {
    "raw-long": (lambda d: _embedded(d, lambda t: setattr(t, "raw_data", t.raw_data + b"\0" * 8)),
                 ["'bad.onnx'", "tensor 'w'", "440 bytes", "needs 432 bytes"]),
    "raw-short": (lambda d: _embedded(d, lambda t: setattr(t, "raw_data", t.raw_data[:-4])),
                  ["'bad.onnx'", "tensor 'w'", "428 bytes", "needs 432 bytes"]),
    "float-data-count": (lambda d: _embedded(d, _float_data), ["tensor 'w'", "holds 5 values", "needs 108"]),
    "int64-data-count": (lambda d: _embedded(d, _int64_data), ["tensor 'w'", "holds 7 values", "needs 108"]),
    "init-dim-2**40": (lambda d: _embedded(d, _dims(2**40, 3, 3, 3)),
                       ["tensor 'w'", "(1099511627776, 3, 3, 3)", "needs 118747255799808 bytes"]),
    "negative-dim": (lambda d: _embedded(d, _dims(-4, 3, 3, 3)), ["tensor 'w'", "negative dimension"]),
    "constant-value": (_constant, ["'const.onnx'", "tensor 'w'", "427 bytes", "needs 432"]),
    "ext-negative-offset": (lambda d: _external(d / "e", _entry("offset", "-5")),
                            ["'e/m.onnx'", "tensor 'w'", "offset of '-5'", "non-negative"]),
    "ext-offset-not-a-number": (lambda d: _external(d / "e", _entry("offset", "12abc")),
                                ["tensor 'w'", "offset of '12abc'"]),
    "ext-length-bad": (lambda d: _external(d / "e", _entry("length", "7")),
                       ["'e/m.onnx'", "tensor 'w'", "length of 7 bytes", "needs 432 bytes"]),
    "ext-length-too-long": (lambda d: _external(d / "e", _entry("length", "100000")),
                            ["tensor 'w'", "length of 100000 bytes", "needs 432 bytes"]),
    "ext-offset-past-end": (lambda d: _external(d / "e", _entry("offset", "1000000")),
                            ["tensor 'w'", "offset of 1000000", "past the end of 'm.data'"]),
    "ext-file-truncated": (lambda d: _external(d / "e", lambda t: _truncate(d / "e", t)),
                           ["'e/m.onnx'", "tensor 'w'", "reads past the end", "truncated"]),
    "ext-nul-in-location": (lambda d: _external(d / "e", _entry("location", "m.data\0x")),
                            ["'e/m.onnx'", "tensor 'w'", "NUL byte"]),
    "ext-no-location": (lambda d: _external(d / "e", lambda t: t.external_data.pop(0)),
                        ["tensor 'w'", "without a location"]),
    "ext-location-a-folder": (lambda d: _external(d / "e", lambda t: _data_dir(d / "e", t)),
                              ["tensor 'w'", "not a regular file"]),
}

WORK_ARGS = {  # the rest of each command's argv after the model; outputs in the work folder
    "analyze": [],
    "prune": ["--ratio", "0.5", "-o", "out.onnx"],
    "quantize": ["--fp16", "-o", "out.onnx"],
    "sparsify": ["--min-size", "1", "-o", "out.onnx"],
    "eval": ["--data", "one.npz"],
    "bench": ["--duration-s", "0.01"],
    "compare": ["ok.onnx"],
    "report": ["ok.onnx", "-o", "r.html"],
    "sensitivity": ["--calib", "one.npz", "--ratios", "0.5"],
    "compress": ["--ratio", "0.5", "-o", "out.onnx"],
    "finetune": ["--data", "one.npz", "--distill-from", "ok.onnx", "--epochs", "1", "-o", "out.onnx"],
}


@pytest.fixture
def work(tmp_path, monkeypatch):
    """ok.onnx (a valid conv_model), one.npz (one sample for it); the cwd."""
    onnx.save(conv_model(), str(tmp_path / "ok.onnx"))
    np.savez(tmp_path / "one.npz", x=np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _refused(capsys, work, argv, words) -> None:
    before = snapshot(work)
    line = one_error(spa(capsys, *argv))
    assert "internal error" not in line
    for word in words:
        assert word in line, line
    assert_untouched(work, before)


@pytest.mark.parametrize("command", ["analyze", "prune"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_bad_tensor_is_one_line_naming_file_and_tensor(capsys, work, fault, command):
    build, words = FAULTS[fault]
    path = build(work)
    _refused(capsys, work, [command, path, *WORK_ARGS[command]], words)


@pytest.mark.parametrize("command", sorted(WORK_ARGS))
@pytest.mark.parametrize("fault", ["raw-long", "ext-negative-offset", "ext-nul-in-location"])
def test_every_command_refuses_a_bad_tensor(capsys, work, fault, command):
    """Commands that load the model and those that hand the file to ONNX Runtime alike."""
    if command == "finetune":
        pytest.importorskip("torch")
    build, words = FAULTS[fault]
    _refused(capsys, work, [command, build(work), *WORK_ARGS[command]], words)


def _huge_input(work) -> str:
    model = conv_model()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 2**40
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 2**40
    onnx.save(model, str(work / "huge.onnx"))
    return "huge.onnx"


@pytest.mark.parametrize("command", ["prune", "quantize", "sparsify", "bench", "compare", "report", "compress"])
def test_an_input_too_large_to_make_is_one_line(capsys, work, command):
    """A graph input with a dim of 2**40: every command that builds random inputs for it says so
    (naming the input and the bytes) instead of failing to allocate them."""
    path = _huge_input(work)
    _refused(capsys, work, [command, path, *WORK_ARGS[command]],
             ["input 'x'", "(1, 3, 1099511627776, 8)", "would need 105553116266496 bytes"])


def test_an_input_too_large_to_make_still_analyzes(capsys, work):
    """The analysis needs no run: the huge axis reads as one of unknown size."""
    res = spa(capsys, "analyze", _huge_input(work), "--json")
    assert res.rc == 0, res.err
    assert '"w:0"' in res.out


# ---------------------------------------------------------------- sparse initializers (class 7)


def sparse_model(folder, location: str, data_at) -> str:
    """x [1,4] @ W -> y, W a 4x4 sparse initializer (its diagonal) whose values are in `location`."""
    folder.mkdir(exist_ok=True)
    data_at.write_bytes(np.arange(1, 5, dtype=np.float32).tobytes())
    values = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        values.external_data.add(key=key, value=value)
    indices = numpy_helper.from_array(np.array([0, 5, 10, 15], np.int64), "w_indices")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              sparse_initializer=[helper.make_sparse_tensor(values, indices, [4, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "m.onnx"))
    return f"{folder.name}/m.onnx"


def _sparse_escape(work, how: str) -> str:
    if how == "parent":
        return sparse_model(work / "s", "../outside.bin", work / "outside.bin")
    if how == "cwd-only":  # the file exists relative to the current directory, not to the model
        return sparse_model(work / "s", "outside.bin", work / "outside.bin")
    if how == "absolute":
        return sparse_model(work / "s", str(work / "outside.bin"), work / "outside.bin")
    path = sparse_model(work / "s", "link.bin", work / "outside.bin")
    os.symlink(work / "outside.bin", work / "s" / "link.bin")
    return path


@pytest.mark.parametrize("command", ["analyze", "report", "prune", "bench", "eval"])
@pytest.mark.parametrize("how", ["parent", "cwd-only", "absolute", "symlink"])
def test_sparse_initializer_external_data_is_checked_like_any(capsys, work, how, command):
    path = _sparse_escape(work, how)
    np.savez(work / "four.npz", x=np.ones((1, 4), np.float32))
    args = {"eval": ["--data", "four.npz"], "report": [path, "-o", "r.html"]}.get(command, WORK_ARGS[command])
    words = ["'s/m.onnx'", "tensor 'w'", "is missing" if how == "cwd-only" else "escapes the model's folder"]
    _refused(capsys, work, [command, path, *args], words)


def test_sparse_initializer_external_data_beside_the_model_loads(capsys, work, monkeypatch):
    path = sparse_model(work / "s", "w.bin", work / "s" / "w.bin")
    monkeypatch.chdir(work / "s")  # resolved from the model's folder, wherever the command runs
    model = load(work / path)
    values = model.graph.sparse_initializer[0].values
    assert values.data_location == TensorProto.DEFAULT
    assert numpy_helper.to_array(values).tolist() == [1, 2, 3, 4]
    assert model.external_files == {(work / "s" / "w.bin").resolve()}
    monkeypatch.chdir(work)
    assert spa(capsys, "analyze", path).rc == 0
    assert spa(capsys, "bench", path, "--duration-s", "0.01").rc == 0


# ---------------------------------------------------------------- valid neighbours


def test_valid_external_data_still_loads(capsys, work):
    """The bundled example with every tensor in external data (one file, and one file per tensor),
    and a data file holding more than one tensor without `length` keys, load and prune."""
    (work / "one").mkdir()
    onnx.save(onnx.load(str(EXAMPLE)), str(work / "one" / "m.onnx"), save_as_external_data=True, location="m.data",
              size_threshold=0)
    (work / "many").mkdir()  # saving moves the data out of the proto: a fresh copy each time
    onnx.save(onnx.load(str(EXAMPLE)), str(work / "many" / "m.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=False, size_threshold=0)
    model = onnx.load(str(work / "one" / "m.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        del t.external_data[[e.key for e in t.external_data].index("length")]
    (work / "nolen").mkdir()
    shutil.copy(work / "one" / "m.data", work / "nolen" / "m.data")
    onnx.save(model, str(work / "nolen" / "m.onnx"))
    dense = load(EXAMPLE)
    for folder in ("one", "many", "nolen"):
        loaded = load(work / folder / "m.onnx")
        for a, b in zip(loaded.graph.initializer, dense.graph.initializer):
            assert np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b)), (folder, a.name)
        res = spa(capsys, "prune", f"{folder}/m.onnx", "--ratio", "0.3", "-o", f"{folder}.pruned.onnx")
        assert res.rc == 0, (folder, res.err)


def _runtime_op_model(op: str) -> onnx.ModelProto:
    """x -> `op`(x, s) -> MatMul -> Relu -> MatMul -> y at opset 22: SimplifiedLayerNormalization is
    ONNX Runtime's own op in the default domain (ONNX Runtime GenAI's exports use it), which the
    ONNX checker has no schema for."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, 8])
    inits = [numpy_helper.from_array(np.ones(8, np.float32), "s"),
             numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w2")]
    nodes = [helper.make_node(op, ["x", "s"], ["n"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["n", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 22)])
    model.ir_version = 10
    return model


def test_a_model_onnx_runtime_runs_loads_though_the_checker_lacks_its_op(capsys, work):
    """The checker rejects it ("No Op registered"); ONNX Runtime runs it: spa loads, prunes and
    verifies it (the output is run in ONNX Runtime; its checker complaint is the input's own)."""
    import json

    from spa.core.checks import checker_message

    onnx.save(_runtime_op_model("SimplifiedLayerNormalization"), "rms.onnx")
    assert "No Op registered for SimplifiedLayerNormalization" in checker_message("rms.onnx", full=False)
    r = spa(capsys, "prune", "rms.onnx", "--ratio", "0.5", "-o", "out.onnx", "--json")
    assert r.rc == 0, r.err
    doc = json.loads(r.out)
    assert doc["channels_removed"] == 8 and doc["check"]["status"] == "ok", doc["check"]
    assert load("out.onnx").proto.graph.initializer[1].dims == [8, 8]  # w1: 16 -> 8 columns


def test_an_op_neither_onnx_nor_onnx_runtime_knows_is_one_line(capsys, work):
    onnx.save(_runtime_op_model("NoSuchOp"), "bogus.onnx")
    _refused(capsys, work, ["prune", "bogus.onnx", "--ratio", "0.5", "-o", "out.onnx"],
             ["bogus.onnx", "neither ONNX nor ONNX Runtime knows its op 'NoSuchOp'", "another runtime"])
