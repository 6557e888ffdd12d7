"""`spa eval` and spa.evaluate: top-1 accuracy and fidelity on .npz data (tiny graphs built here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import numpy_helper

import spa
from spa.cli.app import main
from tests.graphs import build, node


def _classifier(scale: float = 1.0):
    """x[N,4] -> MatMul W[4,3] (scale * the first three unit vectors) -> logits: class = argmax x[:, :3]."""
    w = numpy_helper.from_array((scale * np.eye(4, 3)).astype(np.float32), "W")
    return build([node("MatMul", ["x", "W"], ["logits"])], {"x": [None, 4]}, {"logits": [None, 3]}, [w]).proto


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 4)).astype(np.float32)
    y = np.argmax(x[:, :3], axis=1)
    model, other = tmp_path / "m.onnx", tmp_path / "m2.onnx"
    spa.save(_classifier(), model)
    spa.save(_classifier(2.0), other)
    data = tmp_path / "d.npz"
    np.savez(data, x=x, labels=y)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=x, labels=(y + 1) % 3)
    return {"model": model, "other": other, "data": data, "wrong": wrong, "x": x, "y": y, "dir": tmp_path}


def test_api_accuracy_and_fidelity(files):
    doc = spa.evaluate(str(files["model"]), {"x": files["x"]}, files["y"], reference=str(files["other"]),
                       batch_size=7)
    assert doc["samples"] == 50 and doc["accuracy"] == 1.0 and doc["scored_output"] == "logits"
    f = doc["fidelity"]["logits"]
    assert f["cosine"] == pytest.approx(1.0) and f["rel_err"] == pytest.approx(0.5)  # x vs 2x, relative to 2x
    batches = [{"x": files["x"][i:i + 10]} for i in range(0, 50, 10)]  # any iterable of feeds
    assert spa.evaluate(str(files["model"]), batches, (files["y"] + 1) % 3)["accuracy"] == 0.0


def test_cli_eval(files, capsys):
    assert main(["eval", str(files["model"]), "--data", str(files["data"]), "--labels", "labels",
                 "--reference", str(files["other"]), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["accuracy"] == 1.0 and doc["schema_version"] == 1 and doc["fidelity"]["logits"]["cosine"] > 0.999
    assert main(["eval", str(files["model"]), "--data", str(files["wrong"]), "--labels", "labels"]) == 0
    assert "top-1 accuracy 0.00%" in capsys.readouterr().out


@pytest.mark.parametrize("case,message", [
    ("no_file", "no such file"),
    ("not_npz", "not a valid .npz"),
    ("missing_input", "no array for model input(s) ['x']"),
    ("missing_labels", "no labels key 'y'"),
    ("lengths", "disagree on the number of samples"),
    ("bad_output", "no output 'nope'"),
    ("bad_model", "in ONNX Runtime"),
])
def test_cli_eval_errors(files, capsys, case, message):
    d = files["dir"]
    args = ["eval", str(files["model"]), "--data", str(files["data"]), "--labels", "labels"]
    if case == "no_file":
        args[3] = str(d / "absent.npz")
    elif case == "not_npz":
        (d / "bad.npz").write_text("nope")
        args[3] = str(d / "bad.npz")
    elif case == "missing_input":
        np.savez(d / "other.npz", z=files["x"], labels=files["y"])
        args[3] = str(d / "other.npz")
    elif case == "missing_labels":
        args[5] = "y"
    elif case == "lengths":
        np.savez(d / "short.npz", x=files["x"], labels=files["y"][:10])
        args[3] = str(d / "short.npz")
    elif case == "bad_model":
        (d / "junk.onnx").write_bytes(b"not a model")
        args[1] = str(d / "junk.onnx")
    else:
        args += ["--output", "nope"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_calibration_batches_stop_at_max_samples():
    from spa.core.data import calibration_batches

    feeds = {"x": np.arange(10)[:, None], "rate": np.array(16000)}
    got = calibration_batches(feeds, 3, max_samples=4)
    assert [b["x"].ravel().tolist() for b in got] == [[0, 1, 2], [3]]
    assert all(b["rate"] == 16000 for b in got)
