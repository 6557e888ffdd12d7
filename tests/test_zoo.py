"""The oracles over the models/ CNN zoo, both exporters (TorchScript opset 17, dynamo opset 18)."""

from __future__ import annotations

import pytest
from spa.backends import ort as ort_backend

import spa
from spa import api
from tests.oracles import assert_erasure, assert_identity_at_ratio_zero, assert_valid_output, assert_zero_invariance

torch = pytest.importorskip("torch")
from models import cnn_zoo

CASES = [(n, e) for n in cnn_zoo.BUILDERS for e in ("torchscript", "dynamo")]


def _feeds(model, batch=1, seed=0):
    return ort_backend.random_feeds(model.proto, dynamic=batch, seed=seed)


@pytest.mark.parametrize("name,exporter", CASES)
def test_zero_invariance(zoo, name, exporter):
    model = spa.load(zoo[(name, exporter)])
    plan = assert_zero_invariance(model, _feeds(model, batch=2))
    assert plan, f"{name}/{exporter}: no zero-invariant prunable group found"


# zoo models with identity residual blocks (the others have none or only projection shortcuts)
RESIDUAL = {"resnet", "mobilenetv2", "resnext"}


@pytest.mark.parametrize("name,exporter", CASES)
def test_erasure(zoo, name, exporter):
    model = spa.load(zoo[(name, exporter)])
    count = assert_erasure(model, _feeds(model, batch=2))
    if name in RESIDUAL:
        assert count, f"{name}/{exporter}: no exact erasable unit"


@pytest.mark.parametrize("name,exporter", CASES)
def test_ratio_zero_is_identity(zoo, name, exporter):
    model = spa.load(zoo[(name, exporter)])
    assert_identity_at_ratio_zero(model, _feeds(model))


@pytest.mark.parametrize("name,exporter", CASES)
def test_half_ratio_shrinks_and_runs_at_other_batches(zoo, name, exporter):
    model = spa.load(zoo[(name, exporter)])
    analysis = spa.analyze(model)
    pruned = api.prune(analysis, api.make_plan(analysis, 0.5))
    out = api.reinfer(pruned)
    assert spa.cost.params(out) < 0.6 * spa.cost.params(model), "ratio 0.5 should remove well over 40% of params"
    assert spa.cost.macs(out) < spa.cost.macs(model)
    for batch in (1, 3):
        assert_valid_output(model, pruned, _feeds(model, batch))


# shufflenet: TorchScript computes one unit's shuffle shape as Shape -> Gather -> Div at run
# time; spa does not follow arithmetic on sizes, so that unit's channels stay (with a reason)
# while the dynamo export (constant shapes) prunes them.
@pytest.mark.parametrize("name", [n for n in cnn_zoo.BUILDERS if n != "shufflenet"])
def test_exporters_agree_on_group_sizes(zoo, name):
    """The same torch model gives the same prunable channel counts from both exporters."""
    sizes = {}
    for exporter in ("torchscript", "dynamo"):
        analysis = spa.analyze(spa.load(zoo[(name, exporter)]))
        sizes[exporter] = sorted(g.size for g in analysis.groups if g.prunable)
    assert sizes["torchscript"] == sizes["dynamo"]


def test_vgg_flatten_maps_channel_blocks(zoo):
    """Flatten -> Gemm: each conv channel owns a block of the Linear's input features."""
    model = spa.load(zoo[("vgg", "torchscript")])
    analysis = spa.analyze(model)
    assert any(len(m.positions[0]) > 1 for g in analysis.groups for m in g.members), \
        "Flatten->Gemm should map each channel to a block of features"
    assert all(g.zero_invariant for g in analysis.groups if g.prunable)
