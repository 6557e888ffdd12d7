"""Mixture of experts (models/moe.py): each expert's intermediate width is its own group; the
number of experts is not prunable (TopK picks among them at run time) and says so."""

from __future__ import annotations

import numpy as np
import pytest

import spa
from spa import api
from tests.conftest import ZOO_EXPORTERS
from tests.oracles import assert_identity_at_ratio_zero, assert_valid_output, assert_zero_invariance

pytest.importorskip("torch")
from models import moe

CASES = [(s, e) for s in moe.STYLES for e in ZOO_EXPORTERS]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe")
    return {(s, e): moe.export(s, out / f"moe_{s}.{e}.onnx", e) for s, e in CASES}


def _feeds(batch, seq, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((batch, seq, moe.FEATURES)).astype(np.float32)}


@pytest.mark.parametrize("style,exporter", CASES)
def test_experts_prune_one_by_one(moe_models, style, exporter):
    model = spa.load(moe_models[(style, exporter)])
    analysis = spa.analyze(model)
    experts = [g for g in analysis.groups if g.prunable and g.size == moe.INTERMEDIATE]
    assert len(experts) == moe.EXPERTS and all(g.zero_invariant for g in experts)
    for g in experts:  # gate, up (outputs) and down (inputs) of one expert: three weights + two biases
        assert len({m.tensor for m in g.members}) == 5, [m.tensor for m in g.members]
    router = [g for g in analysis.groups if g.size == moe.EXPERTS]
    assert router and all(not g.prunable and "TopK" in g.reason for g in router)
    assert_zero_invariance(model, _feeds(2, 5))
    assert_identity_at_ratio_zero(model, _feeds(2, 5))
    plan = {g.id: list(range(0, moe.INTERMEDIATE, 2)) for g in experts}  # half of every expert
    pruned = api.prune(analysis, plan)
    assert spa.cost.params(api.reinfer(pruned)) < spa.cost.params(model)
    assert_valid_output(model, pruned, _feeds(3, 7, seed=1))
