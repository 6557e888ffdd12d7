"""Budget allocation (spa.planning.budget): --target-params/--target-macs/--target-latency."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

import spa
from spa import api
from spa.cli import app as cli
from spa.core import cost
from spa.planning import budget
from spa.planning.plan import allocate
from tests.graphs import build, conv_relu, node, weight

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny_resnet.onnx"


def chain(scale: float = 1.0):
    """x -> a(3->8) -> b(8->16) -> c(16->16) -> d(16->16) -> e(16->4) -> y, ReLU between; b's weight
    and bias times `scale`, c's weight over it: the same function (ReLU is positively homogeneous)."""
    nodes, inits = [], []
    for i, (p, cin, cout, x, y) in enumerate([("a", 3, 8, "x", "ya"), ("b", 8, 16, "ya", "yb"),
                                              ("c", 16, 16, "yb", "yc"), ("d", 16, 16, "yc", "yd")]):
        n, w = conv_relu(x, y, cin, cout, prefix=p)
        nodes += n
        inits += w
    nodes.append(node("Conv", ["yd", "e.w", "e.b"], ["y"], kernel_shape=[1, 1]))
    inits += [weight("e.w", 4, 16, 1, 1), weight("e.b", 4)]
    arrays = {t.name: numpy_helper.to_array(t) for t in inits}
    arrays["b.w"], arrays["b.b"], arrays["c.w"] = arrays["b.w"] * scale, arrays["b.b"] * scale, arrays["c.w"] / scale
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()]
    return build(nodes, {"x": [1, 3, 16, 16]}, {"y": [1, 4, 16, 16]}, inits)


def _group_of(analysis, tensor: str) -> str:
    return next(g.id for g in analysis.groups if any(m.tensor == tensor and m.role != "in" for m in g.members))


@pytest.mark.parametrize("kind", ["params", "macs"])
@pytest.mark.parametrize("keep", [0.8, 0.6])
def test_allocation_meets_the_target(kind, keep):
    analysis = spa.analyze(spa.load(TINY))
    plan, info = allocate(analysis, kind, keep)
    after = cost.summary(api.reinfer(api.prune(analysis, plan)))[kind] / cost.summary(spa.load(TINY))[kind]
    assert keep - 0.08 < after <= keep
    assert info["sensitivity"].startswith("estimated")


def test_stem_and_head_are_protected_with_a_reason_in_the_json():
    doc = api.prune(chain().proto, target_macs=0.7).to_json()
    analysis = spa.analyze(chain())
    reasons = {p["group"]: p["reason"] for p in doc["budget"]["protected"]}
    assert reasons[_group_of(analysis, "a.w")].startswith("stem")
    assert reasons[_group_of(analysis, "d.w")].startswith("head")
    assert doc["target"] == {"macs": 0.7}
    pruned = {g["id"] for g in doc["budget"]["groups"] if g["removed"]}
    assert pruned and not pruned & set(reasons)


@pytest.mark.parametrize("criterion", ["l1", "fpgm"])
def test_allocation_does_not_depend_on_one_layers_weight_scale(criterion):
    plans = []
    for scale in (1.0, 1000.0):
        model = chain(scale)
        analysis = spa.analyze(model)
        plans.append(allocate(analysis, "macs", 0.7, criterion=criterion)[0])
    assert plans[0] == plans[1]
    assert plans[0]


def test_measured_sensitivity_protects_a_sensitive_group_and_weights_the_rest():
    model = chain()
    analysis = spa.analyze(model)
    b, c = _group_of(analysis, "b.w"), _group_of(analysis, "c.w")
    sens = {"ratios": [0.3, 0.5], "groups": [{"id": b, "loss": [0.4, 0.9]}, {"id": c, "loss": [0.001, 0.01]}]}
    plan, info = allocate(analysis, "macs", 0.8, sens=sens)
    assert info["sensitivity"].startswith("measured")
    assert {p["group"]: p["reason"] for p in info["protected"]}[b].startswith("sensitive")
    assert b not in plan and c in plan


def test_calibrated_target_measures_sensitivity():
    rng = np.random.default_rng(0)
    calib = {"x": rng.standard_normal((16, 3, 16, 16)).astype(np.float32)}
    doc = api.prune(chain().proto, target_macs=0.8, calib=calib).to_json()
    assert doc["budget"]["sensitivity"].startswith("measured")
    assert doc["after"]["macs"] <= 0.8 * doc["before"]["macs"]


def test_without_data_sensitivity_is_measured_on_random_inputs(monkeypatch):
    """No calib=: each group's sensitivity is measured on random inputs at the model's shape (the
    document says so); a model those inputs cannot run falls back to the estimate."""
    doc = api.prune(chain().proto, target_macs=0.8).to_json()
    assert doc["budget"]["sensitivity"].startswith("measured") and "64 random inputs" in doc["budget"]["sensitivity"]
    assert doc["after"]["macs"] <= 0.8 * doc["before"]["macs"]
    seen = []

    def refuse(*args, **kwargs):
        seen.append(args[1])
        raise spa.SpaError("the model gives NaN outputs on the calibration data")

    from spa.planning import sensitivity

    monkeypatch.setattr(sensitivity, "sensitivity", refuse)
    doc = api.prune(chain().proto, target_macs=0.8).to_json()
    assert doc["budget"]["sensitivity"].startswith("estimated") and len(seen) == 1
    assert len(seen[0]["x"]) == 64 and np.isfinite(seen[0]["x"]).all()


def test_ratio_mode_is_unchanged():
    analysis = spa.analyze(spa.load(TINY))
    doc = api.prune(str(TINY), ratio=0.5, check=False).to_json()
    assert doc["budget"] is None and doc["target"] is None
    assert doc["channels_removed"] == sum(len(v) for v in api.make_plan(analysis, 0.5).values())


def test_too_low_a_target_is_one_error():
    with pytest.raises(spa.SpaError, match="cannot keep only"):
        allocate(spa.analyze(spa.load(TINY)), "macs", 0.001)


def _cli(capsys, *args):
    capsys.readouterr()
    try:
        rc = cli.main([str(a) for a in args])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    return rc, capsys.readouterr()


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2", "nan", "x"])
def test_target_latency_validates_its_value(capsys, tmp_path, value):
    rc, cap = _cli(capsys, "prune", TINY, "--target-latency", value, "-o", tmp_path / "p.onnx")
    assert rc == 2
    assert "target-latency" in cap.err
    assert not (tmp_path / "p.onnx").exists()


def test_target_latency_prunes_and_reports_its_timings(capsys, tmp_path):
    rc, cap = _cli(capsys, "prune", TINY, "--target-latency", "0.9", "-o", tmp_path / "p.onnx")
    assert rc == 0, cap.err
    assert "latency (ORT CPU, batch 1, ratio to dense)" in cap.err
    assert "protected" in cap.err


def test_check_keep_refuses_what_is_not_a_fraction():
    for bad in (0, 1.01, True, "0.5", float("nan")):
        with pytest.raises(spa.UsageError):
            budget.check_keep("macs", bad)


def test_a_target_that_needs_the_protected_groups_prunes_them_last(tmp_path):
    """A model whose every group is a stem or a head (two convs): the target is still met, the
    protected groups are pruned last and the JSON says they were pruned anyway."""
    from tests.test_shapes import dynamic_model

    doc = spa.prune(str(dynamic_model(tmp_path / "two.onnx")), target_macs=0.6,
                    shape={"x": (1, 3, 16, 16)}).to_json()
    assert doc["after"]["macs"] / doc["before"]["macs"] <= 0.6 + 1e-9
    reasons = [p["reason"] for p in doc["budget"]["protected"]]
    assert reasons and any("pruned anyway" in r for r in reasons), reasons


def test_a_target_keeps_wide_groups_whole_blocks_of_eight_by_default():
    """The default rounding of a budget: groups of 32 channels or more keep multiples of 8 (ORT
    CPU's convolution blocks), narrower ones are free; round_to=1 turns it off, a ratio never had it."""
    example = str(Path(__file__).resolve().parents[1] / "examples" / "tiny_resnet.onnx")
    analysis = spa.analyze(example)
    size = {g.id: g.size for g in analysis.groups}
    doc = spa.prune(example, target_macs=0.6).to_json()
    assert doc["round_to"] == 8 and doc["round_from"] == 32
    kept = {g["id"]: g["size"] - g["removed"] for g in doc["budget"]["groups"]}
    assert any(size[k] >= 32 and kept[k] < size[k] for k in kept)
    assert all(v % 8 == 0 for k, v in kept.items() if size[k] >= 32), kept
    assert not [n for n in doc["notes"] if "multiples of 8" in n]
    fine = spa.prune(example, target_macs=0.6, round_to=1).to_json()
    assert fine["round_to"] == 1 and fine["round_from"] is None
    assert spa.prune(example, ratio=0.3).to_json()["round_to"] == 1
