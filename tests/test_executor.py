"""spa.core.executor: the one seam of every sweep, in-process and in local processes.

Ray is tested on a local two-node cluster in tests/test_ray.py."""

from __future__ import annotations

import multiprocessing
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest

from spa.core import executor
from spa.core.errors import SpaError, UsageError
from tests import sweep_jobs

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def check_semantics(ex, tmp_path, name: str) -> list:
    """The contract every executor keeps: results in item order, a flaky task retried, a failing
    one reported with its error after its retries while the rest goes on, setup at most once per
    worker, progress up to (total, total)."""
    seen = []
    job = executor.Job(sweep_jobs.run, {"folder": str(tmp_path), "name": name}, sweep_jobs.setup)
    out = ex.map(job, range(10), retries=1, progress=lambda done, total: seen.append((done, total)))
    assert [o.item for o in out] == list(range(10))
    assert [o.value[0] for o in out if o.ok] == [i * i for i in range(10) if i != 7]
    assert not out[7].ok and out[7].error == "ValueError: seven is refused" and out[7].attempts == 2
    assert out[5].ok and out[5].attempts == 2
    assert all(o.attempts == 1 for o in out if o.item not in (5, 7))
    assert 1 <= sum(o.setup for o in out) <= ex.workers
    assert seen[0] == (0, 10) and seen[-1] == (10, 10)
    return out


@pytest.mark.parametrize("name", ["in-process", "processes"])
def test_map_contract(tmp_path, name):
    with executor.get(name, workers=None if name == "in-process" else 2) as ex:
        out = check_semantics(ex, tmp_path, name)
    pids = {o.value[1] for o in out if o.ok}
    import os

    assert (pids == {os.getpid()}) == (name == "in-process")


def test_the_context_travels_once(tmp_path):
    """Pickled once per sweep (to the file the workers read), not once per task."""
    log = tmp_path / "log"
    with executor.get("processes", workers=2) as ex:
        out = ex.map(executor.Job(sweep_jobs.pid, sweep_jobs.Counted(str(log))), range(20))
    assert all(o.ok for o in out)
    assert log.read_text().count("pickled") == 1


def test_no_retries_and_no_items(tmp_path):
    ex = executor.get()
    job = executor.Job(sweep_jobs.run, {"folder": str(tmp_path), "name": "x"}, sweep_jobs.setup)
    out = ex.map(job, [5, 7], retries=0)
    assert [o.attempts for o in out] == [1, 1] and not out[0].ok and not out[1].ok
    assert out[0].error == "RuntimeError: flaky once"
    assert executor.get("processes", workers=2).map(job, []) == []


def test_worker_death_is_retried(tmp_path):
    """A worker process that dies breaks the pool: a new one takes the unfinished tasks."""
    with executor.get("processes", workers=2) as ex:
        out = ex.map(executor.Job(sweep_jobs.die_once, {"folder": str(tmp_path)}), range(6), retries=1)
    assert [o.value for o in out] == list(range(6))
    assert out[2].attempts == 2


def test_ctrl_c_stops_the_workers(tmp_path):
    """KeyboardInterrupt on the driver (here from the progress callback) cancels the queue and
    terminates running workers: it returns at once, not after the 60 s tasks."""
    def interrupt(done, total):
        if done:
            raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt), executor.get("processes", workers=2) as ex:
        ex.map(executor.Job(sweep_jobs.slow, {}), range(6), progress=interrupt)
    assert time.monotonic() - start < 30
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not multiprocessing.active_children()


def test_choices_and_usage_errors(monkeypatch):
    assert executor.get(None).name == "in-process"
    assert executor.get("processes", workers=3).workers == 3
    ex = executor.get("processes")
    assert executor.get(ex) is ex
    for kwargs, msg in [({"executor": "spark"}, "unknown executor 'spark'"),
                        ({"executor": "processes", "workers": 0}, "invalid workers=0"),
                        ({"executor": "processes", "address": "auto"}, "address= is for the ray executor"),
                        ({"executor": None, "workers": 2}, "workers= is for the processes and ray executors")]:
        with pytest.raises(UsageError, match=msg):
            executor.get(**kwargs)
    monkeypatch.setitem(sys.modules, "ray", None)  # not installed
    with pytest.raises(SpaError, match=r"needs Ray") as info:
        executor.get("ray")
    assert "spa[ray]" in info.value.hint


def test_unreachable_ray_address_fails_fast():
    pytest.importorskip("ray")
    start = time.monotonic()
    with pytest.raises(SpaError, match="cannot reach the Ray cluster at '127.0.0.1:1'"):
        executor.get("ray", address="127.0.0.1:1")
    assert time.monotonic() - start < 10
    with pytest.raises(UsageError, match="invalid Ray address"):
        executor.get("ray", address="nohost")


def test_onnxruntime_cpu_values_do_not_depend_on_threads():
    """Why results are the same on every executor although workers get fewer threads."""
    model = ROOT / "examples" / "tiny_resnet.onnx"
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    outs = []
    for threads in (1, 2, 3):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {sess.get_inputs()[0].name: x})[0])
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
