"""The oracles over every real model in ../shared/corpus/real (skipped when absent)."""

from __future__ import annotations

import pytest

import spa
from spa import api
from spa.scoring import obspa
from tests.conftest import CORPUS, corpus_params
from tests.oracles import (
    assert_erasure,
    assert_identity_at_ratio_zero,
    assert_valid_output,
    assert_zero_invariance,
    feeds_for,
)


def _load(entry):
    return spa.load(CORPUS / entry["file"])


@pytest.mark.parametrize("entry", corpus_params())
def test_zero_invariance(entry):
    model = _load(entry)
    assert_zero_invariance(model, feeds_for(model, entry))


@pytest.mark.parametrize("entry", corpus_params())
def test_erasure(entry):
    """Erasing the exact erasable units equals zeroing their last contractions (DESIGN oracle 5)."""
    model = _load(entry)
    assert_erasure(model, feeds_for(model, entry))


@pytest.mark.parametrize("entry", corpus_params())
def test_ratio_zero_is_identity(entry):
    model = _load(entry)
    assert_identity_at_ratio_zero(model, feeds_for(model, entry))


@pytest.mark.parametrize("entry", corpus_params())
def test_ratio_half_prunes_or_says_why(entry):
    """Models with prunable convolutions get smaller at 0.5; the others have a reason."""
    model = _load(entry)
    analysis = spa.analyze(model)
    plan = api.make_plan(analysis, 0.5)
    if not any(g.prunable for g in analysis.groups):
        assert all(g.reason for g in analysis.groups)
        assert plan == {}
        return
    pruned = api.prune(analysis, plan)
    assert_valid_output(model, pruned, feeds_for(model, entry))
    out = api.reinfer(pruned)
    if any(n.op_type == "ConstantOfShape" for n in model.graph.node):
        assert spa.cost.macs(out) < spa.cost.macs(model)  # light models: weights are fills
    else:
        assert pruned.ByteSize() < model.proto.ByteSize()
        assert spa.cost.params(out) < spa.cost.params(model)


# Conv models whose conv channels all end in a recurrent op (a barrier) or a model output.
NO_PRUNABLE_CONVS = {
    "onnxconverter-common/test_model_1_no_opt.onnx": "LSTM",  # Conv1D -> LSTM -> LSTM -> Dense
    "silero-vad/silero_vad.onnx": "If",  # the convs live inside If bodies (never rewritten)
    "silero-vad/silero_vad_op18_ifless.onnx": "If",  # likewise, despite the file name
}


def test_every_conv_model_prunes_unless_known_blocked():
    """Guard against rules silently turning into barriers: every corpus model with convs has a
    prunable group, except the listed ones, whose groups name the reason."""
    from tests.conftest import corpus_entries

    entries = [e for e in corpus_entries() if e.get("conv_count", 0) > 0]
    if not entries:
        pytest.skip("corpus not available")
    blocked = {}
    for e in entries:
        analysis = spa.analyze(_load(e))
        if not any(g.prunable for g in analysis.groups):
            ops = {n.op_type for n in analysis.index.graph.node if (n.name or n.op_type) in analysis.barriers}
            blocked[e["file"]] = " ".join([g.reason for g in analysis.groups] + sorted(ops))
    assert set(blocked) == set(NO_PRUNABLE_CONVS)
    for name, word in NO_PRUNABLE_CONVS.items():
        assert word in blocked[name], (name, blocked[name])


@pytest.mark.parametrize("name", sorted(NO_PRUNABLE_CONVS))
def test_unprunable_corpus_models_exit_cleanly(name, tmp_path, capsys):
    """`spa prune` on them: exit 1, one line naming the reason, nothing written."""
    from spa.cli.app import main

    if not (CORPUS / name).is_file():
        pytest.skip("corpus not available")
    rc = main(["prune", str(CORPUS / name), "--ratio", "0.5", "-o", str(tmp_path / "out.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("error: nothing to prune") and NO_PRUNABLE_CONVS[name] in err[-1]
    assert list(tmp_path.iterdir()) == []


def test_experimental_crop_and_affine_pass_channels():
    """winml/candy.onnx (CoreML -> WinMLTools): Crop and Affine carry channels straight through,
    so the residual blocks between them prune; only the input-side groups stay."""
    path = CORPUS / "winml" / "candy.onnx"
    if not path.is_file():
        pytest.skip("corpus not available")
    analysis = spa.analyze(spa.load(path))
    locked = {g.id: g.reason for g in analysis.groups if not g.prunable}
    barriers = [r.split(" (via ")[0] for r in locked.values() if "no coupling rule" in r]
    assert barriers == ["ImageScaler 'scalerPreprocessor' has no coupling rule (barrier)"], locked
    assert sum(g.prunable for g in analysis.groups) >= 10  # 7 while Crop was a barrier


# float32 noise, not structure: this detector's score head amplifies summation-order
# differences to ~2e-4 relative for some drop sets with or without simplification
# (5e-5 unsimplified); a structural error would be of order 1.
ZI_TOL = {"paddle2onnx/picodet_xs_416_coco_lcnet_sim.onnx": 5e-4}


@pytest.mark.parametrize("entry", corpus_params())
def test_simplified_oracles(entry):
    """--simplify on every corpus model: used only when it keeps the model (else a reason);
    when used, the oracles hold and the pruned model matches the input file's interface."""
    from spa.passes.simplify import simplify

    original, given = _load(entry), _load(entry)
    model, stats = simplify(given)
    if stats["status"] != "ok":
        assert model is given and stats["reason"]  # the input, left as it was
        assert stats["nodes_after"] == stats["nodes_before"] == len(original.graph.node)
        return
    feeds = feeds_for(original, entry)
    assert_zero_invariance(model, feeds, tol=ZI_TOL.get(entry["file"], 1e-4))
    analysis = spa.analyze(model)
    plan = api.make_plan(analysis, 0.5)
    if plan:
        assert_valid_output(original, api.prune(analysis, plan), feeds)


@pytest.mark.parametrize("entry", corpus_params())
def test_data_free_obspa_with_compensation(entry):
    """obspa scored and compensated from the graph alone (no data) on every real model: a valid
    smaller model, or groups it cannot analyse named in the notes (scored by l1 instead)."""
    model = _load(entry)
    analysis = spa.analyze(model)
    if not any(g.prunable for g in analysis.groups):
        return
    stats = api.statistics(analysis)
    plan = api.make_plan(analysis, 0.3, "obspa", stats=stats)
    values, notes = api.compensation(analysis, plan, stats=stats)
    readers = {m.tensor for gid in plan for m in analysis.group(gid).members if m.role == "in"}
    biases = {b[0] for gid in plan for m in analysis.group(gid).members if m.role == "in"
              if (b := obspa.bias_of(analysis.index, m.tensor, m.axis, shape=analysis.index.value(m.tensor).shape))}
    assert set(values) <= readers | biases  # the consumers' weights, and their biases (bias correction)
    assert all(("scored by l1" in n) or ("not compensated" in n) for n in notes)
    pruned = api.prune(analysis, plan, compensate=values)
    assert_valid_output(model, pruned, feeds_for(model, entry))


def test_shape_arithmetic_skip_changes_no_group(monkeypatch):
    """Every corpus model with integer shape arithmetic: the same groups, reasons and members
    whether its rules are skipped (analysis._shape_arithmetic) or run."""
    from spa.core import analysis
    from spa.core.analysis import Analysis
    from tests.conftest import corpus_entries

    entries = corpus_entries()
    if not entries:
        pytest.skip(f"corpus not found at {CORPUS}")
    seen = []
    for entry in entries:
        model = _load(entry)
        if not analysis._shape_arithmetic(analysis.GraphIndex(model))[1]:
            continue
        with monkeypatch.context() as m:
            m.setattr(analysis, "_shape_arithmetic", lambda index: (set(), set()))
            every_rule = Analysis.to_json(spa.analyze(_load(entry)))
        assert Analysis.to_json(spa.analyze(model)) == every_rule, entry["file"]
        seen.append(entry["file"])
    assert len(seen) >= 5, seen  # silero-vad, ultraface, PP-OCR, optimum's test model, ...
