"""spa compress: prune -> sparsify -> quantize as one verified pipeline (spa/api/compress.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from spa.backends import ort as ort_backend
from spa.passes import sparsify as sp

import spa
from spa.cli.app import main
from tests.conftest import CORPUS, corpus_params
from tests.test_sparsify import _conv_net


@pytest.fixture
def net(tmp_path):
    proto, x = _conv_net()
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=x[:64])
    labels = np.argmax(ort_backend.run(proto, {"x": x[64:]})["y"], axis=1)  # the dense model's own classes
    np.savez(tmp_path / "eval.npz", x=x[64:], labels=labels)
    return tmp_path


def test_three_stages_each_measured_and_the_result_holds_them(net, capsys):
    out = net / "c.onnx"
    assert main(["compress", str(net / "m.onnx"), "--ratio", "0.25", "--sparsify", "2:4", "--int8", "--calib",
                 str(net / "calib.npz"), "--eval", str(net / "eval.npz"), "--labels", "labels", "-o", str(out),
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    stages = doc["stages"]
    assert [s["stage"] for s in stages] == ["input", "pruned", "sparse", "int8"]
    assert stages[0]["eval"]["accuracy"] == 1.0 and stages[0]["calib"]["rel_err"] == 0.0
    assert stages[1]["params"] < stages[0]["params"]  # channels removed
    assert stages[2]["nonzero"] < stages[1]["nonzero"] and stages[2]["params"] == stages[1]["params"]  # 2:4 zeros
    assert stages[3]["bytes"] < stages[2]["bytes"]  # int8 weights
    assert stages[1]["detail"]["criterion"] == "obspa" and stages[2]["detail"]["method"] == "obs"  # data defaults
    assert stages[3]["detail"]["target"] == "ort-cpu" and stages[3]["detail"]["fused_kernels"]  # runs in ORT's kernels
    for s in stages[1:]:
        assert 0 < s["calib"]["cosine"] <= 1 + 1e-9 and 0 <= s["eval"]["accuracy"] <= 1
    assert not list(net.glob(".spa-compress-*")) and not (net / "c.pruned.onnx").exists()
    final = spa.load(out)
    assert all(x.holds for x in sp.layers(final.proto, 2, 4) if x.eligible)  # the pattern survives INT8
    assert any(n.op_type == "DequantizeLinear" for n in final.graph.node)
    assert main(["analyze", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sparsity"]["fraction_holding"] == 1.0


def test_the_int8_target_reaches_the_quantize_stage(net, capsys):
    assert main(["compress", str(net / "m.onnx"), "--int8", "--target", "tensorrt", "--calib", str(net / "calib.npz"),
                 "-o", str(net / "t.onnx"), "--json"]) == 0
    detail = json.loads(capsys.readouterr().out)["stages"][-1]["detail"]
    assert detail["target"] == "tensorrt" and "QLinearConv" not in detail["fused_kernels"]  # no Q after convs


def test_save_stages_and_fp16_without_data(net, capsys):
    out = net / "c.onnx"
    assert main(["compress", str(net / "m.onnx"), "--sparsify", "2:4", "--fp16", "--save-stages", "-o", str(out),
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in doc["stages"]] == ["input", "sparse", "fp16"]
    assert doc["stages"][1]["detail"]["method"] == "magnitude"  # no data: magnitude
    assert (net / "c.sparse.onnx").is_file() and (net / "c.fp16.onnx").is_file() and out.is_file()
    assert "calib" not in doc["stages"][1]


@pytest.mark.parametrize("argv, message, exit_code", [  # all usage errors: exit 2
    ([], "nothing to do", 2),
    (["--int8"], "--int8 needs calibration data", 2),
    (["--sparsify", "2:4", "--sparsify-method", "obs"], "needs calibration data", 2),
    (["--permute"], "go with --sparsify", 2),
    (["--sparsify", "5:4"], "invalid --sparsify '5:4'", 2),  # a usage error, in compress's own flag
    (["--ratio", "1.5"], "ratio", 2),
    (["--ratio", "0.5", "--criterion", "nope"], "unknown criterion", 2),
])
def test_bad_arguments_fail_in_one_line_before_any_work(net, capsys, argv, message, exit_code):
    code = main(["compress", str(net / "m.onnx"), "-o", str(net / "c.onnx")] + argv)
    err = capsys.readouterr().err
    assert code == exit_code and message in err and len(err.strip().splitlines()) == 1
    assert not (net / "c.onnx").exists()


def test_a_failing_stage_writes_nothing(net, capsys):
    """INT8 refuses a float16 model: the pipeline stops there, leaving no output or temp files."""
    proto = onnx.load(net / "m.onnx")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(proto), net / "h.onnx")
    np.savez(net / "h.npz", x=np.zeros((4, 16, 6, 6), np.float16))
    code = main(["compress", str(net / "h.onnx"), "--int8", "--calib", str(net / "h.npz"), "-o", str(net / "c.onnx")])
    err = capsys.readouterr().err
    assert code == 1 and "float16" in err and "stage 'int8' failed" in err
    assert not (net / "c.onnx").exists() and not list(net.glob(".spa-compress-*"))


FAST = ("residual_block", "mnist_original", "keras_tf2_example", "test_model_1_no_opt", "squeezenet_rehydra")


@pytest.mark.parametrize("entry", [p for p in corpus_params() if p.values[0] is None
                                   or any(f in p.values[0]["file"] for f in FAST)])
def test_corpus_pipeline(entry, tmp_path, capsys):
    """A few corpus models through the whole pipeline with random calibration data (the slow
    sweep over every model is tools/sweep_compress.py)."""
    from tests.oracles import feeds_for

    model = spa.load(CORPUS / entry["file"])
    feeds = feeds_for(model, entry)
    np.savez(tmp_path / "calib.npz", **{k: np.concatenate([v] * 4) if v.ndim else v for k, v in feeds.items()})
    code = main(["compress", str(CORPUS / entry["file"]), "--ratio", "0.3", "--sparsify", "2:4", "--int8", "--calib",
                 str(tmp_path / "calib.npz"), "-o", str(tmp_path / "c.onnx"), "--json"])
    captured = capsys.readouterr()
    if code != 0:  # a refusal is one line and names its reason
        assert code == 1 and len(captured.err.strip().splitlines()) <= 2 and "error:" in captured.err
        assert not (tmp_path / "c.onnx").exists()
        return
    doc = json.loads(captured.out)
    assert doc["stages"][-1]["stage"] == "int8" and (tmp_path / "c.onnx").is_file()
    final = spa.load(tmp_path / "c.onnx")
    assert all(x.holds for x in sp.layers(final.proto, 2, 4) if x.eligible)
