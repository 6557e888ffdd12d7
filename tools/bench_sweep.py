#!/usr/bin/env python3
"""A sensitivity sweep of >= 200 tasks in-process, in local processes and on Ray (issue 23).

    python tools/bench_sweep.py [--work DIR] [--ratios 0.1 0.25 0.4 0.55 0.7 0.85] [--samples 2]
                                [--workers 2] [--noop 500] [--executors in-process processes ray]

The sweep: `spa.sensitivity` of every channel group of ResNet-50 (models/resnet50.py, random
weights, 224x224) at each ratio, on `--samples` seeded random images: one task per group and
ratio (37 groups x 6 ratios = 222 tasks). Per executor: wall time, the machine's busy CPU
seconds (all processes: Ray's and the workers' too), and whether the document equals the
in-process one exactly (it must). Ray runs on a local instance started here with `--workers`
CPUs (ray.init); its start is timed apart. The overhead per task: `--noop` tasks that do
nothing (operator.add), wall time / tasks, per executor.
"""

from __future__ import annotations

import argparse
import operator
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import busy_cpu_s, loadavg

import spa
from spa.core import executor


def resnet50(work: Path) -> Path:
    path = work / "resnet50.onnx"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "models.resnet50", str(path)], check=True,
                       cwd=Path(__file__).resolve().parents[1])
    return path


def timed(fn):
    wall, busy = time.perf_counter(), busy_cpu_s()
    out = fn()
    return out, time.perf_counter() - wall, busy_cpu_s() - busy


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/spa-bench-sweep")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.25, 0.4, 0.55, 0.7, 0.85])
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--noop", type=int, default=500)
    p.add_argument("--executors", nargs="+", default=list(executor.NAMES), choices=executor.NAMES)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = resnet50(work)
    calib = {"input": np.random.default_rng(0).standard_normal((args.samples, 3, 224, 224)).astype(np.float32)}
    print(f"load {loadavg()}; ResNet-50, {args.samples} samples, ratios {args.ratios}", flush=True)
    rows, reference = [], None
    for name in args.executors:
        ex, _, start = timed(partial(executor.get, name, workers=None if name == "in-process" else args.workers))
        with ex:
            doc, wall, busy = timed(lambda e=ex: spa.sensitivity(model, calib, ratios=args.ratios, executor=e).to_json())
            tasks = sum(1 for g in doc["groups"] for d in g["channels_dropped"] if d)
            reference = reference or doc
            _, noop_wall, _ = timed(partial(ex.map, executor.Job(operator.add, 0), range(args.noop)))
        rows.append((ex.describe(), len(doc["groups"]), tasks, wall, busy, start, noop_wall / args.noop * 1e3,
                     doc == reference, len(doc["failed"])))
        print(rows[-1], flush=True)
    print("\n| executor | groups | tasks | wall s | busy CPU s | start s | overhead ms/task | same as in-process "
          "| failed |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.2f} | "
              f"{'yes' if r[7] else 'NO'} | {r[8]} |")
    return 0 if all(r[7] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
