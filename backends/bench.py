"""Latency measurement, written once against the Session interface (backends/base.py).

    for each batch size:
        sessions ─warm-up (each: --warmup-ms of untimed runs)─▶
        rounds: every model in turn runs a slice of timed iterations (order rotated each round,
                one untimed re-warm iteration first) until each has --duration-s of timed runs
        ─▶ per model: min/mean/p50/p90/p95/p99/max ms, throughput, speed-up vs the first model

The method is trtexec's (a time-boxed warm-up, then time-boxed timed iterations, the inputs
already on the device, device events on a GPU or a host timer after a synchronise), with one
addition for comparing models: the models take turns in slices within one process, so drift of
the machine (clock frequency, neighbours' load) hits all of them alike (docs/benchmarks.md §2
measured why slices and not strict alternation: a model run back to back keeps its caches
warm, as in a server).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime

from spa.core import __version__

PERCENTILES = (50, 90, 95, 99)


@dataclass
class Plan:
    warmup_ms: float = 200.0
    duration_s: float = 3.0
    min_iterations: int = 10  # a slow model still gets this many timed runs, whatever the duration
    slice_s: float = 0.5  # timed seconds per model per round


def stats(ms: list, batch: int) -> dict:
    """Latency summary of one model at one batch size."""
    a = np.asarray(ms, dtype=np.float64)
    lat = {"min": float(a.min()), "mean": float(a.mean())}
    lat.update({f"p{q}": float(np.percentile(a, q)) for q in PERCENTILES})
    lat["max"] = float(a.max())
    return {"iterations": len(a), "latency_ms": lat, "throughput": batch * 1e3 / lat["mean"]}


def _warm(runner, ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    runner()
    while time.perf_counter() < end:
        runner()


# positional: the runners, the batch and the plan are what every caller passes; progress is optional
def measure(runners: list, batch: int, plan: Plan, progress=None) -> list:
    """Timed iterations of every runner (one per model) in rotated slices; a summary per runner."""
    for r in runners:
        _warm(r, plan.warmup_ms)
    times = [[] for _ in runners]
    spent = [0.0] * len(runners)
    rnd = 0
    while any(s < plan.duration_s * 1e3 or len(t) < plan.min_iterations for s, t in zip(spent, times)):
        order = list(range(len(runners)))
        order = order[rnd % len(order):] + order[:rnd % len(order)]
        for k in order:
            if spent[k] >= plan.duration_s * 1e3 and len(times[k]) >= plan.min_iterations:
                continue
            if not times[k] or times[k][-1] < plan.slice_s * 1e3:
                runners[k]()  # re-warm after the other models' slices (not worth it for a slow model)
            end = time.perf_counter() + plan.slice_s
            while True:
                ms = runners[k]()
                times[k].append(ms)
                spent[k] += ms
                if time.perf_counter() >= end:
                    break
        rnd += 1
        if progress is not None:
            progress(min(min(spent) / (plan.duration_s * 1e3), 1.0))
    return [stats(t, batch) for t in times]


def speedups(results: list) -> None:
    """results[i]["speedup"] = p50 of the first model / p50 of model i (None where not run)."""
    base = results[0].get("latency_ms") if results else None
    for r in results:
        lat = r.get("latency_ms")
        r["speedup"] = base["p50"] / lat["p50"] if base and lat else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(extra: dict | None = None) -> dict:
    """Versions, machine and threads, recorded with every result."""
    env = {"spa": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
           "cpu": _cpu_name(), "cores": os.cpu_count(), "onnx": onnx.__version__,
           "onnxruntime": onnxruntime.__version__, "onnxruntime_providers": onnxruntime.get_available_providers(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cuda"] = torch.version.cuda
    if "tensorrt" in sys.modules:
        env["tensorrt"] = sys.modules["tensorrt"].__version__
    env.update(extra or {})
    return env
