"""Decoder LLMs as the ONNX Runtime GenAI model builder exports them (models/llm_export.py):
GroupQueryAttention with packed QKV and rotary caches, a KV cache in the graph's inputs and
outputs that follows the pruning, genai_config.json updated, and the generator run."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from spa.backends import ort as ort_backend

import spa
from spa import api
from spa.api.result import as_model
from spa.core import depth, kvcache
from spa.core.blocks import attention_blocks
from spa.core.checks import check_shapes
from spa.core.cost import dropped_positions
from spa.core.runtime import random_feeds
from tests.oracles import assert_erasure, random_zi_plan, rel_err

pytest.importorskip("onnxruntime_genai")
pytest.importorskip("transformers")

from models import llm_export

FP32 = ("llama", "qwen2", "phi3", "mistral", "gemma")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    made = {}

    def get(family: str, precision: str = "fp32"):
        if (family, precision) not in made:
            hf = root / "hf" / family
            if not hf.exists():
                llm_export.save_hf(family, hf)
            made[family, precision] = llm_export.genai(hf, root / precision / family, precision) / "model.onnx"
        return made[family, precision]

    return get


def _groups(analysis) -> dict:
    return {g.id: g for g in analysis.groups}


def test_gqa_groups(exports):
    a = spa.analyze(str(exports("llama")))
    groups = _groups(a)
    kv = groups["past_key_values.0.key:1"]  # KV heads: the cache's head axis, every layer alike
    assert kv.prunable and kv.zero_invariant and kv.size == 4
    members = {m.tensor for m in kv.members}
    assert {"model.layers.0.attn.qkv_proj.MatMul.weight", "model.layers.1.attn.o_proj.MatMul.weight"} <= members
    rotary = groups["cos_cache:1"]  # head_dim in rotary pairs, shared by both layers through the caches
    assert rotary.size == 16 and rotary.multiple == 8 and rotary.prunable
    assert all(len(p) == 2 for p in rotary.positions[("/model/layers.0/attn/GroupQueryAttention/output_0::head_dim",
                                                       0)])
    rep = [g for g in a.groups if "q_per_kv" in g.id]
    assert len(rep) == 1 and rep[0].size == 2 and rep[0].prunable


def test_freeze_io_locks_the_cache(exports):
    frozen = spa.analyze(str(exports("llama")), freeze_io=True)
    kv = _groups(frozen)["past_key_values.0.key:1"]
    assert not kv.prunable and "--freeze-io" in kv.reason
    blocks = attention_blocks(frozen)
    assert blocks and "--freeze-io" in blocks[0].kv_heads.fixed and "--freeze-io" in blocks[0].head_dim.fixed
    assert blocks[0].heads.fixed is None  # query heads per KV head still prune



@pytest.mark.parametrize("family,precision", [(f, "fp32") for f in FP32] + [("llama", "int4")])
def test_erasure_through_the_fused_residual_norm(exports, family, precision):
    """GenAI fuses each residual into SkipSimplifiedLayerNormalization: its branch is a unit (an
    attention with its cache pair, or an MLP), exact where its projection is float."""
    model = spa.load(exports(family, precision))
    units, rejected = depth.find(model)
    assert {u.kind for u in units} == {"attention", "mlp"} and not rejected
    assert all(len(u.cache) == 4 for u in units if u.kind == "attention")
    feeds = random_feeds(model.proto, seed=0, shapes=check_shapes(model))
    exact = assert_erasure(model, feeds)
    assert exact == (len(units) if precision == "fp32" else 0)  # int4: MatMulNBits is no zeroable weight


def test_erased_attention_runs_in_the_generator(exports, tmp_path):
    src = exports("llama")
    first = next(u for u in spa.analyze(str(src)).units[0] if u.kind == "attention")
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    doc = spa.prune(str(src), plan={"schema_version": 1, "groups": {}, "erase": [first.id]}, output=str(out)).to_json()
    assert doc["check"]["status"] == "ok" and doc["depth"]["cache"]["removed"][0] == "past_key_values.0.key"
    assert doc["configs"]["generator"]["status"] == "ok" and doc["configs"]["generator"]["tokens"] == 16
    cfg = json.loads((out.parent / "genai_config.json").read_text())["model"]["decoder"]
    assert cfg["num_hidden_layers"] == json.loads((src.parent / "genai_config.json").read_text())["model"][
        "decoder"]["num_hidden_layers"] - 1
    plain = [n.op_type for n in onnx.load(str(out)).graph.node if n.output[0] == first.id]
    assert plain == ["SimplifiedLayerNormalization"]


@pytest.mark.parametrize("family", FP32)
def test_zero_invariance_with_cache(exports, family):
    """Pruned == dense with the dropped slices zeroed, the pruned model fed the cache cut alike."""
    model = as_model(str(exports(family)))
    a = spa.analyze(model)
    plan = random_zi_plan(a, seed=1)
    for g in a.groups:  # keep each group's multiple (the head size in steps of 16)
        if g.id in plan and g.multiple > 1:
            plan[g.id] = plan[g.id][:g.size - g.multiple]
    plan = {k: v for k, v in plan.items() if v}
    assert any("past_key_values" in k for k in plan)
    pruned = api.prune(a, plan)
    ports = kvcache.ports(a, dropped_positions(a, plan))
    assert ports, "the cache follows the pruning"
    feeds = random_feeds(model.proto, seed=0, shapes=check_shapes(model))
    zero = kvcache.fit(ort_backend.run(api.zeroed(a, plan), feeds), ports)
    got = ort_backend.run(pruned, kvcache.fit(feeds, ports))
    for name, ref in zero.items():
        assert got[name].shape == ref.shape, name
        assert rel_err(ref, got[name]) <= 1e-4, (family, name, rel_err(ref, got[name]))


@pytest.mark.parametrize("family, precision", [("llama", "fp32"), ("qwen2", "int4"), ("gemma", "int4")])
def test_prune_folder_runs_in_the_generator(exports, tmp_path, family, precision):
    src = exports(family, precision)
    out = tmp_path / "pruned" / "model.onnx"
    out.parent.mkdir()
    doc = spa.prune(str(src), ratio=0.5, output=str(out)).to_json()
    assert doc["check"]["status"] == "ok" and "empty_cache" in doc["check"]
    assert doc["io_changed"] and all(c["after"][1] == 2 for c in doc["io_changed"])  # 4 -> 2 KV heads
    cfg = json.loads((out.parent / "genai_config.json").read_text())["model"]["decoder"]
    assert cfg["num_key_value_heads"] == 2
    assert (out.parent / "tokenizer.json").exists()
    gqa = [n for n in onnx.load(str(out), load_external_data=False).graph.node if n.op_type == "GroupQueryAttention"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert attrs["kv_num_heads"] == 2 and attrs["num_heads"] in (2, 4) and cfg["num_attention_heads"] == attrs["num_heads"]
    if precision == "fp32":  # head size 32 -> 16: written in the config, scale kept at 1/sqrt(32)
        assert cfg["head_size"] == 16 and abs(attrs["scale"] - 32 ** -0.5) < 1e-6
    gen = doc["configs"]["generator"]
    assert gen["status"] == "ok" and gen["tokens"] == 16
    assert all(0 <= t < llm_export.VOCAB for t in gen["output"])
    src_cfg = json.loads((src.parent / "genai_config.json").read_text())["model"]["decoder"]
    assert src_cfg["num_key_value_heads"] == 4  # the input folder is left as it was


def test_int4_mlp_prunes_in_whole_blocks(exports, tmp_path):
    src = exports("llama", "int4")
    a = spa.analyze(str(src))
    mlp = [g for g in a.groups if "gate_proj" in g.id]
    assert mlp and all(g.size == 512 // 32 for g in mlp)  # one channel per quantization block
    out = tmp_path / "m.onnx"
    spa.prune(str(src), ratio=0.5, output=str(out))
    down = next(n for n in onnx.load(str(out)).graph.node if n.name.endswith("layers.0/mlp/down_proj/MatMul_Q4"))
    attrs = {x.name: onnx.helper.get_attribute_value(x) for x in down.attribute}
    assert attrs["K"] == 256 and attrs["K"] % attrs["block_size"] == 0


def test_configs_skipped_beside_the_input(exports, tmp_path):
    import shutil

    folder = tmp_path / "f"
    shutil.copytree(exports("llama").parent, folder)
    before = (folder / "genai_config.json").read_text()
    doc = spa.prune(str(folder / "model.onnx"), ratio=0.5, output=str(folder / "small.onnx")).to_json()
    assert "skipped" in doc["configs"] and (folder / "genai_config.json").read_text() == before


def test_decoder_feeds_are_consistent(exports):
    model = as_model(str(exports("llama")))
    feeds = random_feeds(model.proto, seed=3, shapes=check_shapes(model))
    assert (feeds["attention_mask"] == 1).all()
    assert feeds["attention_mask"].shape[1] == feeds["input_ids"].shape[1] + feeds["past_key_values.0.key"].shape[2]
    assert feeds["past_key_values.0.key"].shape[3] == 32  # the builder's symbolic 'kv_cache_dim', from the graph
    assert feeds["input_ids"].max() < llm_export.VOCAB and np.unique(feeds["input_ids"]).size > 1
