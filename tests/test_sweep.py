"""spa sweep: a grid of prune options over models, evaluated and timed, as one table; the
executor options of the sweeping commands (Ray itself: tests/test_ray.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import spa
from spa.core.errors import SpaError, UsageError
from tests.test_cli import assert_clean_error, assert_untouched, snapshot, spa_proc
from tests.test_cli import spa as run_cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMED = "p50_ms@"


def spec(**extra) -> dict:
    return {"models": [str(EXAMPLES / "digits_cnn.onnx")], "calib": str(EXAMPLES / "digits_calib.npz"),
            "data": str(EXAMPLES / "digits_test.npz"), "grid": {"ratio": [0.2, 0.5], "criterion": ["l1", "obspa"]},
            **extra}


def untimed(doc: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMED)} for r in doc["rows"]]


def test_grid_rows_judge_the_task():
    """One row per grid point and one for the model as given; accuracy on the data next to params
    and MACs; obspa keeps more accuracy than l1 at the same size (the table is what decides)."""
    doc = spa.sweep(spec()).to_json()
    assert doc["tasks"] == 5 and doc["failed"] == 0 and doc["steps"] == ["prune", "eval"]
    rows = doc["rows"]
    dense = rows[0]
    assert dense["dense"] and dense["params"] == 38058 and dense["accuracy"] > 0.95
    by = {(r["ratio"], r["criterion"]): r for r in rows[1:]}
    assert sorted(by) == [(0.2, "l1"), (0.2, "obspa"), (0.5, "l1"), (0.5, "obspa")]
    for ratio in (0.2, 0.5):
        l1, obs = by[(ratio, "l1")], by[(ratio, "obspa")]
        assert l1["params"] == obs["params"] < dense["params"]
        assert obs["accuracy"] >= l1["accuracy"]
    assert by[(0.5, "l1")]["params"] < by[(0.2, "l1")]["params"]
    assert doc["columns"][:5] == ["model", "dense", "ratio", "criterion", "status"]
    low = [r for r in rows[1:] if r["agreement"] < 0.9]  # spa says when a result answers little
    assert low and all(r["status"] == "warning" and "no longer agrees" in r["warning"] for r in low)


def test_processes_give_the_same_rows_and_timings_are_measured():
    here = spa.sweep(spec(steps=["prune", "eval", "bench"], bench={"duration_s": 0.05, "warmup_ms": 5})).to_json()
    there = spa.sweep(spec(steps=["prune", "eval", "bench"], bench={"duration_s": 0.05, "warmup_ms": 5}),
                      executor=spa.executor("processes", workers=2)).to_json()
    assert untimed(there) == untimed(here)
    assert there["executor"] == "processes (2 workers)"
    assert all(r["p50_ms@b1"] > 0 for r in here["rows"] + there["rows"])


def test_a_failing_point_is_reported_and_the_rest_goes_on():
    doc = spa.sweep(spec(grid={"ratio": [0.3, 1.5]}, steps=["prune"]), retries=0).to_json()
    assert doc["failed"] == 1
    ok, bad = doc["rows"][1], doc["rows"][2]
    assert ok["status"] in ("ok", "warning") and ok["params"] < doc["rows"][0]["params"]
    assert bad["status"] == "error" and "ratio" in bad["error"] and bad["attempts"] == 1


@pytest.mark.parametrize("fmt", [".csv", ".json", ".md"])
def test_cli_writes_the_table(tmp_path, capsys, fmt):
    path = tmp_path / "grid.yaml"
    path.write_text("models: [digits_cnn.onnx]\ncalib: digits_calib.npz\ngrid:\n  ratio: [0.3]\n")
    for name in ("digits_cnn.onnx", "digits_calib.npz"):
        (tmp_path / name).write_bytes((EXAMPLES / name).read_bytes())  # paths relative to the file
    res = run_cli(capsys, "sweep", path, "-o", tmp_path / f"out{fmt}")
    assert res.rc == 0, res.err
    text = (tmp_path / f"out{fmt}").read_text()
    if fmt == ".json":
        doc = json.loads(text)
        assert doc["tasks"] == 2 and doc["rows"][1]["ratio"] == 0.3
    else:
        assert "digits_cnn.onnx" in text and "0.3" in text and "params" in text.splitlines()[0]
    assert "digits_cnn.onnx" in res.out


@pytest.mark.parametrize("content, message", [
    ({"grid": {"ratio": [0.3]}}, "'models' must list at least one model file"),
    ({"models": ["digits_cnn.onnx"], "gird": {}}, "unknown key 'gird'"),
    ({"models": ["digits_cnn.onnx"], "grid": {"ratoi": [0.3]}}, "'ratoi' is no spa.prune option"),
    ({"models": ["digits_cnn.onnx"], "steps": ["prune", "deploy"]}, "unknown step 'deploy'"),
    ({"models": ["digits_cnn.onnx"], "steps": ["eval"]}, "the eval step needs 'data'"),
    ({"models": ["missing.onnx"]}, "no such file"),
    ({"models": [1]}, "'models' must list file names"),
    ({"models": ["digits_cnn.onnx"], "grid": {"ratio": []}}, "lists no value"),
])
def test_bad_sweep_files_are_refused_before_any_work(tmp_path, capsys, content, message):
    (tmp_path / "digits_cnn.onnx").write_bytes((EXAMPLES / "digits_cnn.onnx").read_bytes())
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(content))
    before = snapshot(tmp_path)
    res = run_cli(capsys, "sweep", path, "-o", tmp_path / "out.csv")
    assert message in assert_clean_error(res)
    assert_untouched(tmp_path, before)


def test_bad_files_and_options(tmp_path, capsys):
    bad = tmp_path / "grid.yaml"
    bad.write_text("models: [a.onnx\n")
    assert "not valid YAML" in assert_clean_error(run_cli(capsys, "sweep", bad))
    assert "no such file" in assert_clean_error(run_cli(capsys, "sweep", tmp_path / "none.json"))
    good = tmp_path / "g.json"
    good.write_text(json.dumps(spec(steps=["prune"])))
    assert "unsupported format" in assert_clean_error(run_cli(capsys, "sweep", good, "-o", tmp_path / "t.xlsx"), code=2)
    assert "--address is for the ray executor" in assert_clean_error(
        run_cli(capsys, "sweep", good, "--address", "auto"), code=2)
    assert "invalid --retries -1" in assert_clean_error(run_cli(capsys, "sweep", good, "--retries", "-1"), code=2)
    with pytest.raises(UsageError, match="unsupported format"):
        spa.sweep(spec(), output=tmp_path / "t.txt")
    with pytest.raises(SpaError, match="expected a mapping"):
        spa.sweep([1, 2])


def test_cli_exit_1_when_a_task_failed(tmp_path):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(spec(grid={"ratio": [0.3, 1.5]}, steps=["prune"])))
    res = spa_proc("sweep", path, "--json", "--retries", "0")
    assert res.rc == 1
    doc = json.loads(res.out)
    assert doc["failed"] == 1 and len(doc["rows"]) == 3
    model = EXAMPLES / "digits_cnn.onnx"  # rows name a model as the sweep file does
    assert doc["rows"][0]["model"] == str(model)
    assert [ln for ln in res.err.splitlines() if ln.startswith(f"error: task failed: {model} ratio=1.5")]


def test_sensitivity_in_processes_cli(tmp_path, capsys):
    """spa sensitivity --executor processes: the same document as in-process."""
    args = ("sensitivity", EXAMPLES / "tiny_resnet.onnx", "--calib", EXAMPLES / "tiny_resnet_calib.npz",
            "--ratios", "0.3", "0.6", "--json")
    here = run_cli(capsys, *args)
    there = run_cli(capsys, *args, "--executor", "processes", "--workers", "2")
    assert here.rc == there.rc == 0
    assert json.loads(there.out) == json.loads(here.out)
    assert "invalid --workers 0" in assert_clean_error(run_cli(capsys, *args, "--executor", "processes",
                                                               "--workers", "0"), code=2)


def test_bench_over_models_in_processes(tmp_path):
    """spa bench with an executor: one task per model, merged, speed-ups against the first;
    a missing model is refused before any task."""
    models = [EXAMPLES / "digits_cnn.onnx", EXAMPLES / "tiny_resnet.onnx"]
    doc = spa.bench(models, duration_s=0.05, warmup_ms=5, executor="processes").to_json()
    assert [m["label"] for m in doc["models"]] == ["digits_cnn.onnx", "tiny_resnet.onnx"]
    assert doc["results"][0]["speedup"] == 1.0 and doc["results"][1]["speedup"] > 0
    assert doc["failed"] == [] and doc["executor"].startswith("processes")
    assert any("side by side" in w for w in doc["warnings"])
    with pytest.raises(SpaError, match="no such file"):
        spa.bench([models[0], tmp_path / "none.onnx"], executor="processes")
