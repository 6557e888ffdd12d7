"""Sweeps on Ray: a local two-node cluster started here (`ray start --head` on 127.0.0.1 and a
second node process, one CPU each, token authentication with the session's token), never a
remote address. The same sweeps give the same results in-process, in local processes and on it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import spa
from spa.core import executor
from tests import sweep_jobs
from tests.test_cli import spa_proc
from tests.test_executor import check_semantics

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
STORE = 300 * 2**20  # object store bytes per node: small, for the CI machine's /dev/shm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray") or "ray"  # this Python's


def _ray(*args, env, check: bool = True) -> None:
    subprocess.run([RAY, *args], env=env, check=check, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The address of a local Ray cluster: a head and one more node, both on 127.0.0.1."""
    port = _free_port()
    env = dict(os.environ)  # with the session's token (tests/conftest.py)
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--object-store-memory", str(STORE),
              "--disable-usage-stats"]
    try:
        _ray("start", "--head", "--port", str(port), "--include-dashboard", "false", *common, env=env)
        _ray("start", "--address", f"127.0.0.1:{port}", *common, env=env)
    except subprocess.CalledProcessError as exc:
        _ray("stop", "--force", env=env, check=False)
        pytest.fail(f"could not start a local Ray cluster: {exc.stderr.decode()[-2000:]}")
    address = f"127.0.0.1:{port}"
    ex = executor.get("ray", address=address)
    ray.cloudpickle.register_pickle_by_value(sweep_jobs)  # the test's own task functions travel by value
    deadline = time.monotonic() + 60
    while ray.cluster_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    yield address, ex
    ex.close()
    _ray("stop", "--force", env=env, check=False)


def test_cluster_has_two_nodes(cluster):
    _, ex = cluster
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    assert ex.workers == 2 and ex.describe() == f"ray (2 CPUs at {cluster[0]})"


def test_map_contract_on_ray(cluster, tmp_path):
    _, ex = cluster
    before = ex.puts
    check_semantics(ex, tmp_path, "ray")
    assert ex.puts == before + 1  # the context went to the object store once for the ten tasks
    log = tmp_path / "log"
    out = ex.map(executor.Job(sweep_jobs.pid, sweep_jobs.Counted(str(log))), range(20))
    assert all(o.ok for o in out) and log.read_text().count("pickled") == 1  # not once per task


def test_ctrl_c_cancels_the_cluster_tasks(cluster):
    _, ex = cluster

    def interrupt(done, total):
        if done:
            raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        ex.map(executor.Job(sweep_jobs.slow, {}), range(6), progress=interrupt)
    assert time.monotonic() - start < 30
    deadline = time.monotonic() + 30  # cancelled: the cluster's CPUs come back, not after the 60 s sleeps
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2


def test_sensitivity_is_the_same_everywhere(cluster):
    """Bit-identical scores in-process, in local processes and on the cluster (API and CLI)."""
    _, ex = cluster
    model, calib = EXAMPLES / "tiny_resnet.onnx", EXAMPLES / "tiny_resnet_calib.npz"
    docs = [spa.sensitivity(model, calib, ratios=(0.2, 0.5, 0.8), executor=e).to_json()
            for e in ("in-process", executor.get("processes", workers=2), ex)]
    assert docs[0]["groups"] and not docs[0]["failed"]
    assert any(v > 0 for g in docs[0]["groups"] for v in g["loss"])
    assert docs[1] == docs[0] and docs[2] == docs[0]
    res = spa_proc("sensitivity", model, "--calib", calib, "--ratios", "0.2", "0.5", "0.8", "--executor", "ray",
                   "--address", cluster[0], "--json")
    assert res.rc == 0, res.err
    assert json.loads(res.out)["groups"] == docs[0]["groups"]


def test_sweep_is_the_same_everywhere(cluster, tmp_path):
    """spa sweep's rows (timings aside) on the cluster equal those in-process; the CLI writes the table."""
    spec = {"models": [str(EXAMPLES / "digits_cnn.onnx")], "calib": str(EXAMPLES / "digits_calib.npz"),
            "data": str(EXAMPLES / "digits_test.npz"), "steps": ["prune", "eval", "bench"],
            "grid": {"ratio": [0.2, 0.4], "criterion": ["l1", "obspa"]}, "bench": {"duration_s": 0.1, "warmup_ms": 10}}
    untimed = lambda doc: [{k: v for k, v in r.items() if not k.startswith("p50_ms")} for r in doc["rows"]]
    here = spa.sweep(spec).to_json()
    there = spa.sweep(spec, executor=cluster[1]).to_json()
    assert there["tasks"] == 5 and there["failed"] == 0
    assert untimed(there) == untimed(here)
    assert all(r["p50_ms@b1"] > 0 for r in there["rows"])
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(spec))
    res = spa_proc("sweep", path, "--executor", "ray", "--address", cluster[0], "-o", tmp_path / "out.csv")
    assert res.rc == 0, res.err
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines[0].startswith("model,dense,ratio,criterion,status,params,macs,agreement,accuracy") and len(lines) == 6


def test_prune_budget_measured_on_ray(cluster):
    """A target's measured sensitivity (one trial per group) through the executor: the same plan."""
    model, calib = EXAMPLES / "tiny_resnet.onnx", EXAMPLES / "tiny_resnet_calib.npz"
    here = spa.prune(model, target_macs=0.6, calib=calib).to_json()
    there = spa.prune(model, target_macs=0.6, calib=calib, executor=cluster[1]).to_json()
    assert there["budget"] == here["budget"] and there["after"] == here["after"]


def test_scale_a_resnet50_sensitivity_of_222_tasks(cluster, tmp_path):
    """The scale test: every channel group of ResNet-50 at 6 ratios (222 tasks) on the cluster,
    each trial a run (zero-invariant groups) or a pruned model; all succeed, one context put."""
    pytest.importorskip("torch")
    model = tmp_path / "resnet50.onnx"
    subprocess.run([sys.executable, "-m", "models.resnet50", str(model)], cwd=ROOT, check=True, capture_output=True)
    calib = {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    _, ex = cluster
    puts, seen = ex.puts, []
    doc = spa.sensitivity(model, calib, ratios=(0.1, 0.25, 0.4, 0.55, 0.7, 0.85), executor=ex,
                          on_trial=lambda done, total: seen.append((done, total))).to_json()
    tasks = sum(1 for g in doc["groups"] for d in g["channels_dropped"] if d)
    assert len(doc["groups"]) == 37 and tasks >= 200 and seen[-1] == (tasks, tasks)
    assert not doc["failed"] and ex.puts == puts + 1
    assert all(0 <= v <= 2 for g in doc["groups"] for v in g["loss"])
    assert all(g["loss"][-1] > 0 for g in doc["groups"])
