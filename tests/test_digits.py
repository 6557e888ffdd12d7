"""Digits classifiers (models/digits.py): trained here on sklearn's digits, exported with both exporters,
accurate under onnxruntime, numerically equal to torch, batch-dynamic, and prunable by spa."""

from __future__ import annotations

import numpy as np
import pytest

import spa
from spa.core.blocks import attention_blocks
from tests.conftest import ZOO_EXPORTERS

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
ort = pytest.importorskip("onnxruntime")
from models import digits

MIN_ACCURACY = {"cnn": 0.95, "vit": 0.90}
CASES = [(n, e) for n in digits.MODELS for e in ZOO_EXPORTERS]


@pytest.fixture(scope="module")
def data():
    return digits.load_data()


@pytest.fixture(scope="module")
def trained(data):
    """{name: (model, torch test accuracy)}, each model trained once."""
    return {name: digits.train(name, data=data) for name in digits.MODELS}


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return {(n, e): digits.export(n, digits.output_path(out, n, e), e, model=trained[n][0]) for n, e in CASES}


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run([digits.OUTPUT], {digits.INPUT: x})[0]


def _torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_data_split(data):
    assert data["x_train"].shape == (1347, 1, 8, 8) and data["x_test"].shape == (450, 1, 8, 8)
    assert data["x_train"].dtype == np.float32 and data["y_test"].dtype == np.int64
    assert 0.0 <= data["x_test"].min() and data["x_test"].max() <= 1.0
    assert set(np.unique(data["y_test"])) == set(range(digits.CLASSES))
    again = digits.load_data()
    assert all(np.array_equal(data[k], again[k]) for k in data)  # the split is fixed


@pytest.mark.parametrize("name", list(digits.MODELS))
def test_torch_accuracy(trained, name):
    assert trained[name][1] >= MIN_ACCURACY[name]


@pytest.mark.parametrize("name,exporter", CASES)
def test_ort_accuracy_and_logits(exported, trained, data, name, exporter):
    model, torch_acc = trained[name]
    x, y = data["x_test"], data["y_test"]
    logits = _run(exported[(name, exporter)], x)
    assert logits.shape == (len(x), digits.CLASSES)
    acc = float((logits.argmax(1) == y).mean())
    assert acc >= MIN_ACCURACY[name]
    assert abs(acc - torch_acc) <= 0.005
    assert acc == digits.ort_accuracy(exported[(name, exporter)], x, y)
    np.testing.assert_allclose(logits, _torch_logits(model, x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name,exporter", CASES)
def test_dynamic_batch(exported, trained, data, name, exporter):
    path = exported[(name, exporter)]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.name == digits.INPUT and out.name == digits.OUTPUT
    assert not isinstance(inp.shape[0], int) and list(inp.shape[1:]) == [1, 8, 8]
    for batch in (1, 7):
        x = data["x_test"][:batch]
        logits = sess.run(None, {digits.INPUT: x})[0]
        assert logits.shape == (batch, digits.CLASSES)
        np.testing.assert_allclose(logits, _torch_logits(trained[name][0], x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("split", ["test", "train"])
def test_npz_roundtrip(tmp_path, data, split):
    path = digits.save_npz(tmp_path / f"digits_{split}.npz", split)
    with np.load(path) as npz:
        assert set(npz.files) == {"x", "labels"}
        np.testing.assert_array_equal(npz["x"], data[f"x_{split}"])
        np.testing.assert_array_equal(npz["labels"], data[f"y_{split}"])
        assert npz["x"].dtype == np.float32 and npz["labels"].dtype == np.int64


@pytest.mark.parametrize("name,exporter", CASES)
def test_prunable_by_spa(exported, name, exporter):
    analysis = spa.analyze(spa.load(exported[(name, exporter)]))
    assert any(g.prunable for g in analysis.groups)
    if name == "vit":
        blocks = attention_blocks(analysis)
        assert len(blocks) == digits.DEPTH
        assert blocks[0].heads.groups and blocks[0].heads.before == digits.HEADS


def test_cli(tmp_path, monkeypatch, capsys, trained):
    """The command line writes both npz splits and one file per model, and ORT agrees with torch."""
    monkeypatch.setattr(digits, "train", lambda name, seed=0, data=None: trained[name])  # reuse, don't retrain
    assert digits.main([str(tmp_path), "--exporter", "torchscript"]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"digits_test.npz", "digits_train.npz", "digits_cnn.torchscript.onnx",
                     "digits_vit.torchscript.onnx"}
    assert "MISMATCH" not in capsys.readouterr().out
