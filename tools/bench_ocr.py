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
--calib the calibrated OBS reconstruction).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tools import ocr_eval

HEADLINE = {"det": ("recall", "precision"), "rec": ("chars", "exact"), "cls": ("accuracy",)}


def prune(model: str, method: str, ratio: float, calib, output: Path) -> dict:
    import spa

    options = {"criterion": method} if calib is None else {"criterion": method, "calib": calib, "calib_samples": 10**6}
    start = time.perf_counter()
    doc = spa.prune(str(ocr_eval.package_models()[model]), ratio=ratio, output=str(output), **options).to_json()
    return {"spa_wall_s": round(time.perf_counter() - start, 1),
            "params": round(doc["after"]["params"] / doc["before"]["params"], 4),
            "macs_spa": round(doc["after"]["macs"] / doc["before"]["macs"], 4),
            "check_rel_err": doc["check"].get("max_rel_err"), "compensated": doc.get("compensated")}


def dense_metrics(model: str, samples: int, cache: Path) -> dict:
    """The dense model's metrics on the same evaluation samples, measured once per (model, samples)."""
    path = cache / f"dense_{model}_{samples}.json"
    if not path.exists():
        path.write_text(json.dumps(ocr_eval.evaluate(samples=samples, parts=(model,))[model]))
    return json.loads(path.read_text())


def run(args) -> dict:
    output = Path(args.out_dir) / f"{args.model}_{args.method}{'_calib' if args.calib else ''}_{args.ratio}.onnx"
    output.parent.mkdir(parents=True, exist_ok=True)
    row = {"model": args.model, "method": args.method, "calibrated": bool(args.calib), "ratio": args.ratio,
           "calib": args.calib, "samples": args.samples}
    row.update(prune(args.model, args.method, args.ratio, args.calib, output))
    dense = dense_metrics(args.model, args.samples, Path(args.out_dir))
    pruned = ocr_eval.evaluate(**{args.model: str(output)}, samples=args.samples, parts=(args.model,))[args.model]
    row["dense"] = {k: round(dense[k], 4) for k in HEADLINE[args.model]}
    row["pruned"] = {k: round(pruned[k], 4) for k in HEADLINE[args.model]}
    row["eval_wall_s"] = pruned["wall_s"]
    return row


def table(path) -> str:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    out = ["| model | method | ratio | dense | pruned | params after/before | MACs after/before (spa) | spa wall (s) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"{r['method']}{' calibrated' if r['calibrated'] else ''}"
        fmt = " / ".join(f"{r['dense'][k]:.3f}" for k in HEADLINE[r["model"]])
        got = " / ".join(f"{r['pruned'][k]:.3f}" for k in HEADLINE[r["model"]])
        out.append(f"| {r['model']} ({' / '.join(HEADLINE[r['model']])}) | {name} | {r['ratio']} | {fmt} | {got} | "
                   f"{r['params']:.3f} | {r['macs_spa']:.3f} | {r['spa_wall_s']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_ocr", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(HEADLINE))
    p.add_argument("--method", default="l1", choices=("l1", "obspa"))
    p.add_argument("--ratio", type=float, default=0.3)
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
