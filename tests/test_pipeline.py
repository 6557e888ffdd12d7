"""The whole pipeline from Python, without the CLI, gives what each command prints with --json.

    digits CNN ─load─▶ analyze ─plan (obspa, calibrated)─▶ prune ─▶ sparsify (obs) ─▶ quantize (int8)
               ─▶ evaluate ─▶ bench (ort) ─▶ compare ─▶ report

The Python side runs in a child process that never imports spa.cli (it checks sys.modules at the
end); the CLI side runs the same commands with --json in another folder holding the same
inputs. Paths are relative, so the documents match key for key; only measured latencies and
the recorded environment (date, loaded modules) differ between two runs: blanked on both sides.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spa.cli.app import main

pytest.importorskip("torch")
pytest.importorskip("sklearn")
from models import digits

# measured, or a fact about the running process (bench's environment lists torch when it is loaded)
RUN_DEPENDENT = {"latency_ms", "throughput", "speedup", "iterations", "p50", "p90", "p95", "p99", "mean", "min",
                 "max", "seconds", "environment", "float_cpu_s", "int8_cpu_s", "cpu_s_per_run"}
TIMED_WARNING = "as fast as float32"  # spa quantize's warning when INT8 measured slower than float here
BENCH = ["--batch", "1", "--warmup-ms", "5", "--duration-s", "0.05", "--min-iterations", "3"]

# each step: (name, CLI argv); the Python side below makes the same calls
COMMANDS = [
    ("analyze", ["analyze", "cnn.onnx", "--json"]),
    ("prune", ["prune", "cnn.onnx", "--ratio", "0.3", "--criterion", "obspa", "--calib", "calib.npz",
               "--save-plan", "plan.json", "-o", "p.onnx", "--json"]),
    ("sparsify", ["sparsify", "p.onnx", "--method", "obs", "--calib", "calib.npz", "--min-size", "8", "-o", "s.onnx",
                  "--json"]),
    ("quantize", ["quantize", "s.onnx", "--calib", "calib.npz", "-o", "q.onnx", "--json"]),
    ("evaluate", ["eval", "q.onnx", "--data", "test.npz", "--labels", "labels", "--reference", "cnn.onnx", "--json"]),
    ("bench", ["bench", "cnn.onnx", "p.onnx", *BENCH, "-o", "bench.json", "--json"]),
    ("compare", ["compare", "cnn.onnx", "q.onnx", "--data", "test.npz", "--atol", "inf", "--min-cosine", "0.5",
                 "--json"]),
    ("report", ["report", "cnn.onnx", "p.onnx", "--bench", "bench.json", "-o", "report.html", "--json"]),
]

PIPELINE = """
import json, sys
import spa

docs = {}
model = spa.load("cnn.onnx")
analysis = spa.analyze(model)
docs["analyze"] = analysis.to_json()
stats = spa.statistics(analysis, calib=spa.load_npz("calib.npz"))
docs["plan"] = spa.make_plan(analysis, 0.3, "obspa", stats=stats)
pruned = spa.prune("cnn.onnx", ratio=0.3, criterion="obspa", calib="calib.npz", save_plan="plan.json",
                   output="p.onnx")
docs["prune"] = pruned.to_json()
sparse = spa.sparsify("p.onnx", method="obs", calib="calib.npz", min_size=8, output="s.onnx")
docs["sparsify"] = sparse.to_json()
docs["quantize"] = spa.quantize("s.onnx", calib="calib.npz", output="q.onnx").to_json()
docs["evaluate"] = spa.evaluate("q.onnx", "test.npz", "labels", reference="cnn.onnx").to_json()
docs["bench"] = spa.bench(["cnn.onnx", "p.onnx"], batch=[1], warmup_ms=5, duration_s=0.05, min_iterations=3,
                          output="bench.json").to_json()
docs["compare"] = spa.compare("cnn.onnx", "q.onnx", data="test.npz", atol=float("inf"), min_cosine=0.5).to_json()
docs["report"] = spa.report("cnn.onnx", ["p.onnx"], bench="bench.json", output="report.html").to_json()
docs["in_memory"] = spa.sparsify(pruned.model, method="obs", calib="calib.npz", min_size=8).to_json()
assert "spa.cli" not in sys.modules, "the Python pipeline imported the CLI"
json.dump(docs, open("docs.json", "w"))
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two folders with the same inputs: a briefly trained digits CNN, calibration and test data."""
    base = tmp_path_factory.mktemp("pipeline")
    model, _ = digits.train("cnn", epochs=3)
    data = digits.load_data()
    cli, api = base / "cli", base / "api"
    cli.mkdir()
    digits.export("cnn", cli / "cnn.onnx", "torchscript", model=model)
    np.savez(cli / "calib.npz", x=data["x_train"][:128])
    np.savez(cli / "test.npz", x=data["x_test"][:128], labels=data["y_test"][:128])
    shutil.copytree(cli, api)
    return cli, api


def blank_timings(doc):
    """`doc` with every measured time (latencies, throughput) and the environment set to None."""
    if isinstance(doc, dict):
        return {k: None if k in RUN_DEPENDENT else blank_timings(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [blank_timings(v) for v in doc if not (isinstance(v, str) and TIMED_WARNING in v)]
    return doc


def cli_docs(folder: Path, capsys, monkeypatch) -> dict:
    monkeypatch.chdir(folder)
    docs = {}
    for name, argv in COMMANDS:
        capsys.readouterr()
        assert main(argv) == 0, capsys.readouterr().err
        docs[name] = json.loads(capsys.readouterr().out)
    docs["plan"] = json.loads((folder / "plan.json").read_text())["groups"]
    return docs


def api_docs(folder: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", PIPELINE], cwd=folder, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((folder / "docs.json").read_text())


def test_python_pipeline_equals_the_cli(folders, capsys, monkeypatch):
    cli_folder, api_folder = folders
    cli = cli_docs(cli_folder, capsys, monkeypatch)
    api = api_docs(api_folder)
    for name, _ in COMMANDS:
        assert blank_timings(api[name]) == blank_timings(cli[name]), name
    assert api["plan"] == cli["plan"]  # spa.make_plan == the plan spa prune saved
    assert cli["prune"]["channels_removed"] > 0 and cli["sparsify"]["eligible"] > 0
    assert cli["evaluate"]["accuracy"] > 0.5  # a useful model comes out of the chain
    for name in ("p.onnx", "s.onnx", "q.onnx", "report.html", "bench.json"):
        assert (api_folder / name).is_file(), name
    memory = api["in_memory"]  # a ModelProto in: the same masking, no paths
    assert memory["input"] is None and memory["output"] is None
    assert memory["layers"] == api["sparsify"]["layers"]


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_resnet.onnx"


@pytest.mark.parametrize("kind", ["proto", "Model"])
def test_models_in_memory_are_taken_and_never_changed(kind, tmp_path):
    """Every command takes a ModelProto or a spa.Model, and leaves the caller's object as it was
    (analysis unties shared constants and pruning drops weights: on a copy)."""
    import onnx

    import spa

    model = onnx.load(str(EXAMPLE)) if kind == "proto" else spa.load(EXAMPLE)
    proto = model if kind == "proto" else model.proto
    before = proto.SerializeToString()
    calib = {"input": np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)}
    pruned = spa.prune(model, ratio=0.5)
    assert pruned.to_json()["input"] == (None if kind == "proto" else str(EXAMPLE))  # a spa.Model has its path
    assert pruned.to_json()["channels_removed"] > 0
    assert spa.sparsify(model, min_size=8).to_json()["eligible"] > 0
    assert spa.quantize(model, calib=calib).to_json()["coverage"]["quantized"] > 0
    assert [s["stage"] for s in spa.compress(model, ratio=0.5, fp16=True).to_json()["stages"]] == \
        ["input", "pruned", "fp16"]
    assert spa.sensitivity(model, calib, ratios=[0.5]).to_json()["groups"]
    assert spa.evaluate(model, calib, reference=pruned.model)["samples"] == 8
    page = spa.report(model, pruned.model, output=tmp_path / "r.html").to_json()
    # models in memory are written for the page as model<i>.onnx (a spa.Model as it is in memory, not its file)
    assert page["models"] == ["model0.onnx (dense)", "model1.onnx"] and (tmp_path / "r.html").is_file()
    assert proto.SerializeToString() == before


def test_prune_is_the_command_and_the_single_step():
    """spa.prune(model, ratio=...) is `spa prune` (a Result); spa.prune(analysis, plan) applies a plan
    (a ModelProto); command options with an Analysis are a usage error, not silently ignored."""
    import inspect

    import onnx

    import spa

    assert {"ratio", "criterion", "calib", "output", "progress"} <= set(inspect.signature(spa.prune).parameters)
    analysis = spa.analyze(EXAMPLE)
    plan = spa.make_plan(analysis, 0.5)
    assert isinstance(spa.prune(analysis, plan), onnx.ModelProto)
    command = spa.prune(EXAMPLE, plan=plan)
    assert command.to_json()["channels_removed"] == sum(map(len, plan.values()))
    with pytest.raises(spa.UsageError, match="round_to go with a model"):
        spa.prune(analysis, plan, round_to=8)
