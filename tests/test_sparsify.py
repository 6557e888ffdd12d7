"""N:M semi-structured sparsity (spa sparsify, passes/sparsify.py): the pattern holds on the
right axis of every eligible weight, ineligible layers say why, the models still run."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from spa.backends import ort as ort_backend
from spa.passes import permute, sparsegpt
from spa.passes import sparsify as sp

import spa
from spa.api.sparsify import sparsify as sparsify_api
from spa.cli.app import main
from spa.core.errors import UsageError
from tests.conftest import CORPUS, corpus_params
from tests.oracles import feeds_for


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8)]), st.integers(0, 10_000))
def test_mask_keeps_the_n_largest_of_every_run(rank_extra, nm, seed):
    n, m = nm
    rng = np.random.default_rng(seed)
    shape = [int(rng.integers(1, 4)) for _ in range(rank_extra)] + [m * int(rng.integers(1, 4))]
    axis = int(rng.integers(0, len(shape)))
    shape[axis], shape[-1] = shape[-1], shape[axis]  # the reduction axis anywhere, a multiple of M
    w = rng.standard_normal(shape).astype(np.float32)
    masked, retained = sp.mask(w, axis, n, m=m)
    assert sp.holds(masked, axis, n, m=m)
    runs, orig = np.moveaxis(masked, axis, -1).reshape(-1, m), np.moveaxis(w, axis, -1).reshape(-1, m)
    assert ((runs != 0).sum(1) == n).all()  # exactly N kept (random weights have no zeros)
    kept_min = np.where(runs != 0, np.abs(orig), np.inf).min(1)
    dropped_max = np.where(runs == 0, np.abs(orig), -np.inf).max(1)
    assert (kept_min >= dropped_max).all()  # the N largest magnitudes are the ones kept
    assert retained == pytest.approx(float(np.abs(runs).sum() / np.abs(orig).sum()))


def _model(nodes, inits, x_shape, y_shape=None):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


RNG = np.random.default_rng(0)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_reduction_axis_follows_trans_b(trans_b):
    w = RNG.standard_normal((32, 16) if trans_b else (16, 32)).astype(np.float32)  # K = 32 when transB
    k_axis = 1 if trans_b else 0
    proto = _model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=trans_b)], {"w": w},
                   [2, 32 if trans_b else 16])
    out, found, _ = sp.sparsify(proto)
    got = numpy_helper.to_array(out.graph.initializer[0])
    assert found[0].eligible and found[0].axis == k_axis
    assert sp.holds(got, k_axis, 2, m=4) and not sp.holds(got, 1 - k_axis, 2, m=4)


def test_matmul_weight_through_transpose_and_cast():
    w = RNG.standard_normal((24, 32)).astype(np.float32)  # stored [N, K]; Transpose gives B = [K, N]
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("Cast", ["wt"], ["wc"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "wc"], ["y"])]
    proto = _model(nodes, {"w": w}, [2, 32])
    out, found, _ = sp.sparsify(proto)
    assert found[0].weight == "w" and found[0].axis == 1 and found[0].reduction == 32
    assert sp.holds(numpy_helper.to_array(out.graph.initializer[0]), 1, 2, m=4)


def test_quantized_weight_masks_to_the_zero_point():
    q = RNG.integers(-100, 100, (16, 32)).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    proto = _model(nodes, {"q": q, "s": np.array(0.01, np.float32), "zp": np.array(3, np.int8)}, [2, 16])
    out, found, _ = sp.sparsify(proto)
    got = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "q"))
    assert found[0].eligible and sp.holds(got, 0, 2, m=4, zero_point=3)
    assert ((got == 3).sum() >= got.size // 2)


def test_ineligible_layers_say_why():
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),   # Cin 3
             helper.make_node("Conv", ["c", "w2"], ["d"], group=8),             # depthwise: Cin/g 1
             helper.make_node("Flatten", ["d"], ["f"]),
             helper.make_node("MatMul", ["f", "f2"], ["y"])]                   # computed weight
    inits = {"w1": RNG.standard_normal((8, 3, 3, 3)).astype(np.float32),
             "w2": RNG.standard_normal((8, 1, 1, 1)).astype(np.float32)}
    proto = _model(nodes, inits, [1, 3, 4, 4])
    proto.graph.input.append(helper.make_tensor_value_info("f2", TensorProto.FLOAT, [128, 4]))
    found = sp.layers(proto, 2, 4)
    reasons = [x.reason for x in found]
    assert not any(x.eligible for x in found)
    assert "reduction size 3 is not a multiple of 4" in reasons[0]
    assert "reduction size 1" in reasons[1] and "not a constant" in reasons[2]


def test_cli_sparsify_then_analyze_reports_it(tmp_path, capsys):
    w1 = RNG.standard_normal((32, 16, 3, 3)).astype(np.float32)
    w2 = RNG.standard_normal((32, 10)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w2"], ["y"])]
    onnx.save(_model(nodes, {"w1": w1, "w2": w2}, ["N", 16, 8, 8], ["N", 10]), tmp_path / "m.onnx")
    assert main(["sparsify", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "s.onnx"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["eligible"] == 1 and doc["check"]["status"] == "ok"  # the MatMul has 10 outputs < 16
    assert 0.5 < doc["layers"][0]["retained"] < 1
    assert main(["analyze", str(tmp_path / "s.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sparsity"]["fraction_holding"] == 1.0
    assert main(["analyze", str(tmp_path / "m.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sparsity"]["holding"] == 0


@pytest.mark.parametrize("pattern", ["2-4", "4:2", "0:4", "x"])
def test_cli_bad_pattern_is_one_line(tmp_path, capsys, pattern):
    onnx.save(_model([helper.make_node("Relu", ["x"], ["y"])], {}, [1], [1]), tmp_path / "m.onnx")
    code = main(["sparsify", str(tmp_path / "m.onnx"), "--pattern", pattern, "-o", str(tmp_path / "s.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "invalid --pattern" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.onnx").exists()


@pytest.mark.parametrize("entry", corpus_params())
def test_corpus_pattern_holds_and_runs(entry):
    model = spa.load(CORPUS / entry["file"])
    out, found, _ = sp.sparsify(model.proto)
    again = sp.layers(out, 2, 4)
    assert [x.eligible for x in again] == [x.eligible for x in found]
    assert all(x.holds for x in again if x.eligible)
    assert all(x.reason for x in found if not x.eligible)
    if any(x.eligible for x in found):
        feeds = feeds_for(model, entry)
        try:
            ort_backend.run(model.proto, feeds)
        except Exception:  # noqa: BLE001 - the input itself does not run on these feeds
            pytest.skip("the input model does not run on random feeds")
        res = ort_backend.run(out, feeds)
        assert all(np.isfinite(v).all() for v in res.values() if isinstance(v, np.ndarray) and v.dtype.kind == "f")


# calibrated selection (passes/sparsegpt.py) ---------------------------------------------


@pytest.mark.parametrize("attrs", [{"pads": [1, 1, 1, 1]}, {"strides": [2, 1], "dilations": [1, 2]},
                                   {"group": 2, "auto_pad": "SAME_UPPER", "strides": [2, 2]},
                                   {"group": 4, "pads": [0, 2, 1, 0]}])
def test_unfold_times_weight_rows_is_the_conv(attrs):
    """The unfolded input (the Hessian's x) in the column order of the weight rows: x @ W_g^T
    reproduces ONNX Runtime's convolution, for pads, strides, dilations, groups, auto_pad."""
    g = attrs.get("group", 1)
    w = RNG.standard_normal((8, 16 // g, 3, 3)).astype(np.float32)
    x = RNG.standard_normal((2, 16, 7, 6)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    y = ort_backend.run(_model([node], {"w": w}, list(x.shape)), {"x": x})["y"]
    rows = sparsegpt.unfold(node, x, w.shape)
    w2 = sparsegpt.rows_view(w, 1)
    per = len(w2) // g
    got = np.concatenate([rows[k] @ w2[k * per:(k + 1) * per].T for k in range(g)], axis=1)  # [N*positions, Cout]
    want = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # a row cap picks the same rows in every group, each one a row of the full unfolding
    some = sparsegpt.unfold(node, x, w.shape, max_rows=10, rng=np.random.default_rng(3))
    at = sparsegpt._pick(len(rows[0]), 10, np.random.default_rng(3))
    assert len(at) == 10 and len(set(at)) == 10
    for k in range(g):
        np.testing.assert_array_equal(some[k], rows[k][at])


def test_obs_beats_magnitude_on_correlated_inputs_and_keeps_the_pattern():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4000, 8)) @ rng.standard_normal((8, 64)) + 0.3 * rng.standard_normal((4000, 64))
    w = rng.standard_normal((32, 64))
    h = x.T @ x / len(x)

    def err(wn):
        return np.linalg.norm(x @ (w - wn).T) / np.linalg.norm(x @ w.T)

    obs = sparsegpt.prune_columns(w, h, 2, m=4)
    assert sp.holds(obs, 1, 2, m=4)
    assert err(obs) < 0.5 * err(sp.mask(w, 1, 2, m=4)[0])


def _conv_net():
    """Conv -> Relu -> Conv -> GAP -> Flatten -> Gemm, inputs with correlated channels."""
    rng = np.random.default_rng(2)
    inits = {"w1": rng.standard_normal((32, 16, 3, 3)).astype(np.float32),
             "b1": rng.standard_normal(32).astype(np.float32),
             "w2": rng.standard_normal((32, 32, 3, 3)).astype(np.float32) * 0.2,
             "w3": rng.standard_normal((16, 32)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w3"], ["y"], transB=1, name="fc")]
    base = rng.standard_normal((96, 4, 6, 6))
    x = (np.repeat(base, 4, axis=1) + 0.2 * rng.standard_normal((96, 16, 6, 6))).astype(np.float32)
    return _model(nodes, inits, ["N", 16, 6, 6], ["N", 16]), x


def test_obs_selection_is_closer_to_the_dense_model(tmp_path):
    proto, x = _conv_net()
    onnx.save(proto, tmp_path / "m.onnx")
    model = spa.load(tmp_path / "m.onnx")
    dense = ort_backend.run(proto, {"x": x[64:]})["y"]
    errs = {}
    for method in ("magnitude", "obs"):
        out, found, _ = sp.sparsify(model.proto, 2, 4, min_size=16, method=method, data={"x": x[:64]}, dtypes=model.dtypes)
        assert all(layer.holds for layer in sp.layers(out, 2, 4, min_size=16) if layer.eligible)
        assert [layer.method for layer in found if layer.eligible] == [method] * 3
        y = ort_backend.run(out, {"x": x[64:]})["y"]  # held-out samples
        errs[method] = np.linalg.norm(y - dense) / np.linalg.norm(dense)
    assert errs["obs"] < 0.7 * errs["magnitude"]


def test_obs_falls_back_to_magnitude_with_the_reason():
    w = RNG.standard_normal((2, 32, 32)).astype(np.float32)  # a batched MatMul weight
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": w}, [2, 4, 32])
    _out, found, _ = sp.sparsify(proto, method="obs", data={"x": RNG.standard_normal((3, 2, 4, 32)).astype(np.float32)},
                                dtypes={"x": TensorProto.FLOAT})
    assert found[0].method == "magnitude" and "batched" in found[0].note and found[0].holds


def test_permutation_is_exact_and_keeps_more_magnitude(tmp_path):
    proto, x = _conv_net()
    onnx.save(proto, tmp_path / "m.onnx")
    model = spa.load(tmp_path / "m.onnx")
    analysis = spa.analyze(model)
    weights = sp._Weights(onnx.ModelProto.FromString(proto.SerializeToString()))
    found = sp.layers(weights.proto, 2, 4, min_size=16, weights=weights)
    orders, rows = permute.plan(analysis, found, 2, m=4, weights=weights, budget_s=5)
    assert orders and all(r["retained_after"] > r["retained_before"] for r in rows if r["permuted"])
    assert all(sorted(o) == list(range(len(o))) for o in orders.values())
    permute.apply(analysis, orders, weights)
    np.testing.assert_allclose(ort_backend.run(weights.proto, {"x": x})["y"], ort_backend.run(proto, {"x": x})["y"],
                               rtol=1e-4, atol=1e-4)  # the same function before masking
    plain = sp.sparsify(model.proto)[1]
    out, permuted_layers, report = sp.sparsify(model.proto, permute=analysis, budget_s=5)
    assert any(r["permuted"] for r in report)
    assert sum(x.retained for x in permuted_layers if x.eligible) > sum(x.retained for x in plain if x.eligible)
    assert all(layer.holds for layer in sp.layers(out, 2, 4, min_size=16) if layer.eligible)


def test_cli_obs_and_permute(tmp_path, capsys):
    proto, x = _conv_net()
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=x)
    assert main(["sparsify", str(tmp_path / "m.onnx"), "--method", "obs", "--calib", str(tmp_path / "calib.npz"),
                 "--permute", "-o", str(tmp_path / "s.onnx"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["method"] == "obs" and any(r["permuted"] for r in doc["permutation"])
    assert [x["method"] for x in doc["layers"] if x["eligible"]] == ["obs"] * 3
    code = main(["sparsify", str(tmp_path / "m.onnx"), "--method", "obs", "-o", str(tmp_path / "t.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "needs calibration data" in err and not (tmp_path / "t.onnx").exists()


# over 5 s each on the 2-core CI machine (large activations or many groups): run with -m slow
SLOW_OBS = ("densenet121_rehydr", "inception_v1_rehyd", "picodet", "candy", "PP_OCR_v2_det", "geometric_shapes",
            "ultraface", "mnist_uwp", "mobilenet_v2")


@pytest.mark.parametrize("entry", corpus_params(SLOW_OBS))
def test_corpus_obs_and_permutation(entry):
    """Calibrated selection and the permutation search on every corpus model: the pattern holds,
    layers OBS cannot see say why, permutations that were kept leave the function unchanged
    (checked inside, else undone with a note), and the result runs in ONNX Runtime."""
    model = spa.load(CORPUS / entry["file"])
    feeds = feeds_for(model, entry)
    try:
        analysis = spa.analyze(model)
    except spa.SpaError:
        analysis = None
    try:
        out, found, rows = sp.sparsify(model.proto, method="obs", data=feeds, dtypes=model.dtypes, max_samples=1,
                                       permute=analysis, budget_s=0.2)
    except spa.SpaError as exc:  # a refusal must say why
        assert "calibration data" in str(exc)
        return
    again = sp.layers(out, 2, 4)
    assert all(x.holds for x in again if x.eligible)
    assert all(x.method in ("obs", "magnitude") for x in found if x.eligible)
    assert all(x.note for x in found if x.eligible and x.method == "magnitude")
    for row in rows:
        assert row["retained_after"] >= row["retained_before"] - 1e-9
        assert row["permuted"] or row.get("note") or row["retained_after"] <= row["retained_before"]
    if any(x.eligible for x in found):
        try:
            ort_backend.run(model.proto, feeds)
        except Exception:  # noqa: BLE001 - the input itself does not run on these feeds
            return
        res = ort_backend.run(out, feeds)
        assert all(np.isfinite(v).all() for v in res.values() if isinstance(v, np.ndarray) and v.dtype.kind == "f")


def test_api_sparsify_is_the_cli_document(tmp_path, capsys):
    """spa.api.sparsify.sparsify without the CLI: the same document as `spa sparsify --json`, from a
    path or from a ModelProto in memory; .model is the checked ModelProto, .save re-checks it."""
    proto, x = _conv_net()
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=x)
    out = str(tmp_path / "s.onnx")
    assert main(["sparsify", str(tmp_path / "m.onnx"), "--method", "obs", "--calib", str(tmp_path / "calib.npz"),
                 "--calib-samples", "32", "-o", out, "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    result = sparsify_api(str(tmp_path / "m.onnx"), method="obs", calib=str(tmp_path / "calib.npz"),
                          calib_samples=32, output=out)
    assert result.to_json() == cli
    onnx.checker.check_model(result.model, full_check=True)
    memory = sparsify_api(proto, method="obs", calib={"x": x}, calib_samples=32)
    assert memory.to_json() == {**cli, "input": None, "output": None}
    assert all(x.holds for x in sp.layers(memory.model, 2, 4) if x.eligible)
    memory.save(tmp_path / "again.onnx")
    assert all(x.holds for x in sp.layers(onnx.load(tmp_path / "again.onnx"), 2, 4) if x.eligible)


@pytest.mark.parametrize("options, message", [
    ({"min_size": 0}, "invalid min_size=0"),
    ({"pattern": "4:2"}, "invalid pattern='4:2'"),
    ({"method": "obs"}, "method=obs needs calibration data"),
    ({"max_loss": 1.5}, "invalid max_loss=1.5"),
    ({"max_loss": 0.1, "check": False}, "it needs the output check"),
    ({"permute_budget": 0}, "invalid permute_budget=0"),
])
def test_api_sparsify_bad_values_are_usage_errors(tmp_path, options, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        sparsify_api(_conv_net()[0], output=tmp_path / "s.onnx", **options)
    assert not (tmp_path / "s.onnx").exists()


def test_cli_sparsify_bad_value_exits_2_naming_the_flag(tmp_path, capsys):
    onnx.save(_conv_net()[0], tmp_path / "m.onnx")
    code = main(["sparsify", str(tmp_path / "m.onnx"), "--min-size", "0", "-o", str(tmp_path / "s.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "invalid --min-size 0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.onnx").exists()
