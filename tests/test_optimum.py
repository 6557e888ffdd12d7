"""Decoder LLMs as Hugging Face's exporter writes them (optimum-onnx, text-generation-with-past):
plain ONNX attention with past_key_values.N / present.N in the graph's I/O. optimum-onnx needs
transformers < 4.58, so it runs in its own venv (models/llm_export.py); these tests run when
SPA_OPTIMUM_VENV names one (.ci/run makes it), else they skip."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from spa.backends import ort as ort_backend

import spa
from spa.api.result import as_model
from spa.core import depth, kvcache
from spa.core.checks import check_shapes
from spa.core.cost import dropped_positions
from spa.core.runtime import random_feeds
from tests.oracles import assert_erasure, random_zi_plan, rel_err

pytest.importorskip("transformers")
pytest.importorskip("onnxslim")
VENV = os.environ.get("SPA_OPTIMUM_VENV")
if not VENV or not (Path(VENV) / "bin" / "python").exists():
    pytest.skip("SPA_OPTIMUM_VENV names no optimum-onnx venv (models/llm_export.py makes one)", allow_module_level=True)

from models import llm_export


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("optimum")
    made = {}

    def get(family: str) -> Path:
        if family not in made:
            hf = llm_export.save_hf(family, root / "hf" / family)
            made[family] = llm_export.optimum(hf, root / family, Path(VENV) / "bin" / "python") / "model.onnx"
        return made[family]

    return get


@pytest.mark.parametrize("family", llm_export.OPTIMUM_FAMILIES)
def test_prune_with_cache(export, tmp_path, family):
    src = export(family)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    doc = spa.prune(str(src), ratio=0.5, simplify=True, output=str(out)).to_json()
    assert doc["check"]["status"] == "ok" and "max_rel_err" in doc["check"]["empty_cache"]
    assert doc["simplify"]["status"] == "ok" and doc["simplify"]["outputs_compared"]  # at the cache's lengths
    changed = {c["name"]: c for c in doc["io_changed"]}
    assert "past_key_values.0.key" in changed and "present.1.value" in changed
    assert all(c["name"].startswith(("past", "present")) for c in doc["io_changed"])  # every other I/O kept
    kv = changed["past_key_values.0.key"]["after"][1]
    assert kv < changed["past_key_values.0.key"]["before"][1]
    cfg = json.loads((out.parent / "config.json").read_text())
    if family != "gpt2":
        assert cfg["num_key_value_heads"] == kv and cfg["head_dim"] == changed["past_key_values.0.key"]["after"][3]
    dec = doc["configs"]["decode"]
    assert dec["status"] == "ok" and dec["tokens"] == 16


def test_no_check_writes_the_configs_without_decoding(export, tmp_path):
    out = tmp_path / "model.onnx"
    doc = spa.prune(str(export("llama")), ratio=0.3, check=False, output=str(out)).to_json()
    assert doc["check"]["status"] == "not run" and doc["configs"]["written"]
    assert "decode" not in doc["configs"] and "generator" not in doc["configs"]
    assert json.loads((tmp_path / "config.json").read_text())["num_key_value_heads"] >= 1


@pytest.mark.parametrize("family", llm_export.OPTIMUM_FAMILIES)
def test_erasure_with_cache(export, family):
    """Attention units take their layer's cache pair along and are exact like the MLP units
    (the oracle maps the cache by name); --freeze-io keeps the cache, so no attention unit."""
    model = spa.load(export(family))
    feeds = random_feeds(model.proto, seed=0, shapes=check_shapes(model))
    units, rejected = depth.find(model)
    assert {u.kind for u in units} == {"mlp", "attention"} and not rejected
    assert all(len(u.cache) == 4 for u in units if u.kind == "attention")
    assert assert_erasure(model, feeds) == len(units)
    frozen, why = depth.find(model, freeze_io=True)
    assert {u.kind for u in frozen} == {"mlp"} and all("freeze-io" in r["reason"] for r in why)


def test_erasing_attention_with_its_cache_decodes(export, tmp_path):
    src = export("llama")
    first = next(u for u in spa.analyze(str(src)).units[0] if u.kind == "attention")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"schema_version": 1, "groups": {}, "erase": [first.id]}))
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    doc = spa.prune(str(src), plan=str(plan), output=str(out)).to_json()
    assert doc["check"]["status"] == "ok" and "max_rel_err" in doc["check"]["empty_cache"]
    assert doc["depth"]["cache"]["removed"] == ["past_key_values.0.key", "past_key_values.0.value", "present.0.key",
                                                "present.0.value"]
    assert doc["depth"]["cache"]["renamed"]["present.1.key"] == "present.0.key"
    assert doc["configs"]["decode"]["status"] == "ok" and doc["configs"]["decode"]["tokens"] == 16
    layers = json.loads((src.parent / "config.json").read_text())["num_hidden_layers"]
    assert json.loads((out.parent / "config.json").read_text())["num_hidden_layers"] == layers - 1
    every = {"schema_version": 1, "groups": {}, "erase": [u.id for u in spa.analyze(str(src)).units[0]
                                                          if u.kind == "attention"]}
    left = spa.prune(str(src), plan=every).model  # no attention left: no cache either (the mask went with it)
    assert not [i.name for i in left.graph.input if "past" in i.name] and len(left.graph.output) == 1


@pytest.mark.parametrize("family", llm_export.OPTIMUM_FAMILIES)
def test_zero_invariance_with_cache(export, family):
    a = spa.analyze(str(export(family)), simplify=True)
    plan = random_zi_plan(a, seed=2)
    assert any("past_key_values" in s[0] for gid in plan for s in a.group(gid).positions)
    pruned = spa.prune(a, plan)
    ports = kvcache.ports(a, dropped_positions(a, plan))
    model = as_model(a.model)
    feeds = random_feeds(model.proto, seed=0, shapes=check_shapes(model))
    zero = kvcache.fit(ort_backend.run(spa.api.zeroed(a, plan), feeds), ports)
    got = ort_backend.run(pruned, kvcache.fit(feeds, ports))
    for name, ref in zero.items():
        assert got[name].shape == ref.shape, name
        assert rel_err(ref, got[name]) <= 1e-4, (name, rel_err(ref, got[name]))
