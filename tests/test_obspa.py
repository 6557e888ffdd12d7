"""Member roles, activation statistics, the data criteria, OBS compensation and budget targets.

The graph used throughout::

    x[N,4,6,6] -> Conv A (4->6, 3x3) -> BatchNorm -> Relu -> Conv B (6->5, 1x1) -> y
                  channel 5 of A is an exact copy of channel 1 (filter, bias, BN)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from graphs import build, conv_relu, node, weight
from onnx import numpy_helper
from spa.backends import ort as ort_backend

import spa
from spa import api
from spa.core import cost
from spa.core.errors import SpaError
from spa.scoring import criteria, moments, stats
from spa.scoring import stats as stats_mod


def _model(gamma=None, scale_b=1.0):
    rng = np.random.default_rng(0)
    wa, ba = rng.standard_normal((6, 4, 3, 3)), rng.standard_normal(6) * 0.5
    wa[5], ba[5] = wa[1], ba[1]
    gamma = np.array([1.0, 0.8, 1.2, 0.9, 1.1, 0.8]) if gamma is None else np.asarray(gamma, dtype=float)
    bn = {"g": gamma, "b": rng.standard_normal(6) * 0.3, "m": rng.standard_normal(6) * 0.1, "v": np.ones(6) * 4}
    bn["b"][5], bn["m"][5] = bn["b"][1], bn["m"][1]
    wb = rng.standard_normal((5, 6, 1, 1)) * scale_b
    inits = {"A.w": wa, "A.b": ba, "B.w": wb, **{f"bn.{k}": v for k, v in bn.items()}}
    nodes = [node("Conv", ["x", "A.w", "A.b"], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
             node("BatchNormalization", ["a", "bn.g", "bn.b", "bn.m", "bn.v"], ["n"]),
             node("Relu", ["n"], ["r"]),
             node("Conv", ["r", "B.w"], ["y"], kernel_shape=[1, 1])]
    return build(nodes, {"x": [None, 4, 6, 6]}, {"y": [None, 5, 6, 6]},
                 [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])


def _data(n=256, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((n, 4, 6, 6)).astype(np.float32)}


def _group(analysis):
    return analysis.group("A.w:0")


def test_rules_give_members_their_roles():
    g = _group(spa.analyze(_model()))
    roles = {(m.tensor, m.axis): (m.role, m.reads) for m in g.members}
    assert roles[("B.w", 1)] == ("in", ("r", 1))
    assert roles[("bn.g", 0)] == ("scale", None)
    assert roles[("A.w", 0)] == (None, None)
    assert {"tensor": "B.w", "axis": 1, "role": "in"}.items() <= next(
        m.to_json() for m in g.members if m.tensor == "B.w").items()


def test_calibrated_moments_are_the_sample_moments():
    model = _model()
    analysis = spa.analyze(model)
    data = _data(64)
    st = stats.calibrate(analysis, data, batch_size=20)
    r = ort_backend.run_with_outputs(model, ["r"], data)["r"]
    rows = np.moveaxis(r, 1, -1).reshape(-1, 6).astype(np.float64)
    mom = st.get(("r", 1))
    assert st.samples == 64 and st.source == "calibration"
    np.testing.assert_allclose(mom.gram, rows.T @ rows / len(rows), rtol=1e-5)
    np.testing.assert_allclose(mom.zeros, (rows == 0).mean(0))
    np.testing.assert_allclose(mom.abs_mean, np.abs(rows).mean(0), rtol=1e-6)


def test_data_free_moments_after_batchnorm_and_relu():
    """BatchNorm fixes N(beta, gamma^2); the rectified Gaussian's mean is closed-form."""
    from math import erf, exp, pi, sqrt

    model = _model()
    analysis = spa.analyze(model)
    dist = moments.propagate(analysis)["r"]
    g = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "bn.g"))
    b = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "bn.b"))
    for mu, s, got in zip(b, g, dist.mean):
        want = mu * 0.5 * (1 + erf(mu / (s * sqrt(2)))) + s * exp(-mu * mu / (2 * s * s)) / sqrt(2 * pi)
        assert got == pytest.approx(want, rel=1e-2)  # quadrature across the kink
    cov = dist.cov()
    # the copies stay strongly correlated (Stein's linearization keeps ~0.8 of a Relu's self-covariance)
    assert cov[1, 5] > 0.75 * cov[1, 1]
    assert abs(cov[0, 2]) < 0.5 * np.sqrt(cov[0, 0] * cov[2, 2])


def _error_after(analysis, plan, values, data):
    want = ort_backend.run(analysis.model.proto, data)["y"]
    got = ort_backend.run(api.prune(analysis, plan, compensate=values), data)["y"]
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def test_calibrated_compensation_recovers_a_copied_channel():
    analysis = spa.analyze(_model())
    plan, data = {"A.w:0": [5]}, _data()
    values, notes = api.compensation(analysis, plan, calib=data)
    plain = _error_after(analysis, plan, None, data)
    assert not notes and plain > 0.1
    assert _error_after(analysis, plan, values, data) < plain / 10


def test_data_free_compensation_helps_without_data():
    analysis = spa.analyze(_model())
    plan, data = {"A.w:0": [5, 3]}, _data()
    values, _ = api.compensation(analysis, plan)
    assert set(values) == {"B.w"}
    assert _error_after(analysis, plan, values, data) < 0.8 * _error_after(analysis, plan, None, data)


@pytest.mark.parametrize("calibrated", [False, True])
def test_obspa_drops_a_copy_first(calibrated):
    """One of the two copies costs nothing once the other takes over; l1 ranks by size instead."""
    analysis = spa.analyze(_model(scale_b=1.0))
    st = api.statistics(analysis, _data() if calibrated else None)
    scores = criteria.score(analysis, "obspa", data=st)["A.w:0"]
    assert int(np.argmin(scores)) in (1, 5)
    plan = api.make_plan(analysis, 0.34, "obspa", stats=st)["A.w:0"]
    assert len(plan) == 2 and len({1, 5} & set(plan)) == 1  # never both copies


def test_bn_scale_ranks_by_gamma_and_falls_back_without_one():
    analysis = spa.analyze(_model(gamma=[1.0, 0.9, 0.05, 1.1, 1.2, 0.9]))
    assert int(np.argmin(criteria.score(analysis, "bn-scale")["A.w:0"])) == 2
    st = stats.Stats("calibration")
    no_bn = spa.analyze(_model_without_bn())
    scores = criteria.score(no_bn, "bn-scale", data=st)
    assert st.notes and "no normalization scale" in st.notes[0]
    np.testing.assert_allclose(next(iter(scores.values())), next(iter(criteria.score(no_bn, "l1").values())))


def _model_without_bn():
    nodes = [node("Conv", ["x", "A.w"], ["a"], kernel_shape=[1, 1]), node("Relu", ["a"], ["r"]),
             node("Conv", ["r", "B.w"], ["y"], kernel_shape=[1, 1])]
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("A.w", (6, 4, 1, 1)), ("B.w", (5, 6, 1, 1)))]
    return build(nodes, {"x": [None, 4, 6, 6]}, {"y": [None, 5, 6, 6]}, inits)


@pytest.mark.parametrize("name", ["apoz", "mean-act"])
def test_activation_criteria_rank_a_dead_channel_lowest(name):
    model = _model()
    for t in model.graph.initializer:  # channel 3's BN output is always far below zero: Relu kills it
        if t.name == "bn.b":
            b = numpy_helper.to_array(t).copy()
            b[3] = -50.0
            t.CopyFrom(numpy_helper.from_array(b, "bn.b"))
    analysis = spa.analyze(model)
    st = api.statistics(analysis, _data(64))
    assert int(np.argmin(criteria.score(analysis, name, data=st)["A.w:0"])) == 3
    with pytest.raises(SpaError, match="needs calibration data"):
        api.make_plan(analysis, 0.5, name)


@pytest.mark.parametrize("kind", ["params", "macs"])
def test_targets_keep_at_most_the_fraction_and_estimate_is_exact(kind):
    model = spa.load(Path(__file__).resolve().parents[1] / "examples" / "tiny_resnet.onnx")
    analysis = spa.analyze(model)
    full = cost.summary(model)[kind]
    plan = api.plan_for_target(analysis, kind, 0.5)
    after = cost.summary(api.reinfer(api.prune(analysis, plan)))
    assert after == cost.estimate(analysis, plan)
    assert 0.4 < after[kind] / full <= 0.5
    with pytest.raises(SpaError, match="cannot keep only"):
        api.plan_for_target(analysis, kind, 0.001)
    with pytest.raises(SpaError, match="fraction"):
        api.plan_for_target(analysis, kind, 1.5)


# ---------------------------------------------------------------- CLI

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny_resnet.onnx"


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, input=np.random.default_rng(0).standard_normal((48, 3, 32, 32)).astype(np.float32))
    return path


def test_cli_obspa_calibrated_compensates(capsys, tmp_path, calib):
    from tests.test_cli import spa as run

    r = run(capsys, "prune", TINY, "--ratio", "0.3", "--criterion", "obspa", "--calib", calib, "-o",
            tmp_path / "o.onnx", "--json")
    doc = json.loads(r.out)
    assert r.rc == 0 and doc["compensated"] is True
    assert doc["statistics"] == {"source": "calibration", "samples": 48}
    r = run(capsys, "prune", TINY, "--ratio", "0.3", "--criterion", "obspa", "--no-compensate", "-o",
            tmp_path / "p.onnx", "--json")
    assert r.rc == 0 and json.loads(r.out)["compensated"] is False


@pytest.mark.parametrize("kind", ["params", "macs"])
def test_cli_target(capsys, tmp_path, kind):
    from tests.test_cli import spa as run

    r = run(capsys, "prune", TINY, f"--target-{kind}", "0.6", "-o", tmp_path / "o.onnx", "--json")
    doc = json.loads(r.out)
    assert r.rc == 0 and doc["target"] == {kind: 0.6}
    assert 0.5 < doc["after"][kind] / doc["before"][kind] <= 0.6


def test_cli_sensitivity_then_protected_prune(capsys, tmp_path, calib):
    from tests.test_cli import spa as run

    r = run(capsys, "sensitivity", TINY, "--calib", calib, "--ratios", "0.25", "0.5", "--json")
    sens = json.loads(r.out)
    assert r.rc == 0 and sens["ratios"] == [0.25, 0.5] and sens["groups"]
    (tmp_path / "s.json").write_text(r.out)
    limit = sorted(g["loss"][1] for g in sens["groups"])[len(sens["groups"]) // 2]  # half the groups pass
    r = run(capsys, "prune", TINY, "--ratio", "0.5", "--sensitivity", tmp_path / "s.json", "--max-loss", limit,
            "--save-plan", tmp_path / "plan.json", "-o", tmp_path / "o.onnx")
    plan = json.loads((tmp_path / "plan.json").read_text())["groups"]
    assert r.rc == 0
    for g in sens["groups"]:
        allowed = max([0.0] + [ratio for ratio, loss in zip(sens["ratios"], g["loss"]) if loss <= limit])
        assert len(plan.get(g["id"], [])) <= int(g["size"] * allowed)


@pytest.mark.parametrize("args, message, code", [  # 2: a bad option, 1: a refusal
    (["--ratio", "0.3", "--criterion", "apoz"], "needs calibration data", 2),
    (["--target-params", "1.5"], "fraction", 2),
    (["--target-macs", "0.0001"], "cannot keep only", 1),
    (["--ratio", "0.3", "--calib", "missing.npz"], "missing.npz", 1),
])
def test_cli_bad_input_is_one_line(capsys, tmp_path, args, message, code):
    from tests.test_cli import spa as run

    r = run(capsys, "prune", TINY, *args, "-o", tmp_path / "o.onnx")
    assert r.rc == code and len(r.error_lines) == 1 and message in r.error_lines[0]
    assert not (tmp_path / "o.onnx").exists()


def _chain():
    """x[N,3,8,8] -> three 3x3 Conv+Relu (3->8->8->8) -> a 1x1 Conv (8->4): three prunable groups."""
    nodes, inits = [], []
    for i, (cin, name) in enumerate([(3, "x"), (8, "h0"), (8, "h1")]):
        n, w = conv_relu(name, f"h{i}", cin, 8, prefix=f"c{i}")
        nodes, inits = nodes + n, inits + w
    head, w = conv_relu("h2", "y", 8, 4, k=1, prefix="head")
    return build(nodes + head, {"x": [None, 3, 8, 8]}, {"y": [None, 4, 8, 8]}, inits + w)


def test_streamed_subsampled_moments_match_the_full_computation():
    """Float32 products, a prefix-only session and per-batch row draws: with every row drawn the
    moments are the full ones (to float32 rounding); with 1/4 of the rows drawn they stay close."""
    model = _chain()
    analysis = spa.analyze(model)
    data = {"x": np.random.default_rng(3).standard_normal((32, 3, 8, 8)).astype(np.float32)}
    spaces = [("h1", 1)]
    r = ort_backend.run_with_outputs(model, ["h1"], data)["h1"]
    rows = np.moveaxis(r, 1, -1).reshape(-1, 8).astype(np.float64)
    ref = stats.reference_session(analysis, spaces, only=True)
    assert [o.name for o in ref.get_outputs()] == ["h1"]
    full = stats.calibrate(analysis, data, spaces, batch_size=8, source=model.proto, reference=ref,
                           max_rows=8 * 64).get(("h1", 1))  # 8 samples x 64 positions: every row
    np.testing.assert_allclose(full.gram, rows.T @ rows / len(rows), rtol=1e-5)
    np.testing.assert_allclose(full.cross, full.gram, rtol=1e-6)  # the same model on both sides
    part = stats.calibrate(analysis, data, spaces, batch_size=8, source=model.proto, reference=ref,
                           max_rows=128).get(("h1", 1))
    assert not np.allclose(part.gram, full.gram, rtol=1e-6)  # rows were really drawn
    assert np.linalg.norm(part.gram - full.gram) < 0.15 * np.linalg.norm(full.gram)
    np.testing.assert_allclose(part.cross, part.gram, rtol=1e-6)  # paired: the same rows of both


def test_calibrated_compensation_reports_progress_in_groups():
    from spa.scoring import measure, obspa

    analysis = spa.analyze(_chain())
    plan = {g.id: [0, 1] for g in analysis.groups if g.prunable}
    data = {"x": np.random.default_rng(4).standard_normal((24, 3, 8, 8)).astype(np.float32)}
    seen = []
    values, _ = measure.compensation(analysis, plan, data, batch_size=8, progress=lambda d, t: seen.append((d, t)))
    assert len(plan) == 3 and values
    assert seen[-1] == (3, 3) and all(t == 3 for _, t in seen)
    # 3 stages: each batch, then done
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) == 3 * (3 + 1)
    exact, _ = obspa.sequential(analysis, plan, data, batch_size=8, stages_count=None, max_rows=None)
    for k in values:  # one group per stage here either way: the same updates
        np.testing.assert_allclose(values[k], exact[k], rtol=1e-4, atol=1e-6)


def test_cli_prints_compensation_progress_with_json(capsys, tmp_path, calib, monkeypatch):
    from spa.cli import app
    from tests.test_cli import spa as run

    monkeypatch.setattr(app, "TICK_S", 0.0)  # every tick a line
    r = run(capsys, "prune", TINY, "--ratio", "0.3", "--criterion", "obspa", "--calib", calib, "-o",
            tmp_path / "o.onnx", "--json")
    assert r.rc == 0 and json.loads(r.out)["compensated"] is True
    lines = [x for x in r.err.splitlines() if x.startswith("compensating the consumers")]
    assert lines and "groups, ETA" in lines[0] and lines[-1].split(": ")[1].startswith(tuple("123456789"))
    r = run(capsys, "prune", TINY, "--target-macs", "0.7", "--criterion", "obspa", "--calib", calib, "-o",
            tmp_path / "t.onnx", "--json")  # a target's sensitivity step counts its groups too
    lines = [x for x in r.err.splitlines() if x.startswith("sensitivity (each group alone")]
    assert r.rc == 0 and lines and "groups, ETA" in lines[-1], r.err


def _biased_model(after_b: str):
    """_model with Conv B given a bias ("bias") or followed by a BatchNormalization ("norm")."""
    model = _model()
    g = model.proto.graph
    rng = np.random.default_rng(3)
    if after_b == "bias":
        g.node[-1].input.append("B.b")
        g.initializer.append(numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "B.b"))
    else:
        g.node[-1].output[0] = "yb"
        g.node.append(node("BatchNormalization", ["yb", "n2.g", "n2.b", "n2.m", "n2.v"], ["y"], name="n2"))
        for name, value in (("g", rng.uniform(0.5, 1.5, 5)), ("b", rng.standard_normal(5)),
                            ("m", rng.standard_normal(5)), ("v", rng.uniform(1, 3, 5))):
            g.initializer.append(numpy_helper.from_array(value.astype(np.float32), f"n2.{name}"))
    from spa.core.model import Model, infer_shapes

    rebuilt = Model(model.proto)
    infer_shapes(rebuilt)
    return rebuilt


@pytest.mark.parametrize("after_b, bias", [("bias", "B.b"), ("norm", "n2.m")])
def test_compensation_corrects_the_consumers_bias(after_b, bias, monkeypatch):
    """The constant input of the least squares: the pruned model's output keeps the dense mean on
    the calibration data, through Conv B's bias or the running mean of the BatchNormalization after it."""
    from spa.scoring import obspa

    monkeypatch.setattr(obspa, "RENORM", False)  # the correction alone (the re-estimation: the test below)
    analysis = spa.analyze(_biased_model(after_b))
    plan, data = {"A.w:0": [0, 3]}, _data()
    want = ort_backend.run(analysis.model.proto, data)["y"]

    def pruned(values):
        return ort_backend.run(api.prune(analysis, plan, compensate=values), data)["y"]

    values, notes = api.compensation(analysis, plan, calib=data)
    assert not notes and set(values) == {"B.w", bias}
    shift = np.abs((pruned(values) - want).mean((0, 2, 3)))
    monkeypatch.setattr(obspa, "BIAS_CORRECTION", False)
    weights_only, _ = api.compensation(analysis, plan, calib=data)
    assert set(weights_only) == {"B.w"}
    plain_shift = np.abs((pruned(weights_only) - want).mean((0, 2, 3)))
    assert shift.max() < 1e-2 * want.std() and shift.max() < plain_shift.max() / 5, (shift, plain_shift)
    assert _error_after(analysis, plan, values, data) <= _error_after(analysis, plan, weights_only, data) + 1e-6


def test_calibrated_compensation_re_estimates_the_batchnorm_after_a_consumer(monkeypatch):
    """The BatchNormalization after a compensated Conv gets running statistics re-measured on the
    calibration data: its output keeps the dense model's per-channel mean and deviation there,
    which the least squares alone (a projection: less variance) does not."""
    from spa.scoring import obspa

    analysis = spa.analyze(_biased_model("norm"))
    plan, data = {"A.w:0": [0, 2, 3]}, _data()
    want = ort_backend.run(analysis.model.proto, data)["y"]
    assert [n.name for n in obspa.norms_after(analysis.index, ["B.w"])] == ["n2"]

    def moments_after(renorm):
        monkeypatch.setattr(obspa, "RENORM", renorm)
        values, notes = api.compensation(analysis, plan, calib=data)
        assert not notes
        got = ort_backend.run(api.prune(analysis, plan, compensate=values), data)["y"]
        return set(values), got.mean((0, 2, 3)), got.std((0, 2, 3))

    names, mean, dev = moments_after(True)
    assert names == {"B.w", "n2.m", "n2.v"}
    np.testing.assert_allclose(mean, want.mean((0, 2, 3)), atol=0.02 * want.std())
    np.testing.assert_allclose(dev, want.std((0, 2, 3)), rtol=0.02)
    names, _, plain = moments_after(False)
    assert names == {"B.w", "n2.m"}
    assert np.abs(plain / want.std((0, 2, 3)) - 1).max() > 5 * np.abs(dev / want.std((0, 2, 3)) - 1).max()


def test_calibration_batches_are_bounded_by_the_bytes_they_hold(monkeypatch):
    """A batch of extra outputs larger than OUTPUT_BYTES is split into fewer samples per run (the
    moments do not change: they are sums over samples), twice as strictly when paired."""
    model = _chain()
    analysis = spa.analyze(model)
    data = {"x": np.random.default_rng(3).standard_normal((32, 3, 8, 8)).astype(np.float32)}
    spaces = [("h1", 1)]
    per_sample = 8 * 8 * 8 * 4  # h1: 8 channels of 8 x 8, float32
    whole = stats.calibrate(analysis, data, spaces, batch_size=16).get(("h1", 1))
    runs = []
    session = stats.session_with_outputs

    def counted(*args, **kwargs):
        sess = session(*args, **kwargs)
        run = sess.run
        sess.run = lambda names, feeds: runs.append(len(feeds["x"])) or run(names, feeds)
        return sess

    monkeypatch.setattr(stats, "session_with_outputs", counted)
    monkeypatch.setattr(stats, "OUTPUT_BYTES", 5 * per_sample)
    split = stats.calibrate(analysis, data, spaces, batch_size=16).get(("h1", 1))
    assert runs[0] == 1 and set(runs[1:-1]) == {5} and sum(runs[1:]) == 32  # the probe, then batches of 5
    np.testing.assert_allclose(split.gram, whole.gram, rtol=1e-5)
    np.testing.assert_allclose(split.mean, whole.mean, rtol=1e-5, atol=1e-7)
    sess = stats.session_with_outputs(model.proto, ["h1"], analysis.model.dtypes)
    assert stats._bounded(sess, ["h1"], data, 16, paired=True) == 2  # source and reference outputs: 2 x
    assert stats._bounded(sess, ["h1"], data, 4, paired=False) == 4  # never above the batch asked for


def test_stage_count_follows_the_compute_of_the_compensation():
    """4 stages on heavy models, more where samples x MACs x stages stays under STAGE_MACS, one per
    group (None) when that covers every group."""
    from spa.scoring import obspa

    assert obspa.stage_count(27, 256, 702_469_440) == obspa.STAGES == 4  # the PP-OCR recognizer at 48 x 320
    assert obspa.stage_count(26, 256, 16_315_376) is None  # the classifier: one group per stage
    assert obspa.stage_count(200, 256, 16_315_376) == int(obspa.STAGE_MACS // (256 * 16_315_376)) > 4
    assert obspa.stage_count(10, 256, None) == obspa.STAGES  # MACs unknown


def test_calibrating_a_graph_input_space_alone():
    """Spaces that are graph inputs only (a first layer's input) make a session without nodes,
    which ONNX Runtime refuses: the values come from the feeds (the digits ViT's obspa failed)."""
    model = build([node("MatMul", ["x", "w"], ["y"])], {"x": (None, 4)}, {"y": (None, 3)}, [weight("w", 4, 3)])
    analysis = spa.analyze(model)
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    stats = stats_mod.calibrate(analysis, {"x": x}, [("x", 1)], reference=stats_mod.reference_session(analysis, [("x", 1)], only=True),
                      source=model.proto)
    assert stats.samples == 8 and ("x", 1) in stats.spaces
