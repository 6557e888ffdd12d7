#!/usr/bin/env python3
"""Cost of calibrated obspa (issue 19, point 7): wall, CPU and peak memory of

    spa prune MODEL --ratio 0.3 --criterion obspa --calib CALIB.npz -o OUT --json

on the PP-OCR models shipped in the rapidocr-onnxruntime wheel, and the pruned model's fidelity
to the dense one on held-out inputs (cosine and relative L2 error of the output, averaged over
samples), so a cheaper compensation can be seen not to cost accuracy.

Calibration and held-out data are random-normal float32 at a fixed shape per model (the cost
does not depend on the content; the fidelity numbers are only comparable between runs of this
script). Every prune runs in a fresh subprocess; CPU (user + sys) and peak RSS are that child's
(`os.wait4`). The progress lines the command prints on stderr in --json mode are kept.

With `--target-macs F` the command prunes to that MACs budget instead of `--ratio 0.3`; with
`--calib-dir DIR` the calibration data is DIR/<model>.npz (e.g. the rendered samples of
`python -m tools.ocr_eval --write-calib DIR --samples 256`) instead of random normal; with
`--steps`, VmRSS is also sampled every 50 ms and its peak reported per step of the command
(tools/bench_prune.py's `measure`).

usage:
    python tools/bench_obspa_cost.py --work /tmp/obspa-cost [--models cls rec det] [--samples 64 256]
    python tools/bench_obspa_cost.py --work /tmp/c --models rec det cls --samples 256 --target-macs 0.8 \
        --calib-dir /tmp/ocr/calib --steps
    PYTHONPATH=/path/to/older/checkout python tools/bench_obspa_cost.py ...   # the baseline, same data
Markdown rows go to stdout, raw numbers to WORK/bench_obspa_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import loadavg

MODELS = {  # name: (file in rapidocr_onnxruntime/models, sample shape)
    "cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", (3, 48, 192)),
    "rec": ("ch_PP-OCRv4_rec_infer.onnx", (3, 48, 320)),
    "det": ("ch_PP-OCRv4_det_infer.onnx", (3, 320, 320)),
}
HELD_OUT = 32


def model_dir() -> Path:
    import rapidocr_onnxruntime  # optional extra: only this script needs it

    return Path(rapidocr_onnxruntime.__file__).parent / "models"


def data(work: Path, name: str, n: int, seed: int) -> Path:
    path = work / f"{name}_{n}_{seed}.npz"
    if not path.exists():
        shape = MODELS[name][1]
        np.savez(path, x=np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32))
    return path


def fidelity(dense: Path, pruned: Path, held: Path) -> dict:
    x = np.load(held)["x"]
    a = ort.InferenceSession(str(dense), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    b = ort.InferenceSession(str(pruned), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    a, b = a.reshape(len(x), -1).astype(np.float64), b.reshape(len(x), -1).astype(np.float64)
    cos = np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    rel = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-30)
    out = {"cosine": float(cos.mean()), "rel_err": float(rel.mean())}
    if a.ndim == 2 and MODELS_ARGMAX.get(dense.name):  # classifier / per-step logits: top-1 agreement
        k = MODELS_ARGMAX[dense.name]
        out["top1_agree"] = float(np.mean(a.reshape(len(x), -1, k).argmax(-1) == b.reshape(len(x), -1, k).argmax(-1)))
    return out


MODELS_ARGMAX = {"ch_ppocr_mobile_v2.0_cls_infer.onnx": 2, "ch_PP-OCRv4_rec_infer.onnx": 6625}


def measure(work: Path, name: str, n: int, env: dict, args) -> dict:
    """One child process: the prune under os.wait4 for its own CPU and peak RSS."""
    model = model_dir() / MODELS[name][0]
    calib, held = data(work, name, n, 1), data(work, name, HELD_OUT, 99)
    if args.calib_dir is not None:
        calib = work / f"{name}_{n}_calib_given.npz"
        np.savez(calib, x=np.load(args.calib_dir / f"{name}.npz")["x"][:n])
    out = work / f"{name}_{n}.pruned.onnx"
    out.unlink(missing_ok=True)
    amount = ["--ratio", "0.3"] if args.target_macs is None else ["--target-macs", str(args.target_macs)]
    cmd = [sys.executable, "-m", "spa.cli", "prune", str(model), *amount, "--criterion", "obspa",
           "--calib", str(calib), "-o", str(out), "--json"]
    if args.steps:  # the step lines are printed without --json
        return {**traced(cmd[:-1], work, env), "model": name, "samples": n, "fidelity": fidelity(model, out, held),
                "command": " ".join(["spa prune MODEL", *amount, "--criterion obspa --calib CALIB.npz -o OUT"])}
    err_path, out_path = work / "stderr.txt", work / "stdout.json"
    start = time.perf_counter()
    with open(out_path, "wb") as so, open(err_path, "wb") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env={**os.environ, "SPA_PROGRESS": "live", **env})
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU and peak RSS
    wall = time.perf_counter() - start
    stderr = err_path.read_text()
    if status != 0:
        raise SystemExit(f"spa prune failed: {stderr[-2000:]}")
    ticks = [line for line in stderr.splitlines() if line.startswith("compensating")]  # --json progress lines
    doc = json.loads(out_path.read_text())
    return {"model": name, "samples": n, "env": env, "wall_s": round(wall, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "progress_lines": ticks, "params_after": doc["after"]["params"], "fidelity": fidelity(model, out, held),
            "command": "spa prune MODEL --ratio 0.3 --criterion obspa --calib CALIB.npz -o OUT --json"}


def traced(cmd: list, work: Path, env: dict) -> dict:
    """tools/bench_prune.py's measure: CPU and ru_maxrss of the child, VmRSS peaks per step."""
    from bench_prune import measure as run_traced
    from bench_prune import peak_by_step, spa_steps

    os.environ.update(env)
    r = run_traced(cmd, work / "traced", 3600, trace=True)
    steps = spa_steps(r["stderr"])
    return {"env": env, "wall_s": round(r["wall_s"], 1), "cpu_s": round(r["cpu_s"], 1),
            "peak_rss_mb": round(r["rss_mib"]), "steps_s": steps,
            "peak_by_step_mb": {k: round(v) for k, v in peak_by_step(r["rss_samples"], list(steps)).items()},
            "progress_lines": []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--models", nargs="+", default=["cls", "rec"], choices=sorted(MODELS))
    ap.add_argument("--samples", nargs="+", type=int, default=[64, 256])
    ap.add_argument("--env", nargs="*", default=[], help="NAME=VALUE for the spa process")
    ap.add_argument("--target-macs", type=float, help="prune to this MACs budget instead of --ratio 0.3")
    ap.add_argument("--calib-dir", type=Path, help="calibration data DIR/<model>.npz instead of random normal")
    ap.add_argument("--steps", action="store_true", help="also the peak RSS per step (VmRSS every 50 ms)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env = dict(e.split("=", 1) for e in args.env)
    rows = []
    print(f"load average at start: {loadavg()}", file=sys.stderr)
    print("| model | samples | env | wall s | CPU s | peak RSS MB | cosine | rel. err | top-1 agree |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for n in args.samples:
            r = measure(args.work, name, n, env, args)
            rows.append(r)
            f = r["fidelity"]
            print(f"| {name} | {n} | {' '.join(args.env) or '-'} | {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_mb']} "
                  f"| {f['cosine']:.4f} | {f['rel_err']:.4f} | {f.get('top1_agree', float('nan')):.3f} |", flush=True)
            print("\n".join(r["progress_lines"]), file=sys.stderr)
            if "peak_by_step_mb" in r:
                print(f"  peak RSS MB by step: {r['peak_by_step_mb']}", file=sys.stderr)
    path = args.work / "bench_obspa_cost.json"
    old = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(old + rows, indent=1))


if __name__ == "__main__":
    main()
