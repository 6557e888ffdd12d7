"""Model I/O: external data (in and out), >2 GB outputs, atomic saves, shape-inference fallbacks."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from spa.backends import ort as ort_backend

import spa
import spa.core.model
from spa import api
from spa.core.errors import SpaError
from tests.graphs import build, const, node, weight


def _cnn():
    """x[1,3,8,8] -> Conv(8) -> Relu -> Conv(4) -> y"""
    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4), node("Relu", ["c1"], ["r1"]),
             node("Conv", ["r1", "w2", "b2"], ["y"], kernel_shape=[3, 3], pads=[1] * 4)]
    inits = [weight("w1", 8, 3, 3, 3), weight("b1", 8), weight("w2", 4, 8, 3, 3), weight("b2", 4)]
    return build(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 4, 8, 8]}, inits)


def test_external_data_model_loads_and_prunes(tmp_path):
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    onnx.save_model(_cnn().proto, str(src), save_as_external_data=True, location="m.bin", size_threshold=0)
    model = spa.load(src)
    assert model.external_files == {(src.parent / "m.bin").resolve()}
    analysis = spa.analyze(model)
    pruned = api.prune(analysis, api.make_plan(analysis, 0.5))
    out = spa.save(pruned, tmp_path / "out.onnx")
    assert spa.load(out).proto.graph.initializer[0].dims[0] == 4


def test_external_data_escaping_the_folder_is_refused(tmp_path):
    proto = _cnn().proto
    onnx.save_model(proto, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.bin", size_threshold=0)
    loaded = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for t in loaded.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../m.bin"
    (tmp_path / "sub").mkdir()
    onnx.save_model(loaded, str(tmp_path / "sub" / "m.onnx"))
    with pytest.raises(SpaError, match="escapes the model's folder"):
        spa.load(tmp_path / "sub" / "m.onnx")


def test_big_outputs_get_one_external_data_file(tmp_path, monkeypatch):
    """Above the 2 GB protobuf limit (lowered here) the weights go to `<name>.data`."""
    monkeypatch.setattr(spa.core.model, "TWO_GB", 1000)
    model = _cnn()
    out = spa.save(model.proto, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    back = spa.load(out)
    assert back.external_files == {(tmp_path / "big.onnx.data").resolve()}
    feeds = ort_backend.random_feeds(model.proto)
    monkeypatch.setattr(spa.core.model, "TWO_GB", 2**31 - 1)
    np.testing.assert_array_equal(ort_backend.run(str(out), feeds)["y"], ort_backend.run(model.proto, feeds)["y"])


def test_lazy_weights_prune_like_loaded_ones(tmp_path, monkeypatch):
    """A model with large external data (the limit lowered here) keeps its weights in its file while
    spa prunes it: read one at a time, the untouched ones copied to the output's data file in
    chunks; the result equals the one pruned from fully loaded weights, the input is left as it was."""
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    onnx.save_model(_cnn().proto, str(src), save_as_external_data=True, location="m.bin", size_threshold=0)
    before = {p.name: p.read_bytes() for p in src.parent.iterdir()}
    eager = spa.prune(str(src), ratio=0.5, output=str(tmp_path / "eager.onnx"))
    monkeypatch.setattr(spa.core.model, "LAZY_BYTES", 0)
    lazy_model = spa.core.model.load(src, lazy=True)
    assert set(lazy_model.weights_at) == {"w1", "b1", "w2", "b2"}
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in lazy_model.proto.graph.initializer)
    (tmp_path / "out").mkdir()
    lazy = spa.prune(str(src), ratio=0.5, output=str(tmp_path / "out" / "m.onnx"))
    assert lazy.model is None and (tmp_path / "out" / "m.onnx.data").is_file()  # kept nowhere but the file
    assert lazy["after"] == {**eager["after"], "bytes": lazy["after"]["bytes"]}
    feeds = ort_backend.random_feeds(_cnn().proto)
    np.testing.assert_array_equal(ort_backend.run(str(tmp_path / "out" / "m.onnx"), feeds)["y"],
                                  ort_backend.run(str(tmp_path / "eager.onnx"), feeds)["y"])
    in_memory = spa.prune(str(src), ratio=0.5)  # no output: the result holds every weight
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in in_memory.model.graph.initializer)
    np.testing.assert_array_equal(ort_backend.run(in_memory.model, feeds)["y"],
                                  ort_backend.run(str(tmp_path / "eager.onnx"), feeds)["y"])
    assert {p.name: p.read_bytes() for p in src.parent.iterdir()} == before


def test_save_is_atomic_and_never_writes_the_input(tmp_path):
    model = _cnn()
    path = spa.save(model.proto, tmp_path / "m.onnx")
    before = path.read_bytes()
    with pytest.raises(SpaError, match="it is the input model"):
        spa.save(model.proto, tmp_path / "." / "m.onnx", source=path)
    assert path.read_bytes() == before
    with pytest.raises(SpaError, match="does not exist"):
        spa.save(model.proto, tmp_path / "nope" / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_shapes_onnx_cannot_infer_come_from_running_the_model(tmp_path):
    """x -> Conv(6) -> Shape/Slice/Concat(sizes) -> Resize -> Reshape -> Gemm

    ONNX leaves Resize's output dims unknown (computed sizes); the fallbacks (the sizes folded at
    two batch sizes, else running the model twice) give the static channel count, so the conv
    channels stay prunable."""
    nodes = [
        node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
        node("Shape", ["c"], ["s"]),
        node("Slice", ["s", "zero", "two"], ["nc"]),
        node("Concat", ["nc", "hw"], ["sizes"], axis=0),
        node("Resize", ["c", "", "", "sizes"], ["r"], mode="nearest"),
        node("Reshape", ["r", "flat"], ["f"]),
        node("Gemm", ["f", "fc", "fb"], ["y"], transB=1),
    ]
    inits = [weight("w", 6, 3, 3, 3), weight("b", 6), const("zero", [0]), const("two", [2]), const("hw", [4, 4]),
             const("flat", [-1, 96]), weight("fc", 5, 96), weight("fb", 5)]
    model = build(nodes, {"x": [None, 3, 8, 8]}, {"y": [None, 5]}, inits)
    assert model.shapes["r"][1] == 6 and "r" not in model.unknown
    analysis = spa.analyze(model)
    group = analysis.group("w:0")
    assert group.prunable and group.size == 6
    assert {(m.tensor, m.axis) for m in group.members} >= {("w", 0), ("b", 0), ("fc", 1)}
    pruned = api.prune(analysis, {"w:0": [0, 5]})
    assert ort_backend.run(pruned, ort_backend.random_feeds(model.proto, dynamic=3))["y"].shape == (3, 5)
    flat = next(t for t in pruned.graph.initializer if t.name == "flat")
    assert onnx.numpy_helper.to_array(flat).tolist() == [-1, 64]


def test_checks_keep_the_sessions_of_small_models(tmp_path, monkeypatch):
    """The checks run an input and its result in turn: light sessions of small files are kept
    (each built once, a renamed result keeps its own), over HOLD_BYTES only the last one."""
    from spa.core import runtime

    built = []
    real = runtime._session
    monkeypatch.setattr(runtime, "_session", lambda *a: built.append(a[0]) or real(*a))
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_cnn().proto, a)
    onnx.save(_cnn().proto, b)
    try:
        for path in (a, b, a, b):
            runtime.session(path, light=True)
        assert built == [a, b]
        b.rename(tmp_path / "c.onnx")
        runtime.session(tmp_path / "c.onnx", light=True)
        assert len(built) == 2
        monkeypatch.setattr(runtime, "HOLD_BYTES", os.path.getsize(a))  # room for one model only
        runtime.release()
        for path in (a, tmp_path / "c.onnx", a):
            runtime.session(path, light=True)
        assert len(built) == 5 and len(runtime._HELD) == 1
    finally:
        runtime.release()
    assert not runtime._HELD


def test_public_api_round_trip(tmp_path):
    """The README's Python API: load -> analyze -> make_plan -> prune -> save."""
    model = _cnn()
    analysis = spa.analyze(model)
    plan = spa.make_plan(analysis, 0.5, criterion="l2")
    assert plan == {"w1:0": plan["w1:0"]} and len(plan["w1:0"]) == 4
    out = spa.load(spa.save(spa.prune(analysis, plan), tmp_path / "p.onnx"))
    assert out.shapes["w1"] == (4, 3, 3, 3) and out.shapes["w2"] == (4, 4, 3, 3)


def test_write_atomic(tmp_path):
    """Engines, bench JSON, reports and plans: whole or not at all, with the usual permissions."""
    target = tmp_path / "m.engine"
    spa.core.model.write_atomic(target, b"plan")
    assert target.read_bytes() == b"plan" and sorted(p.name for p in tmp_path.iterdir()) == ["m.engine"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    with pytest.raises(SpaError, match="cannot write"):
        spa.core.model.write_atomic(tmp_path / "missing" / "m.engine", b"plan")
