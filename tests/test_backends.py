"""spa.backends: the Session interface (ORT, torch), the benchmark method, output parity, and the
`spa bench` / `spa compare` commands. GPU backends are exercised where their package and a GPU
exist; elsewhere their refusal (a one-line error naming the install) is what is tested."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from spa.backends import base, bench, compare
from spa.backends import ort as ort_backend

import spa
from spa.cli.app import main
from spa.core import runtime
from spa.core.errors import SpaError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_resnet.onnx"
RNG = np.random.default_rng(0)


def _linear_model(batch="N") -> onnx.ModelProto:
    """x[N,16] ─MatMul(W1, 2:4 along K)─▶ ─Gemm(W2ᵀ dense, transB, bias)─▶ ─MatMul(W3, 2:4)─▶ y[N,8]"""
    w1 = RNG.standard_normal((16, 32)).astype(np.float32)
    w1[(np.arange(16) % 4) >= 2] = 0  # rows along K: 2 of every 4 zero, for every output column
    w2 = RNG.standard_normal((24, 32)).astype(np.float32)  # [out, in] with transB: dense
    b2 = RNG.standard_normal(24).astype(np.float32)
    w3 = RNG.standard_normal((24, 8)).astype(np.float32)
    w3[(np.arange(24) % 4) < 2] = 0
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
             helper.make_node("Gemm", ["h1", "w2", "b2"], ["h2"], name="gemm", transB=1, beta=0.5),
             helper.make_node("MatMul", ["h2", "w3"], ["y"], name="mm3")]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8])],
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (b2, "b2"),
                                                                          (w3, "w3"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# the interface -------------------------------------------------------------------------------


def test_unknown_backend_and_precision_are_one_line_errors():
    with pytest.raises(SpaError, match="unknown backend 'tensorflow'.*choose one of ort"):
        base.open_session(EXAMPLE, "tensorflow")
    with pytest.raises(SpaError, match="unknown precision 'int4'"):
        base.open_session(EXAMPLE, "ort", base.Options(precision="int4"))


@pytest.mark.parametrize("backend", ["ort-cuda", "ort-trt"])
def test_gpu_providers_missing_name_the_install(backend):
    import onnxruntime as ort

    if ort_backend.PROVIDERS[backend] in ort.get_available_providers():
        pytest.skip("this onnxruntime has the provider")
    with pytest.raises(SpaError, match=r"needs .*ExecutionProvider.*pip install 'spa\[gpu\]'"):
        base.open_session(EXAMPLE, backend)


def test_torch_cuda_without_a_gpu_says_so():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SpaError, match="needs a CUDA GPU visible to torch.*CUDA build of torch"):
        base.open_session(EXAMPLE, "torch-cuda")


def test_trt_provider_options_follow_the_request(tmp_path):
    chain = ort_backend.provider_list("ort-trt", base.Options(precision="fp16", sparse=True, cache_dir=str(tmp_path)))
    name, opts = chain[0]
    assert name == "TensorrtExecutionProvider" and [c if isinstance(c, str) else c[0] for c in chain[1:]] == \
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert opts["trt_fp16_enable"] and opts["trt_sparsity_enable"] and opts["trt_engine_cache_enable"]
    assert opts["trt_engine_cache_path"] == opts["trt_timing_cache_path"] == str(tmp_path)
    assert not ort_backend.provider_list("ort-trt", base.Options())[0][1]["trt_fp16_enable"]


def test_isolated_load_turns_errors_and_crashes_into_reasons(monkeypatch):
    """A graph ONNX Runtime loads gives None; one it rejects gives its message; a crash of the
    loading process (as ORT 1.32's NCHWc optimiser segfaults on one FP16 graph) gives the signal."""
    assert ort_backend.load_error_isolated(_linear_model()) is None
    bad = _linear_model()
    bad.graph.node[0].input[1] = "nowhere"
    assert "nowhere" in ort_backend.load_error_isolated(bad)
    monkeypatch.setattr(runtime, "_LOAD", "import os; os.abort()")
    assert "crashed (SIGABRT)" in ort_backend.load_error_isolated(_linear_model())


def test_feeds_follow_batch_and_named_dims():
    inputs = [base.TensorInfo("ids", "int64", ["batch", "seq"]), base.TensorInfo("x", "float32", [None, 3, "h"]),
              base.TensorInfo("flag", "bool", [2])]
    feeds = base.feeds_for(inputs, 5, {"seq": 7})
    assert feeds["ids"].shape == (5, 7) and feeds["ids"].dtype == np.int64 and feeds["ids"].min() >= 0
    assert feeds["x"].shape == (5, 3, 1) and feeds["x"].dtype == np.float32
    assert feeds["flag"].shape == (2,) and feeds["flag"].dtype == np.bool_
    assert base.fixed_batch(inputs) is None
    assert base.fixed_batch([base.TensorInfo("x", "float32", [1, 3])]) == 1


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_sessions_agree_with_onnxruntime(backend):
    if backend == "torch":
        pytest.importorskip("torch")
    sess = base.open_session(EXAMPLE, backend)
    assert [i.name for i in sess.inputs] == ["input"] and sess.inputs[0].shape[0] == "batch"
    feeds = base.feeds_for(sess.inputs, 3)
    got, want = sess.run(feeds), ort_backend.run(str(EXAMPLE), feeds)
    np.testing.assert_allclose(got["output"], want["output"], rtol=1e-4, atol=1e-5)
    d = sess.describe()
    assert d["backend"] == backend and ("providers" in d if backend == "ort" else d["device"] == "cpu")
    assert sess.runner(feeds)() > 0


def test_torch_half_precision_returns_the_declared_dtype():
    pytest.importorskip("torch")
    sess = base.open_session(EXAMPLE, "torch", base.Options(precision="bf16"))
    feeds = base.feeds_for(sess.inputs, 2)
    got = sess.run(feeds)["output"]
    assert got.dtype == np.float32
    want = ort_backend.run(str(EXAMPLE), feeds)["output"]
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max() and not np.array_equal(got, want)


def test_semi_structured_takes_exactly_the_2_4_layers():
    """MatMul weights holding 2:4 along K run as F.linear(x, W[out, in]); the dense Gemm stays;
    with an identity conversion the outputs are ONNX Runtime's."""
    pytest.importorskip("torch")
    from spa.backends.torch_exec import semi_structured

    from spa.torch import OnnxModule

    proto = _linear_model()
    module = OnnxModule(proto).eval()
    seen = []
    found = semi_structured(module, convert=lambda t: seen.append(tuple(t.shape)) or t.clone())
    assert found["sparse"] == ["mm1", "mm3"] and "does not hold 2:4" in found["dense"]["gemm"]
    assert seen == [(32, 16), (8, 24)]  # [out, in], as to_sparse_semi_structured takes them
    x = RNG.standard_normal((5, 16)).astype(np.float32)
    import torch

    with torch.no_grad():
        got = module.run({"x": torch.from_numpy(x)})["y"].numpy()
    np.testing.assert_allclose(got, ort_backend.run(proto, {"x": x})["y"], rtol=1e-4, atol=1e-5)


def test_a_refused_conversion_keeps_the_layer_dense():
    pytest.importorskip("torch")
    from spa.backends.torch_exec import semi_structured

    from spa.torch import OnnxModule

    def refuse(t):
        raise RuntimeError("shape must be a multiple of 64\nmore")

    found = semi_structured(OnnxModule(_linear_model()), convert=refuse)
    assert found["sparse"] == [] and found["dense"]["mm1"] == "refused by the sparse kernels: shape must be a " \
        "multiple of 64"


# the benchmark method ----------------------------------------------------------------------


def test_stats_are_the_percentiles_of_the_times():
    s = bench.stats([float(v) for v in range(1, 101)], batch=4)
    lat = s["latency_ms"]
    assert (lat["min"], lat["max"], s["iterations"]) == (1.0, 100.0, 100)
    assert lat["mean"] == pytest.approx(50.5) and lat["p50"] == pytest.approx(50.5)
    assert lat["p90"] == pytest.approx(90.1) and lat["p99"] == pytest.approx(99.01)
    assert s["throughput"] == pytest.approx(4 * 1000 / 50.5)


class _Fake:
    clock = "fake"

    def __init__(self, name, ms, log):
        self.name, self.ms, self.log = name, ms, log

    def __call__(self):
        self.log.append(self.name)
        return self.ms


def test_measure_takes_turns_and_times_each_model_for_the_duration():
    log = []
    runners = [_Fake("a", 2.0, log), _Fake("b", 5.0, log)]
    res = bench.measure(runners, 1, bench.Plan(warmup_ms=0, duration_s=0.05, min_iterations=3, slice_s=0.0))
    # a: 25 timed runs of 2 ms, b: 10 of 5 ms (one per slice: slices of 0 s)
    assert [r["iterations"] for r in res] == [25, 10]
    assert res[0]["latency_ms"]["p50"] == 2.0 and res[1]["latency_ms"]["max"] == 5.0
    # warm-ups; round 1: each re-warmed once after the others' warm-up, then timed; round 2 starts with b
    # (no re-warm: a run longer than a slice is not worth repeating)
    assert log[:8] == ["a", "b", "a", "a", "b", "b", "b", "a"]
    rows = [dict(r) for r in res]
    bench.speedups(rows)
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] == pytest.approx(0.4)


def test_environment_names_the_machine():
    env = bench.environment()
    assert env["cores"] >= 1 and env["cpu"] and env["onnxruntime"] and env["spa"]


# output parity -----------------------------------------------------------------------------


class _Outputs:
    def __init__(self, outputs: dict):
        self.outputs = [base.TensorInfo(k, str(v.dtype), list(v.shape)) for k, v in outputs.items()]
        self.values = outputs

    def run(self, feeds):
        return self.values


def test_parity_uses_allclose_rule_and_cosine():
    b = np.array([1.0, -2.0, 100.0], dtype=np.float32)
    a = b + np.array([5e-5, 0, 0.09], dtype=np.float32)  # inside 1e-4 + 1e-3*|b| everywhere
    r = compare.compare(_Outputs({"y": a}), _Outputs({"y": b}), [{"x": np.zeros(1)}], atol=1e-4, rtol=1e-3)
    assert r["pass"] and r["outputs"]["y"]["outside_tolerance"] == 0
    assert r["outputs"]["y"]["max_abs"] == pytest.approx(0.09, rel=1e-3)
    a[1] = -2.01
    r = compare.compare(_Outputs({"y": a}), _Outputs({"y": b}), [{"x": np.zeros(1)}], atol=1e-4, rtol=1e-3)
    assert not r["pass"] and r["outputs"]["y"]["outside_tolerance"] == 1
    r = compare.compare(_Outputs({"y": b}), _Outputs({"y": b}), [{"x": np.zeros(1)}], atol=0, rtol=0, min_cosine=1.1)
    assert not r["pass"] and r["outputs"]["y"]["cosine"] == pytest.approx(1.0)


def test_parity_of_integer_outputs_shapes_and_names():
    ints = np.array([1, 2, 3])
    r = compare.compare(_Outputs({"i": ints}), _Outputs({"i": ints + (ints == 3)}), [{}], atol=1.0, rtol=1.0)
    assert not r["pass"] and r["outputs"]["i"]["outside_tolerance"] == 1  # no tolerance for integers
    r = compare.compare(_Outputs({"y": np.zeros(3)}), _Outputs({"y": np.zeros(4)}), [{}], atol=1, rtol=1)
    assert not r["pass"] and "shapes differ" in r["outputs"]["y"]["reason"]
    r = compare.compare(_Outputs({"p": np.ones(2)}), _Outputs({"q": np.ones(2)}), [{}], atol=0, rtol=0)
    assert r["pass"] and r["notes"] == ["no output names in common: outputs matched by position"]
    r = compare.compare(_Outputs({"p": np.ones(2)}), _Outputs({"q": np.ones(2), "r": np.ones(1)}), [{}], atol=0, rtol=0)
    assert not r["pass"] and r["outputs"] == {}


# the commands ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "half.onnx"
    assert main(["prune", str(EXAMPLE), "--ratio", "0.5", "-o", str(out), "--json"]) == 0
    return out


def _fixed_batch_copy(tmp_path) -> Path:
    proto = onnx.load(str(EXAMPLE))
    for v in list(proto.graph.input) + list(proto.graph.output):
        v.type.tensor_type.shape.dim[0].dim_value = 2
    path = tmp_path / "fixed2.onnx"
    onnx.save(proto, str(path))
    return path


def test_bench_json_contract(pruned, tmp_path, capsys):
    fixed = _fixed_batch_copy(tmp_path)
    out = tmp_path / "bench.json"
    code = main(["bench", str(EXAMPLE), str(pruned), str(fixed), "--batch", "1,2", "--duration-s", "0.2",
                 "--warmup-ms", "20", "--min-iterations", "3", "-o", str(out), "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads(out.read_text())
    assert doc["schema_version"] == 1 and doc["backend"] == "ort" and doc["environment"]["cores"] >= 1
    assert [m["label"] for m in doc["models"]] == ["tiny_resnet.onnx", "half.onnx", "fixed2.onnx"]
    assert doc["models"][1]["macs"] < doc["models"][0]["macs"]
    rows = {(Path(r["model"]).name, r["batch"]): r for r in doc["results"]}
    assert len(rows) == 6
    assert rows[("fixed2.onnx", 1)]["skipped"] == "the model's batch size is fixed to 2"
    assert rows[("fixed2.onnx", 1)]["latency_ms"] is None and rows[("fixed2.onnx", 2)]["skipped"] is None
    for batch in (1, 2):
        first = rows[("tiny_resnet.onnx", batch)]
        assert first["speedup"] == 1.0 and first["iterations"] >= 3 and first["clock"] == "host"
        lat = rows[("half.onnx", batch)]["latency_ms"]
        assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert rows[("half.onnx", batch)]["throughput"] == pytest.approx(batch * 1e3 / lat["mean"])


def test_bench_min_speedup_is_a_gate(pruned, capsys):
    argv = ["bench", str(EXAMPLE), str(pruned), "--duration-s", "0.05", "--warmup-ms", "0", "--json"]
    assert main(argv + ["--min-speedup", "1000"]) == 3
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["min_speedup"]["failed"][0].startswith("half.onnx at batch 1: ")
    assert "speed-up below 1000x: half.onnx at batch 1" in captured.err
    assert main(argv + ["--min-speedup", "0.001"]) == 0


def test_bench_table_on_stdout(pruned, capsys):
    assert main(["bench", str(EXAMPLE), str(pruned), "--duration-s", "0.1", "--warmup-ms", "0"]) == 0
    text = capsys.readouterr().out
    assert "half.onnx" in text and "speed-up" in text and "1.00x" in text


@pytest.mark.parametrize("argv,message,code", [
    (["bench", "nope.onnx"], "cannot read model 'nope.onnx': no such file", 1),
    (["bench", str(EXAMPLE), "--batch", "1,x"], "bad --batch '1,x'", 2),
    (["bench", str(EXAMPLE), "--dim", "seq"], "bad --dim 'seq'", 2),
    (["bench", str(EXAMPLE), "--backend", "torch-cuda"], "needs", 1),
    (["bench", str(EXAMPLE), "-o", "/nonexistent/dir/b.json"], "cannot write", 1),
    (["compare", str(EXAMPLE)], "nothing to compare", 2),
    (["compare", str(EXAMPLE), str(EXAMPLE), "--data", "missing.npz"], "cannot read data 'missing.npz'", 1),
])
def test_bad_input_is_one_line_and_exit_1(argv, message, code, capsys):
    """Runtime refusals exit 1; bad option values and combinations are usage errors (exit 2)."""
    if "torch-cuda" in argv:
        torch = pytest.importorskip("torch")
        if torch.cuda.is_available():
            pytest.skip("a GPU is here")
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1


def test_compare_is_a_ci_gate(pruned, tmp_path, capsys):
    assert main(["compare", str(EXAMPLE), str(EXAMPLE), "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["pass"] and same["outputs"]["output"]["max_abs"] == 0.0
    assert main(["compare", str(EXAMPLE), str(pruned), "--json"]) == 3
    diff = json.loads(capsys.readouterr().out)
    assert not diff["pass"] and diff["outputs"]["output"]["outside_tolerance"] > 0
    assert main(["compare", str(EXAMPLE), str(pruned), "--atol", "100", "--json"]) == 0  # loose enough: passes
    capsys.readouterr()
    data = tmp_path / "data.npz"
    np.savez(data, input=RNG.standard_normal((10, 3, 32, 32)).astype(np.float32))
    assert main(["compare", str(EXAMPLE), str(EXAMPLE), "--data", str(data), "--batch", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["samples"] == 10 and doc["outputs"]["output"]["elements"] == 100
    np.savez(data, other=np.zeros(3))
    assert main(["compare", str(EXAMPLE), str(EXAMPLE), "--data", str(data)]) == 1
    assert "input" in capsys.readouterr().err


TIMED = ("latency_ms", "throughput", "iterations", "speedup")


def _untimed(doc: dict) -> dict:
    """A bench document without what differs run to run (times, the date)."""
    return {**doc, "environment": {k: v for k, v in doc["environment"].items() if k != "date"},
            "results": [{k: v for k, v in r.items() if k not in TIMED} for r in doc["results"]],
            "min_speedup": doc["min_speedup"] and {**doc["min_speedup"], "failed": None}}


def test_bench_api_document_is_the_commands(pruned, tmp_path, capsys):
    """spa.api.bench.bench without the CLI: the document `spa bench --json` prints (times aside),
    written to output=, with the --min-speedup verdict in the document and result.check()."""
    from spa.api.bench import bench as api_bench
    from spa.core.errors import VerificationError

    fast = ["--duration-s", "0.05", "--warmup-ms", "0", "--min-iterations", "2"]
    assert main(["bench", str(EXAMPLE), str(pruned), "--batch", "1,2", *fast, "--min-speedup", "1000", "--json"]) == 3
    cli_doc = json.loads(capsys.readouterr().out)
    out = tmp_path / "b.json"
    result = api_bench([str(EXAMPLE), str(pruned)], batch=[1, 2], duration_s=0.05, warmup_ms=0, min_iterations=2,
                       min_speedup=1000, output=out)
    assert _untimed(result.to_json()) == _untimed(cli_doc) and json.loads(out.read_text()) == result.to_json()
    assert result.failure.startswith("speed-up below 1000x: half.onnx at batch 1")
    with pytest.raises(VerificationError, match="speed-up below 1000x"):
        result.check()
    single = api_bench(onnx.load(str(EXAMPLE)), duration_s=0.02, warmup_ms=0, min_iterations=1)
    assert single.check() is single and single["models"][0]["path"] is None and single["results"][0]["speedup"] == 1


def test_compare_api_document_is_the_commands(pruned, tmp_path, capsys):
    """spa.api.bench.compare without the CLI: the same document as `spa compare --json`; a
    failed tolerance is the verdict in the document (exit 3), not an exception."""
    from spa.api.bench import compare as api_compare

    data = tmp_path / "data.npz"
    arrays = {"input": RNG.standard_normal((6, 3, 32, 32)).astype(np.float32)}
    np.savez(data, **arrays)
    assert main(["compare", str(EXAMPLE), str(pruned), "--data", str(data), "--batch", "4", "--json"]) == 3
    cli_doc = json.loads(capsys.readouterr().out)
    result = api_compare(str(EXAMPLE), str(pruned), data=str(data), batch=4)
    assert result.to_json() == cli_doc and result.failure == "outputs outside the tolerance: output"
    in_memory = api_compare(str(EXAMPLE), str(pruned), data=arrays, batch=4)
    assert in_memory["outputs"] == cli_doc["outputs"] and in_memory["inputs"] == "data (6 samples)"
    assert api_compare(str(EXAMPLE), str(EXAMPLE)).check()["pass"]


@pytest.mark.parametrize("call, says", [
    (lambda f: f["bench"](str(EXAMPLE), batch="1,0"), "bad batch='1,0'"),
    (lambda f: f["bench"](str(EXAMPLE), duration_s=0), "invalid duration_s=0"),
    (lambda f: f["bench"](str(EXAMPLE), backend="tpu"), "invalid backend='tpu'"),
    (lambda f: f["compare"](str(EXAMPLE)), "nothing to compare"),
    (lambda f: f["compare"](str(EXAMPLE), str(EXAMPLE), atol=-1), "invalid atol=-1"),
    (lambda f: f["compare"](str(EXAMPLE), str(EXAMPLE), samples=0), "invalid samples=0"),
])
def test_api_bad_values_are_usage_errors(call, says):
    with pytest.raises(spa.UsageError, match=re.escape(says)):
        call({"bench": spa.bench, "compare": spa.compare})


def test_cli_bad_values_exit_2_naming_the_flag(capsys):
    assert main(["bench", str(EXAMPLE), "--duration-s", "0"]) == 2
    assert "invalid --duration-s 0" in capsys.readouterr().err
    assert main(["compare", str(EXAMPLE), str(EXAMPLE), "--samples", "0"]) == 2
    assert "invalid --samples 0" in capsys.readouterr().err


def test_compare_one_model_on_two_backends(capsys):
    pytest.importorskip("torch")
    assert main(["compare", str(EXAMPLE), "--backend-b", "torch", "--batch", "3"]) == 0
    text = capsys.readouterr().out
    assert "(ort) vs" in text and "(torch)" in text and "PASS" in text


def test_gpu_table_script_runs_its_pipeline_on_the_cpu(tmp_path, capsys):
    """tools/bench_gpu.py (the one-go GPU table) with the CPU torch backend on the example model:
    the three variants are built by the CLI and benchmarked at every batch."""
    pytest.importorskip("torch")
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", EXAMPLE.parents[1] / "tools" / "bench_gpu.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--backend", "torch", "--precision", "fp32", "--models", "tiny", "--batches", "1,2",
                      "--duration-s", "0.05", "--out-dir", str(tmp_path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny |")]
    assert [r.split("|")[3].strip() for r in rows] == ["dense", "2:4", "pruned"] * 2
    doc = json.loads((tmp_path / "gpu_tiny.json").read_text())
    assert doc["backend"] == "torch" and doc["options"]["sparse"] and len(doc["results"]) == 6
    from spa.passes.sparsify import layers

    import spa

    found = [x for x in layers(spa.load(tmp_path / "tiny_resnet.2x4.onnx").proto, 2, 4) if x.eligible]
    assert found and all(x.holds for x in found)


def test_the_ci_gate_steps_of_the_docs(pruned, tmp_path, capsys):
    """docs/ci-gate.md's steps on the example model: a cosine-only parity gate, a speed gate, the
    report; each verdict is the exit code."""
    doc = (EXAMPLE.parents[1] / "docs" / "ci-gate.md").read_text()
    assert "--atol inf --min-cosine 0.99" in doc and "--min-speedup 1.3" in doc
    data = tmp_path / "val.npz"
    np.savez(data, input=RNG.standard_normal((8, 3, 32, 32)).astype(np.float32))
    gate = ["compare", str(EXAMPLE), str(pruned), "--data", str(data), "--atol", "inf", "--json"]
    assert main(gate + ["--min-cosine", "-1"]) == 0  # any cosine passes
    cosine = json.loads(capsys.readouterr().out)["outputs"]["output"]["cosine"]
    assert cosine < 0.99  # random weights pruned by half: far from the dense outputs
    assert main(gate + ["--min-cosine", "0.99"]) == 3
    capsys.readouterr()
    bench_json = tmp_path / "bench.json"
    assert main(["bench", str(EXAMPLE), str(pruned), "--duration-s", "0.05", "--warmup-ms", "0",
                 "--min-speedup", "0.01", "-o", str(bench_json)]) == 0
    pytest.importorskip("matplotlib")
    report = tmp_path / "report.html"
    assert main(["report", str(EXAMPLE), str(pruned), "--bench", str(bench_json), "--data", str(data),
                 "-o", str(report)]) == 0
    assert "half.onnx" in report.read_text()


def test_cli_sessions_share_one_arena(tmp_path, monkeypatch):
    """The CLI turns on one CPU arena for all its sessions (ONNX Runtime's environment allocator):
    the sessions then run with `session.use_env_allocators` and give the same outputs."""
    import subprocess
    import sys

    import spa.core

    path = tmp_path / "m.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])), path)
    feed = {"x": np.array([[-1, 2, -3], [4, -5, 6]], dtype=np.float32)}
    own = runtime.session(str(path)).run(None, feed)[0]
    monkeypatch.setattr(spa.core, "SHARED_ARENA", True)
    assert runtime.shared_arena() is True  # this ONNX Runtime has environment allocators
    shared = runtime.session(str(path))
    np.testing.assert_array_equal(shared.run(None, feed)[0], own)
    assert shared.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"
    code = "import spa.core; from spa.cli.app import main; main(['analyze', %r]); print(spa.core.SHARED_ARENA)"
    out = subprocess.run([sys.executable, "-c", code % str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "True"
