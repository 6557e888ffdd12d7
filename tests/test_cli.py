"""The `spa` command line: exit codes, one-line errors, untouched inputs, the JSON contracts.

Most cases call `spa.cli.app([...])` in-process (capsys) for speed; a few run the real
console script in a subprocess to prove the exit codes and that stderr has no traceback.

Every bad input must give (DESIGN.md "Contracts", oracle 4):

    exit 1 ── exactly one stderr line starting with `error:` (the last line; progress
              lines before it are fine), no traceback unless -v
           ── no output file, no `.spa-tmp-*` leftovers, the input files byte-identical
              with the same mtime
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa.cli import app as cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_resnet.onnx"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# ---------------------------------------------------------------- helpers


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.startswith("error:")]


def spa(capsys, *args) -> Result:
    """Run the CLI in-process; argparse's SystemExit becomes the exit code."""
    capsys.readouterr()
    try:
        rc = cli.main([str(a) for a in args])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    cap = capsys.readouterr()
    return Result(rc, cap.out, cap.err)


def spa_exe() -> str:
    beside = Path(sys.executable).with_name("spa")
    return str(beside) if beside.exists() else (shutil.which("spa") or pytest.skip("no `spa` console script"))


def spa_proc(*args, cwd=None, env=None) -> Result:
    """Run the real console script."""
    p = subprocess.run([spa_exe(), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=120, check=False)
    return Result(p.returncode, p.stdout, p.stderr)


def snapshot(folder: Path) -> dict:
    """{relative path: (bytes, mtime_ns)} of every file under `folder` (hidden ones too)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink() and p.exists()}


def assert_clean_error(res: Result, verbose: bool = False, code: int = 1) -> str:
    """exit `code` (1: a refusal; 2: a bad option value), one `error:` line (the last one),
    traceback only with -v. Returns the line."""
    assert res.rc == code, res
    assert len(res.error_lines) == 1, res.err
    assert res.err.strip().splitlines()[-1] == res.error_lines[0], res.err
    assert ("Traceback" in res.err) == verbose, res.err
    return res.error_lines[0]


def assert_untouched(folder: Path, before: dict) -> None:
    """Nothing written, nothing left behind, nothing changed (bytes and mtime)."""
    after = snapshot(folder)
    assert not [p for p in after if ".spa-tmp-" in p], after.keys()
    assert sorted(after) == sorted(before)
    for name, (data, mtime) in before.items():
        assert after[name][0] == data, f"{name} changed"
        assert after[name][1] == mtime, f"{name} touched (mtime)"


def runs_like(src: Path, out: Path, exact: bool = False) -> None:
    """`out` passes the full ONNX check and runs in ORT with the same I/O names, dtypes, shapes."""
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in a.get_inputs()] == [i.name for i in b.get_inputs()]
    assert [o.name for o in a.get_outputs()] == [o.name for o in b.get_outputs()]
    rng = np.random.default_rng(0)
    feeds = {}
    for i in a.get_inputs():
        dtype = np.float16 if i.type == "tensor(float16)" else np.float32
        feeds[i.name] = rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(dtype)
    for ra, rb in zip(a.run(None, feeds), b.run(None, feeds)):
        assert ra.shape == rb.shape and ra.dtype == rb.dtype
        assert np.isfinite(rb.astype(np.float64)).all()
        if exact:
            np.testing.assert_array_equal(ra, rb)


def init_shapes(path: Path) -> dict[str, tuple]:
    return {t.name: tuple(t.dims) for t in onnx.load(str(path)).graph.initializer}


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder holding m.onnx (a copy of the bundled example); the cwd during the test."""
    shutil.copy(EXAMPLE, tmp_path / "m.onnx")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------- tiny models built in code

_RNG = np.random.default_rng(1234)


def _w(name, *shape, dtype=np.float32):
    return numpy_helper.from_array((_RNG.standard_normal(shape) + 0.1).astype(dtype), name)


def _conv(x, y, name, cin, cout, dtype=np.float32, weight=None):
    """x -> Conv(name.w, name.b) -> y (3x3, same padding)."""
    w = weight or f"{name}.w"
    node = helper.make_node("Conv", [x, w, f"{name}.b"], [y], name=name, kernel_shape=[3, 3], pads=[1] * 4)
    inits = [_w(f"{name}.b", cout, dtype=dtype)] + ([] if weight else [_w(w, cout, cin, 3, 3, dtype=dtype)])
    return [node], inits


def _save(path: Path, nodes, inits, inputs, outputs, elem=TensorProto.FLOAT, opsets=(), value_info=()):
    """inputs/outputs: {name: shape}."""
    def vi(name, shape):
        return helper.make_tensor_value_info(name, elem, shape)

    graph = helper.make_graph(nodes, "g", [vi(n, s) for n, s in inputs.items()],
                              [vi(n, s) for n, s in outputs.items()], inits,
                              value_info=[vi(n, s) for n, s in dict(value_info).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *opsets])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def chain(path: Path, dtype=np.float32, elem=TensorProto.FLOAT) -> Path:
    """x[1,3,8,8] -> Conv c1(8) -> Relu -> Conv c2(8) -> Relu -> Conv c3(4) -> y"""
    n1, i1 = _conv("x", "a", "c1", 3, 8, dtype)
    n2, i2 = _conv("ar", "b", "c2", 8, 8, dtype)
    n3, i3 = _conv("br", "y", "c3", 8, 4, dtype)
    relus = [helper.make_node("Relu", ["a"], ["ar"], name="r1"), helper.make_node("Relu", ["b"], ["br"], name="r2")]
    return _save(path, n1 + relus[:1] + n2 + relus[1:] + n3, i1 + i2 + i3, {"x": [1, 3, 8, 8]}, {"y": [1, 4, 8, 8]},
                 elem=elem)


def custom_op_model(path: Path, with_value_info: bool) -> Path:
    """x -> Conv c1(8) -> com.example.Foo -> Conv c2(8) -> Relu -> Conv c3(4) -> y

    Channels crossing Foo (c1 out, c2 in) must stay; c2 out / c3 in is free to prune."""
    n1, i1 = _conv("x", "a", "c1", 3, 8)
    foo = helper.make_node("Foo", ["a"], ["b"], name="foo", domain="com.example")
    n2, i2 = _conv("b", "c", "c2", 8, 8)
    relu = helper.make_node("Relu", ["c"], ["cr"], name="r2")
    n3, i3 = _conv("cr", "y", "c3", 8, 4)
    return _save(path, n1 + [foo] + n2 + [relu] + n3, i1 + i2 + i3, {"x": [1, 3, 8, 8]}, {"y": [1, 4, 8, 8]},
                 opsets=[helper.make_opsetid("com.example", 1)],
                 value_info={"b": [1, 8, 8, 8]} if with_value_info else {})


def weight_input_model(path: Path, layout: str) -> Path:
    """two:      x, w (graph inputs) -> Conv c1(w, c1.b) -> Conv c2 (initializers) -> y
    with-bias: x, w (graph inputs) -> Conv c1(w, c1.b) -> y
    no-bias:   x, w (graph inputs) -> Conv c1(w) -> y            (no initializer at all)"""
    inputs = {"x": [1, 3, 8, 8], "w": [8, 3, 3, 3]}
    if layout == "no-bias":
        conv = helper.make_node("Conv", ["x", "w"], ["y"], name="c1", kernel_shape=[3, 3], pads=[1] * 4)
        return _save(path, [conv], [], inputs, {"y": [1, 8, 8, 8]})
    n1, i1 = _conv("x", "y" if layout == "with-bias" else "a", "c1", 3, 8, weight="w")
    if layout == "with-bias":
        return _save(path, n1, i1, inputs, {"y": [1, 8, 8, 8]})
    n2, i2 = _conv("a", "y", "c2", 8, 4)
    return _save(path, n1 + n2, i1 + i2, inputs, {"y": [1, 4, 8, 8]})


def qdq_model(path: Path, kind: str) -> Path:
    """activation QDQ:  x -> QuantizeLinear -> DequantizeLinear -> Conv c1 -> Conv c2 -> y
    weight-only:     c1.w(int8) -> DequantizeLinear -> Conv c1 -> Conv c2 -> y"""
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    if kind == "activation":
        zp = numpy_helper.from_array(np.array(0, np.uint8), "z")
        q = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq")]
        n1, i1 = _conv("xd", "a", "c1", 3, 8)
        extra = [scale, zp]
    else:
        wq = numpy_helper.from_array(_RNG.integers(-100, 100, (8, 3, 3, 3)).astype(np.int8), "c1.wq")
        zp = numpy_helper.from_array(np.array(0, np.int8), "z")
        q = [helper.make_node("DequantizeLinear", ["c1.wq", "s", "z"], ["c1.w"], name="dq_w")]
        n1, i1 = _conv("x", "a", "c1", 3, 8, weight="c1.w")
        extra = [scale, zp, wq]
    n2, i2 = _conv("a", "y", "c2", 8, 4)
    return _save(path, q + n1 + n2, i1 + i2 + extra, {"x": [1, 3, 8, 8]}, {"y": [1, 4, 8, 8]})


def external_model(folder: Path, location: str | None = None) -> Path:
    """tiny_resnet saved with external data (`<name>.data` beside it), optionally relocated."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ext.onnx"
    onnx.save_model(onnx.load(str(EXAMPLE)), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    if location is not None:
        model = onnx.load(str(path), load_external_data=False)
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------- bad model files

def _file(path: Path, data: bytes | None) -> Path:
    """Write `data` to `path` (None: make `path` a directory)."""
    if data is None:
        path.mkdir()
    else:
        path.write_bytes(data)
    return path


BAD_FILES = {
    "missing": lambda d: d / "nope.onnx",
    "directory": lambda d: _file(d / "adir", None),
    "text": lambda d: _file(d / "t.onnx", b"hello, I am not a model\n"),
    "random-bytes": lambda d: _file(d / "r.onnx", np.random.default_rng(0).bytes(4096)),
    "truncated": lambda d: _file(d / "h.onnx", EXAMPLE.read_bytes()[: EXAMPLE.stat().st_size // 2]),
    "empty": lambda d: _file(d / "e.onnx", b""),
}


@pytest.mark.parametrize("command", ["prune", "analyze"])
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_model_file(capsys, work, case, command):
    bad = BAD_FILES[case](work)
    before = snapshot(work)
    args = [command, bad] + (["--ratio", "0.5", "-o", work / "out.onnx"] if command == "prune" else [])
    line = assert_clean_error(spa(capsys, *args))
    assert str(bad.name) in line
    assert_untouched(work, before)


def test_verbose_shows_traceback(capsys, work):
    before = snapshot(work)
    res = spa(capsys, "prune", "m.onnx", "--ratio", "0.5", "-o", "nodir/out.onnx", "-v")
    assert_clean_error(res, verbose=True)
    res = spa(capsys, "analyze", "nope.onnx", "-v")
    assert_clean_error(res, verbose=True)
    assert_untouched(work, before)


# ---------------------------------------------------------------- bad options


@pytest.mark.parametrize("ratio", ["-0.1", "1.0", "1.5", "nan", "inf", "-inf"])
def test_ratio_outside_range(capsys, work, ratio):
    before = snapshot(work)
    line = assert_clean_error(spa(capsys, "prune", "m.onnx", f"--ratio={ratio}", "-o", "out.onnx"), code=2)
    assert "[0, 1)" in line
    assert_untouched(work, before)


def test_max_group_ratio_outside_range(capsys, work):
    before = snapshot(work)
    line = assert_clean_error(spa(capsys, "prune", "m.onnx", "--global", "--ratio", "0.5", "--max-group-ratio", "1.5",
                                  "-o", "out.onnx"), code=2)
    assert "max-group-ratio" in line
    assert_untouched(work, before)


@pytest.mark.parametrize("n", ["0", "-8"])
def test_round_to_must_be_positive(capsys, work, n):
    before = snapshot(work)
    line = assert_clean_error(spa(capsys, "prune", "m.onnx", "--ratio", "0.5", f"--round-to={n}", "-o", "out.onnx"), code=2)
    assert "round-to" in line
    assert_untouched(work, before)


@pytest.mark.parametrize("argv, what", [
    (["prune", "m.onnx", "--ratio", "0.5", "--criterion", "magic"], "invalid choice"),
    ([], "required"),
    (["prune", "m.onnx", "--ratio", "0.5", "--plan", "p.json"], "not allowed"),
    (["prune", "m.onnx", "--ratio", "half"], "invalid float"),
    (["frobnicate", "m.onnx"], "invalid choice"),
])
def test_usage_errors_exit_2(capsys, work, argv, what):
    before = snapshot(work)
    res = spa(capsys, *argv)
    assert res.rc == 2, res
    assert what in res.err and "usage:" in res.err and "Traceback" not in res.err
    assert res.out == ""
    assert_untouched(work, before)


# ---------------------------------------------------------------- output paths


@pytest.mark.parametrize("where", ["missing-folder", "existing-directory"])
def test_unwritable_output(capsys, work, where):
    (work / "adir").mkdir()
    out = work / "nodir" / "deeper" / "out.onnx" if where == "missing-folder" else work / "adir"
    before = snapshot(work)
    assert_clean_error(spa(capsys, "prune", "m.onnx", "--ratio", "0.5", "-o", out))
    assert not (work / "nodir").exists()
    assert_untouched(work, before)


@pytest.mark.skipif(IS_ROOT, reason="root ignores folder permissions")
def test_output_folder_without_write_permission(capsys, work):
    ro = work / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        before = snapshot(work)
        line = assert_clean_error(spa(capsys, "prune", "m.onnx", "--ratio", "0.5", "-o", ro / "out.onnx"))
        assert "permission" in line
        assert_untouched(work, before)
    finally:
        ro.chmod(0o755)


SAME_AS_INPUT = {
    "same-string": lambda d: "m.onnx",
    "dot-slash": lambda d: "./m.onnx",
    "absolute": lambda d: str(d / "m.onnx"),
    "dotdot": lambda d: (d / "sub").mkdir() or "sub/../m.onnx",
    "symlink": lambda d: (d / "link.onnx").symlink_to(d / "m.onnx") or "link.onnx",
}


@pytest.mark.parametrize("spelling", sorted(SAME_AS_INPUT))
def test_output_is_the_input(capsys, work, spelling):
    out = SAME_AS_INPUT[spelling](work)
    before = snapshot(work)
    line = assert_clean_error(spa(capsys, "prune", "m.onnx", "--ratio", "0.5", "-o", out))
    assert "input" in line
    assert_untouched(work, before)


def test_save_plan_onto_the_input_is_refused(capsys, work):
    before = snapshot(work)
    assert_clean_error(spa(capsys, "prune", "m.onnx", "--ratio", "0.5", "--save-plan", "m.onnx", "-o", "out.onnx"))
    assert_untouched(work, before)


def test_save_plan_into_missing_folder(capsys, work):
    before = snapshot(work)
    line = assert_clean_error(spa(capsys, "prune", "m.onnx", "--ratio", "0.5", "--save-plan", "nodir/p.json",
                                  "-o", "out.onnx"))
    assert "nodir" in line
    assert_untouched(work, before)


def test_save_plan_and_output_same_file_is_refused(capsys, work):
    before = snapshot(work)
    assert_clean_error(spa(capsys, "prune", "m.onnx", "--ratio", "0.5", "--save-plan", "same.onnx", "-o", "same.onnx"), code=2)
    assert_untouched(work, before)


def test_output_onto_the_inputs_external_data_is_refused(capsys, tmp_path):
    path = external_model(tmp_path / "sub")
    before = snapshot(tmp_path)
    assert_clean_error(spa(capsys, "prune", path, "--ratio", "0.5", "-o", path.with_name("ext.onnx.data")))
    assert_untouched(tmp_path, before)


# ---------------------------------------------------------------- models spa cannot (fully) prune


@pytest.mark.parametrize("layout", ["two", "with-bias"])
def test_weight_as_graph_input_nothing_to_prune(capsys, tmp_path, layout):
    path = weight_input_model(tmp_path / "w.onnx", layout)
    before = snapshot(tmp_path)
    line = assert_clean_error(spa(capsys, "prune", path, "--ratio", "0.5", "-o", tmp_path / "out.onnx"))
    assert "nothing to prune" in line
    reason = line.split("nothing to prune", 1)[1]
    assert ":" in reason and len(reason.split(":", 1)[1].strip()) > 10, line
    assert_untouched(tmp_path, before)


@pytest.mark.parametrize("command", ["prune", "analyze"])
def test_weight_as_graph_input_no_initializers(capsys, tmp_path, command):
    path = weight_input_model(tmp_path / "w.onnx", "no-bias")
    before = snapshot(tmp_path)
    if command == "analyze":
        res = spa(capsys, "analyze", path, "--json")
        assert res.rc == 0, res.err
        assert not any(g["prunable"] for g in json.loads(res.out)["groups"])
        return
    line = assert_clean_error(spa(capsys, "prune", path, "--ratio", "0.5", "-o", tmp_path / "out.onnx"))
    assert "nothing to prune" in line and "internal error" not in line
    assert_untouched(tmp_path, before)


def test_custom_op_is_worked_around(capsys, tmp_path):
    path = custom_op_model(tmp_path / "custom.onnx", with_value_info=True)
    out = tmp_path / "out.onnx"
    res = spa(capsys, "prune", path, "--ratio", "0.5", "-o", out, "--json")
    assert res.rc == 0, res.err
    doc = json.loads(res.out)
    assert doc["check"]["status"] == "skipped"  # ORT cannot run com.example.Foo
    old, new = init_shapes(path), init_shapes(out)
    assert new["c1.w"] == old["c1.w"] and new["c1.b"] == old["c1.b"]  # c1 out crosses Foo
    assert new["c2.w"][1] == old["c2.w"][1]  # c2 in crosses Foo
    assert new["c2.w"][0] < old["c2.w"][0] and new["c3.w"][1] == new["c2.w"][0]  # free channels pruned
    assert new["c3.w"][0] == old["c3.w"][0]  # model output
    assert any(n.op_type == "Foo" and n.domain == "com.example" for n in onnx.load(str(out)).graph.node)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_custom_op_without_value_info_is_worked_around(capsys, tmp_path):
    path = custom_op_model(tmp_path / "custom.onnx", with_value_info=False)
    out = tmp_path / "out.onnx"
    res = spa(capsys, "prune", path, "--ratio", "0.5", "-o", out)
    assert res.rc == 0, res.err
    old, new = init_shapes(path), init_shapes(out)
    assert new["c1.w"] == old["c1.w"] and new["c2.w"][1] == old["c2.w"][1]
    assert new["c2.w"][0] < old["c2.w"][0]


@pytest.mark.parametrize("kind", ["activation", "weight-only"])
def test_quantized_model_refused(capsys, tmp_path, kind):
    path = qdq_model(tmp_path / "q.onnx", kind)
    before = snapshot(tmp_path)
    line = assert_clean_error(spa(capsys, "prune", path, "--ratio", "0.5", "-o", tmp_path / "out.onnx"))
    assert "quantized" in line and ("QuantizeLinear" in line or "DequantizeLinear" in line)
    assert_untouched(tmp_path, before)


def test_fp16_model(capsys, tmp_path):
    path = chain(tmp_path / "h.onnx", np.float16, TensorProto.FLOAT16)
    out = tmp_path / "out.onnx"
    res = spa(capsys, "prune", path, "--ratio", "0.5", "-o", out, "--json")
    assert res.rc == 0, res.err
    doc = json.loads(res.out)
    assert doc["check"]["status"] == "ok" and doc["after"]["params"] < doc["before"]["params"]
    assert all(t.data_type == TensorProto.FLOAT16 for t in onnx.load(str(out)).graph.initializer)
    runs_like(path, out)


# ---------------------------------------------------------------- external data


@pytest.mark.parametrize("location", ["../outside.bin", "ABSOLUTE"])
@pytest.mark.parametrize("command", ["prune", "analyze"])
def test_external_data_escaping_the_folder_is_refused(capsys, tmp_path, location, command):
    outside = tmp_path / "outside.bin"
    location = str(outside) if location == "ABSOLUTE" else location
    path = external_model(tmp_path / "sub", location)
    (tmp_path / "sub" / "ext.onnx.data").rename(outside)
    before = snapshot(tmp_path)
    args = [command, path] + (["--ratio", "0.5", "-o", tmp_path / "sub" / "out.onnx"] if command == "prune" else [])
    line = assert_clean_error(spa(capsys, *args))
    assert "external data" in line and "escapes" in line
    assert_untouched(tmp_path, before)


def test_external_data_missing_file(capsys, tmp_path):
    path = external_model(tmp_path / "sub")
    (tmp_path / "sub" / "ext.onnx.data").unlink()
    before = snapshot(tmp_path)
    assert_clean_error(spa(capsys, "prune", path, "--ratio", "0.5", "-o", tmp_path / "sub" / "out.onnx"))
    assert_untouched(tmp_path, before)


def test_external_data_model_prunes(capsys, tmp_path):
    path = external_model(tmp_path / "sub")
    before = snapshot(tmp_path / "sub")
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    res = spa(capsys, "prune", path, "--ratio", "0.5", "-o", out, "--json")
    assert res.rc == 0, res.err
    assert json.loads(res.out)["after"]["params"] < json.loads(res.out)["before"]["params"]
    assert_untouched(tmp_path / "sub", before)  # neither ext.onnx nor ext.onnx.data changed
    runs_like(EXAMPLE, out)


# ---------------------------------------------------------------- plan files


def _plan(groups, schema=1):
    return {"schema_version": schema, "groups": groups}


PLANS = [  # (id, file content, what the error line must mention)
    ("not-json", "this is { not json", "not valid JSON"),
    ("binary", b"\xff\xfe\x00garbage", "cannot read plan"),
    ("json-list", [1, 2, 3], "not a spa plan"),
    ("schema-2", _plan({}, 2), "not a spa plan"),
    ("schema-missing", {"groups": {}}, "not a spa plan"),
    ("groups-missing", {"schema_version": 1}, "not a spa plan"),
    ("groups-list", {"schema_version": 1, "groups": []}, "not a spa plan"),
    ("entry-not-list", _plan({"onnx::Conv_74:0": "0"}), "list of channel indices"),
    ("entry-floats", _plan({"onnx::Conv_74:0": [1.0]}), "list of channel indices"),
    ("entry-bools", _plan({"onnx::Conv_74:0": [True]}), "list of channel indices"),
    ("unknown-group", _plan({"no-such-group:0": [0]}), "no-such-group:0"),
    ("index-too-big", _plan({"onnx::Conv_74:0": [16]}), "outside"),
    ("index-negative", _plan({"onnx::Conv_74:0": [-1]}), "outside"),
    ("all-channels", _plan({"onnx::Conv_74:0": list(range(16))}), "every channel"),
    ("all-channels-with-duplicates", _plan({"onnx::Conv_74:0": list(range(16)) + [3, 3]}), "every channel"),
    ("unprunable-group", _plan({"onnx::Conv_71:1": [0]}), "not prunable"),
    pytest.param(_plan({}, True), "not a spa plan", id="schema-true"),
]
PLANS = [pytest.param(*p[1:], id=p[0]) if type(p) is tuple else p for p in PLANS]


def _write_plan(path: Path, content) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))


@pytest.mark.parametrize("content, what", PLANS)
def test_bad_plan(capsys, work, content, what):
    _write_plan(work / "p.json", content)
    before = snapshot(work)
    line = assert_clean_error(spa(capsys, "prune", "m.onnx", "--plan", "p.json", "-o", "out.onnx"))
    assert what in line, line
    assert_untouched(work, before)


@pytest.mark.parametrize("case", ["missing", "directory"])
def test_plan_file_unreadable(capsys, work, case):
    if case == "directory":
        (work / "p.json").mkdir()
    before = snapshot(work)
    line = assert_clean_error(spa(capsys, "prune", "m.onnx", "--plan", "p.json", "-o", "out.onnx"))
    assert "p.json" in line
    assert_untouched(work, before)


def test_bad_plan_cases_name_real_groups(capsys, work):
    """The plan cases above name real groups of the example (else they test the wrong thing)."""
    doc = json.loads(spa(capsys, "analyze", "m.onnx", "--json").out)
    groups = {g["id"]: g for g in doc["groups"]}
    assert groups["onnx::Conv_74:0"]["size"] == 16 and groups["onnx::Conv_74:0"]["prunable"]
    assert not groups["onnx::Conv_71:1"]["prunable"]


# ---------------------------------------------------------------- subprocess: the real console script


@pytest.mark.parametrize("argv, rc, traceback", [
    pytest.param(["prune", "nope.onnx", "--ratio", "0.5"], 1, False, id="missing"),
    pytest.param(["prune", "h.onnx", "--ratio", "0.5", "-o", "out.onnx"], 1, False, id="truncated"),
    pytest.param(["prune", "m.onnx", "--ratio", "1.5", "-o", "out.onnx"], 2, False, id="ratio-1.5"),
    pytest.param(["analyze", "h.onnx", "-v"], 1, True, id="verbose"),
    pytest.param(["prune", "m.onnx", "--ratio", "0.5", "--criterion", "magic"], "usage", False, id="bad-criterion"),
    pytest.param([], "usage", False, id="no-subcommand"),
])
def test_console_script_errors(work, argv, rc, traceback):
    BAD_FILES["truncated"](work)
    before = snapshot(work)
    res = spa_proc(*argv, cwd=work)
    assert res.rc == (2 if rc == "usage" else rc), res
    assert ("Traceback" in res.err) == traceback, res.err
    if rc == "usage":  # argparse's own: the usage line
        assert "usage:" in res.err
    else:  # ours: one line, 1 for a refusal, 2 for a bad option value
        assert_clean_error(res, verbose=traceback, code=rc)
    assert res.out == ""
    assert_untouched(work, before)


def test_console_script_prune_json(work):
    res = spa_proc("prune", "m.onnx", "--ratio", "0.5", "-o", "out.onnx", "--json", cwd=work)
    assert res.rc == 0, res.err
    doc = json.loads(res.out)  # stdout is exactly one JSON document
    assert doc["after"]["params"] < doc["before"]["params"]
    assert "Traceback" not in res.err and "error" not in res.err
    runs_like(work / "m.onnx", work / "out.onnx")


def test_group_ids_stable_across_processes(work):
    """Ids must not depend on hash randomisation or set order."""
    docs = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        res = spa_proc("analyze", "m.onnx", "--json", cwd=work, env=env)
        assert res.rc == 0, res.err
        docs.append(json.loads(res.out))
    assert [g["id"] for g in docs[0]["groups"]] == [g["id"] for g in docs[1]["groups"]]
    assert docs[0]["groups"] == docs[1]["groups"]


# ---------------------------------------------------------------- happy paths


def test_analyze_json_contract(capsys, work):
    res = spa(capsys, "analyze", "m.onnx", "--json")
    assert res.rc == 0, res.err
    doc = json.loads(res.out)  # raises on anything besides one JSON document
    assert doc["schema_version"] == 1
    assert isinstance(doc["params"], int) and doc["params"] > 0
    assert isinstance(doc["macs"], int) and doc["macs"] > 0
    proto = onnx.load(str(work / "m.onnx"))
    dims = {t.name: list(t.dims) for t in proto.graph.initializer}
    assert doc["groups"] and any(g["prunable"] for g in doc["groups"])
    ids = [g["id"] for g in doc["groups"]]
    assert len(ids) == len(set(ids))
    for g in doc["groups"]:
        assert {"id", "size", "prunable", "reason", "zero_invariant", "members"} <= set(g)
        assert isinstance(g["id"], str) and isinstance(g["size"], int) and g["size"] > 0
        assert isinstance(g["prunable"], bool) and isinstance(g["zero_invariant"], bool)
        assert (g["reason"] is None) == g["prunable"], g
        assert g["members"]
        for m in g["members"]:
            assert {"tensor", "axis", "indices"} <= set(m)
            assert m["tensor"] in dims, m["tensor"]
            assert 0 <= m["axis"] < len(dims[m["tensor"]])
            assert len(m["indices"]) == g["size"]
            for ix in m["indices"]:
                flat = ix if isinstance(ix, list) else [ix]
                assert flat and all(isinstance(i, int) and 0 <= i < dims[m["tensor"]][m["axis"]] for i in flat)
    again = json.loads(spa(capsys, "analyze", "m.onnx", "--json").out)
    assert [g["id"] for g in again["groups"]] == ids and again == doc


def test_analyze_table(capsys, work):
    res = spa(capsys, "analyze", "m.onnx")
    assert res.rc == 0 and "groups" in res.out and "prunable" in res.out


@pytest.mark.parametrize("criterion", ["l1", "l2", "random", "fpgm"])
def test_save_plan_then_plan_is_byte_identical(capsys, work, criterion):
    r1 = spa(capsys, "prune", "m.onnx", "--ratio", "0.5", "--criterion", criterion, "--save-plan", "p.json", "-o", "a.onnx")
    assert r1.rc == 0, r1.err
    plan = json.loads((work / "p.json").read_text())
    assert plan["schema_version"] == 1 and plan["groups"]
    ids = {g["id"] for g in json.loads(spa(capsys, "analyze", "m.onnx", "--json").out)["groups"]}
    assert set(plan["groups"]) <= ids
    r2 = spa(capsys, "prune", "m.onnx", "--plan", "p.json", "-o", "b.onnx")
    assert r2.rc == 0, r2.err
    assert (work / "a.onnx").read_bytes() == (work / "b.onnx").read_bytes()
    assert not list(work.glob(".spa-tmp-*"))
    runs_like(work / "m.onnx", work / "a.onnx")


def test_prune_json(capsys, work):
    before = snapshot(work)
    res = spa(capsys, "prune", "m.onnx", "--ratio", "0.5", "-o", "out.onnx", "--json")
    assert res.rc == 0, res.err
    doc = json.loads(res.out)
    for key in ("params", "macs", "bytes"):
        assert isinstance(doc["before"][key], int) and isinstance(doc["after"][key], int)
        assert 0 < doc["after"][key] < doc["before"][key], key
    assert doc["before"]["bytes"] == (work / "m.onnx").stat().st_size
    assert doc["after"]["bytes"] == (work / "out.onnx").stat().st_size
    assert doc["channels_removed"] > 0 and doc["check"]["status"] == "ok"
    assert Path(doc["output"]).resolve() == (work / "out.onnx").resolve()
    assert_untouched(work, {**before, "out.onnx": snapshot(work)["out.onnx"]})
    runs_like(work / "m.onnx", work / "out.onnx")


def test_no_check(capsys, work):
    res = spa(capsys, "prune", "m.onnx", "--ratio", "0.5", "-o", "out.onnx", "--json", "--no-check")
    assert res.rc == 0, res.err
    assert json.loads(res.out)["check"] == {"status": "not run", "reason": "--no-check"}
    runs_like(work / "m.onnx", work / "out.onnx")


def _kept(capsys, work, *extra):
    """{group id: (size, kept)} of the groups a `--ratio 0.3` plan prunes, plus the output path."""
    res = spa(capsys, "prune", "m.onnx", "--ratio", "0.3", *extra, "--save-plan", "p.json", "-o", "out.onnx")
    assert res.rc == 0, res.err
    plan = json.loads((work / "p.json").read_text())["groups"]
    groups = {g["id"]: g for g in json.loads(spa(capsys, "analyze", "m.onnx", "--json").out)["groups"]}
    return {gid: (groups[gid]["size"], groups[gid]["size"] - len(drop)) for gid, drop in plan.items()}, groups, plan


def test_round_to(capsys, work):
    plain, _, _ = _kept(capsys, work)
    assert any(kept % 8 for _, kept in plain.values()), "control: ratio 0.3 should give counts that are not x8"
    kept, groups, plan = _kept(capsys, work, "--round-to", "8")
    assert kept, "something is still pruned"
    for gid, (size, k) in kept.items():
        assert k % 8 == 0, (gid, size, k)
    new = init_shapes(work / "out.onnx")  # the output really has those channel counts
    for gid, drop in plan.items():
        for m in groups[gid]["members"]:
            keep = [ix for c, ix in enumerate(m["indices"]) if c not in set(drop)]
            assert new[m["tensor"]][m["axis"]] == sum(len(np.atleast_1d(ix)) for ix in keep)
    runs_like(work / "m.onnx", work / "out.onnx")


@pytest.mark.parametrize("pattern", ["/1/body/body.0/body.0.0/Conv", "/1/body/body.0/*", "onnx::Conv_74"])
def test_exclude(capsys, work, pattern):
    protected = {"onnx::Conv_74", "onnx::Conv_75"}  # weight and bias of the excluded Conv
    res = spa(capsys, "prune", "m.onnx", "--ratio", "0.5", "--exclude", pattern, "--save-plan", "p.json",
              "-o", "out.onnx", "--json")
    assert res.rc == 0, res.err
    assert json.loads(res.out)["channels_removed"] > 0
    plan = json.loads((work / "p.json").read_text())["groups"]
    doc = json.loads(spa(capsys, "analyze", "m.onnx", "--json", "--exclude", pattern).out)
    groups = {g["id"]: g for g in doc["groups"]}
    for gid, drop in plan.items():
        if drop:
            assert not protected & {m["tensor"] for m in groups[gid]["members"]}, gid
    old, new = init_shapes(work / "m.onnx"), init_shapes(work / "out.onnx")
    for name in protected:
        assert new[name] == old[name], name
    runs_like(work / "m.onnx", work / "out.onnx")


def test_global(capsys, work):
    res = spa(capsys, "prune", "m.onnx", "--ratio", "0.5", "--global", "--save-plan", "p.json", "-o", "out.onnx",
              "--json")
    assert res.rc == 0, res.err
    doc = json.loads(res.out)
    assert doc["global"] is True and doc["after"]["params"] < doc["before"]["params"]
    plan = json.loads((work / "p.json").read_text())["groups"]
    groups = {g["id"]: g for g in json.loads(spa(capsys, "analyze", "m.onnx", "--json").out)["groups"]}
    total = sum(g["size"] for g in groups.values() if g["prunable"])
    removed = sum(len(d) for d in plan.values())
    assert 0 < removed <= math.ceil(total * 0.5)
    for gid, drop in plan.items():
        assert len(drop) <= int(groups[gid]["size"] * 0.9)  # --max-group-ratio default
    runs_like(work / "m.onnx", work / "out.onnx")


def test_ratio_zero_is_identity(capsys, work):
    res = spa(capsys, "prune", "m.onnx", "--ratio", "0", "-o", "out.onnx", "--json")
    assert res.rc == 0, res.err
    doc = json.loads(res.out)
    assert doc["channels_removed"] == 0 and doc["after"]["params"] == doc["before"]["params"]
    runs_like(work / "m.onnx", work / "out.onnx", exact=True)


def test_default_output_path(capsys, work):
    res = spa(capsys, "prune", "m.onnx", "--ratio", "0.5", "--json")
    assert res.rc == 0, res.err
    assert (work / "m.pruned.onnx").is_file()
    assert Path(json.loads(res.out)["output"]).resolve() == (work / "m.pruned.onnx").resolve()
    assert sorted(p.name for p in work.iterdir()) == ["m.onnx", "m.pruned.onnx"]
    runs_like(work / "m.onnx", work / "m.pruned.onnx")


def test_default_output_path_beside_input_in_another_folder(capsys, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "cwd").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "models" / "net.onnx")
    monkeypatch.chdir(tmp_path / "cwd")
    res = spa(capsys, "prune", "../models/net.onnx", "--ratio", "0.5")
    assert res.rc == 0, res.err
    assert (tmp_path / "models" / "net.pruned.onnx").is_file()
    assert not list((tmp_path / "cwd").iterdir())


def test_existing_output_is_replaced(capsys, work):
    (work / "out.onnx").write_text("old")
    res = spa(capsys, "prune", "m.onnx", "--ratio", "0.5", "-o", "out.onnx")
    assert res.rc == 0, res.err
    runs_like(work / "m.onnx", work / "out.onnx")
    assert not list(work.glob(".spa-tmp-*"))


def test_a_killed_runs_leftovers_are_swept(capsys, work):
    """SIGKILL (the OOM killer) runs no handler: the next save into that folder removes the temp
    files of runs that no longer exist, and leaves those of a run still going."""
    import os

    dead, alive = work / ".spa-tmp-999999999-abc", work / f".spa-tmp-{os.getpid()}-xyz"
    dead.mkdir()
    (dead / "out.onnx.data").write_bytes(b"x" * 100)
    (work / ".spa-tmp-999999999-file").write_bytes(b"y")
    alive.mkdir()
    res = spa(capsys, "prune", "m.onnx", "--ratio", "0.5", "-o", "out.onnx")
    assert res.rc == 0, res.err
    assert not dead.exists() and not (work / ".spa-tmp-999999999-file").exists() and alive.exists()
