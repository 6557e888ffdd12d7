"""Prune one PP-OCR model with spa and score it on its task (tools/ocr_eval.py): one row of the issue-19 table.

Each call prunes one model (det, rec or cls of the rapidocr-onnxruntime wheel) with one method and
appends a JSON line to `--results`: the task metric of the pruned model next to the dense one
measured in the same run on the same evaluation samples, params and MACs after/before (spa's own
count), and spa's wall time. `--table` prints the collected lines as markdown.

    python -m tools.ocr_eval --write-calib /tmp/ocr/calib --samples 64
    python -m tools.bench_ocr --model cls --method l1 --ratio 0.3 --results rows.jsonl
    timeout 600 nice python -m tools.bench_ocr --model rec --method obspa --calib /tmp/ocr/calib/rec.npz \\
        --results rows.jsonl
    python -m tools.bench_ocr --table rows.jsonl

Methods: l1 (spa's default criterion, uniform ratio), obspa (data-free without --calib, with
--calib the calibrated OBS reconstruction). `--target-macs F` instead of `--ratio`: spa's budget
allocation (issue 19, point 1) at the shape the model runs at (SHAPES; MACs counted there);
`--uniform-macs F`: the uniform ratio whose MACs match F (found by bisection, the baseline of
the budget rows); `--distill-epochs N`: then recovery by distillation from the dense model on
the --calib inputs (no labels); `--latency`: ORT CPU latency ratio pruned / dense at SHAPES
(batch 1, one thread, the two models taking turns).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tools import ocr_eval

HEADLINE = {"det": ("recall", "precision"), "rec": ("chars", "exact"), "cls": ("accuracy",)}
SHAPES = {"det": (1, 3, 736, 736), "rec": (1, 3, 48, 320), "cls": (1, 3, 48, 192)}  # what the package feeds


def prune(model: str, args, output: Path) -> dict:
    import spa

    options = {"criterion": args.method, "shape": {"x": SHAPES[model]}, "progress": None, "round_to": args.round_to}
    if args.calib is not None:
        options.update(calib=args.calib, calib_samples=10**6)
    if args.target_macs is not None:
        options["target_macs"] = args.target_macs
    else:
        options["ratio"] = args.ratio if args.uniform_macs is None else uniform_ratio(model, args.uniform_macs)
    from spa.scoring import obspa

    obspa.BIAS_CORRECTION = not args.no_bias_correction
    obspa.RENORM = args.renorm
    if args.stages is not None:  # 0: one stage per group
        obspa.stage_count = lambda *_: args.stages or None
    if args.sensitivity_samples is not None:
        sys.modules["spa.api.prune"].SENSITIVITY_SAMPLES = args.sensitivity_samples  # the module, not spa.api.prune
    start, cpu = time.perf_counter(), time.process_time()
    doc = spa.prune(str(ocr_eval.package_models()[model]), output=str(output), **options).to_json()
    row = {"ratio": options.get("ratio"), "spa_wall_s": round(time.perf_counter() - start, 1),
           "spa_cpu_s": round(time.process_time() - cpu, 1),
           "params": round(doc["after"]["params"] / doc["before"]["params"], 4),
           "macs_spa": round(doc["after"]["macs"] / doc["before"]["macs"], 4),
           "agreement": (doc.get("agreement") or {}).get("agreement"), "compensated": doc.get("compensated"),
           "round_to": doc["round_to"], "round_from": doc.get("round_from"),
           "protected": len((doc.get("budget") or {}).get("protected") or [])}
    if args.distill_epochs:
        row.update(distill(model, args, output))
    return row


def uniform_ratio(model: str, macs: float) -> float:
    """The uniform ratio whose pruned MACs (at SHAPES) are closest to `macs` of the dense model's."""
    import spa
    from spa.core import cost

    analysis = spa.analyze(str(ocr_eval.package_models()[model]), shape={"x": SHAPES[model]})
    lo, hi = 0.0, 0.9
    for _ in range(12):
        mid = (lo + hi) / 2
        kept = cost.estimate(analysis, spa.make_plan(analysis, mid))["macs"] / cost.estimate(analysis, {})["macs"]
        lo, hi = (mid, hi) if kept > macs else (lo, mid)
    return round(hi, 4)


def distill(model: str, args, output: Path) -> dict:
    """Recover `output` in place by distillation from the dense model on the --calib inputs."""
    import spa

    start, cpu = time.perf_counter(), time.process_time()
    tmp = output.with_name(output.stem + ".distilled.onnx")
    doc = spa.finetune(str(output), data=args.calib, distill_from=str(ocr_eval.package_models()[model]),
                       epochs=args.distill_epochs, batch=16, lr=args.lr, output=str(tmp)).to_json()
    tmp.replace(output)
    return {"distill_wall_s": round(time.perf_counter() - start, 1),
            "distill_cpu_s": round(time.process_time() - cpu, 1), "distill_best_epoch": doc["best_epoch"],
            "distilled": doc["distilled"]}


def latency(model: str, output: Path) -> float:
    """ORT CPU p50 latency of `output` over the dense model's, at SHAPES, batch 1, one thread."""
    import spa

    dense = str(ocr_eval.package_models()[model])
    doc = spa.bench([dense, str(output)], threads=1, duration_s=2.0, shape={"x": SHAPES[model]}).to_json()
    return round(1 / next(r["speedup"] for r in doc["results"] if r["model"] == str(output)), 3)


def dense_metrics(model: str, samples: int, cache: Path) -> dict:
    """The dense model's metrics on the same evaluation samples, measured once per (model, samples)."""
    path = cache / f"dense_{model}_{samples}.json"
    if not path.exists():
        path.write_text(json.dumps(ocr_eval.evaluate(samples=samples, parts=(model,))[model]))
    return json.loads(path.read_text())


def run(args) -> dict:
    budget = f"budget{args.target_macs}" if args.target_macs else f"uniform{args.uniform_macs or args.ratio}"
    budget += f"_r{args.round_to}" if args.round_to is not None else ""
    budget += "_nobc" if args.no_bias_correction else ""
    budget += "_renorm" if args.renorm else ""
    budget += f"_st{args.stages}" if args.stages is not None else ""
    budget += f"_sens{args.sensitivity_samples}" if args.sensitivity_samples is not None else ""
    output = Path(args.out_dir) / (f"{args.model}_{args.method}{'_calib' if args.calib else ''}_{budget}"
                                   f"{'_kd' if args.distill_epochs else ''}.onnx")
    output.parent.mkdir(parents=True, exist_ok=True)
    row = {"model": args.model, "method": args.method, "calibrated": bool(args.calib), "calib": args.calib,
           "target_macs": args.target_macs, "uniform_macs": args.uniform_macs, "distill_epochs": args.distill_epochs,
           "round_to": args.round_to, "bias_correction": not args.no_bias_correction, "renorm": args.renorm,
           "stages": args.stages, "sensitivity_samples": args.sensitivity_samples, "samples": args.samples}
    row.update(prune(args.model, args, output))
    if args.latency:
        row["latency"] = latency(args.model, output)
    dense = dense_metrics(args.model, args.samples, Path(args.out_dir))
    pruned = ocr_eval.evaluate(**{args.model: str(output)}, samples=args.samples, parts=(args.model,))[args.model]
    row["dense"] = {k: round(dense[k], 4) for k in HEADLINE[args.model]}
    row["pruned"] = {k: round(pruned[k], 4) for k in HEADLINE[args.model]}
    row["eval_wall_s"] = pruned["wall_s"]
    return row


def table(path) -> str:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    cols = ("model", "method", "budget", "dense", "pruned", "params", "MACs (spa, at SHAPES)", "latency",
            "spa wall / CPU (s)")
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        name = f"{r['method']}{' calibrated' if r['calibrated'] else ''}" + (
            f" + {r['distill_epochs']} epochs distillation" if r.get("distill_epochs") else "") + (
            f", widths x{r['round_to']}" + (f" (groups {r['round_from']}+)" if r.get("round_from") else "")
            if (r.get("round_to") or 1) > 1 else "") + (
            ", bias-corrected" if r.get("bias_correction") and r["method"] == "obspa" else "") + (
            ", BN re-estimated" if r.get("renorm") and r["calibrated"] and r["method"] == "obspa" else "") + (
            f", {r['stages'] or 'per-group'} stages" if r.get("stages") is not None else "") + (
            f", sensitivity on {r['sensitivity_samples']}" if r.get("sensitivity_samples") else "") + (
            f", {r['calib_samples']} calibration samples" if r.get("calib_samples") else "")
        budget = (f"allocated {r['target_macs']}" if r.get("target_macs") else
                  f"uniform {r['ratio']}" + (f" (MACs {r['uniform_macs']})" if r.get("uniform_macs") else ""))
        fmt = " / ".join(f"{r['dense'][k]:.3f}" for k in HEADLINE[r["model"]])
        got = " / ".join(f"{r['pruned'][k]:.3f}" for k in HEADLINE[r["model"]])
        wall_s = r["spa_wall_s"] + r.get("distill_wall_s", 0)
        wall = f"{wall_s:.0f} / {r.get('spa_cpu_s', 0) + r.get('distill_cpu_s', 0):.0f}"
        out.append(f"| {r['model']} ({' / '.join(HEADLINE[r['model']])}) | {name} | {budget} | {fmt} | {got} | "
                   f"{r['params']:.3f} | {r['macs_spa']:.3f} | {r.get('latency', '-')} | {wall} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_ocr", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(HEADLINE))
    p.add_argument("--method", default="l1", choices=("l1", "obspa"))
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--target-macs", type=float, help="spa's budget allocation to this MACs fraction")
    p.add_argument("--uniform-macs", type=float, help="the uniform ratio whose MACs match this fraction")
    p.add_argument("--distill-epochs", type=int, default=0, help="then distil from the dense model on --calib")
    p.add_argument("--lr", type=float, default=1e-4, help="distillation learning rate")
    p.add_argument("--round-to", type=int, default=None,
                   help="keep pruned widths multiples of N (default: spa's, 8 in groups of 32+ with a target)")
    p.add_argument("--no-bias-correction", action="store_true", help="compensate weights only (the ablation)")
    p.add_argument("--renorm", action="store_true", help="also re-estimate BatchNormalizations (obspa.RENORM)")
    p.add_argument("--stages", type=int, help="compensation stages (spa's default: obspa.STAGES)")
    p.add_argument("--sensitivity-samples", type=int, help="samples of the budget's sensitivity step (default: spa's)")
    p.add_argument("--latency", action="store_true", help="also the ORT CPU latency ratio (batch 1, 1 thread)")
    p.add_argument("--calib", help="calibration .npz of that model (python -m tools.ocr_eval --write-calib)")
    p.add_argument("--samples", type=int, default=200, help="evaluation samples (lines or pages)")
    p.add_argument("--out-dir", default="/tmp/spa_bench_ocr")
    p.add_argument("--results", default="/tmp/spa_bench_ocr/rows.jsonl", help="JSON lines file to append the row to")
    p.add_argument("--table", metavar="JSONL", help="print the rows of JSONL as a markdown table and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if not args.model:
        p.error("--model is required")
    row = run(args)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
