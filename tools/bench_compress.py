"""Accuracy and size of 2:4 sparsity, INT8/FP16 and the spa compress pipeline on the digits models.

    python tools/bench_compress.py [--outdir DIR] [--models cnn vit] [--ratio 0.5] [--markdown]

The digits CNN and ViT (models/digits.py, seed 0, TorchScript export) are trained as in
tools/bench_train.py. Every step runs spa's command line in this process (`spa.cli.app`);
top-1 is on the held-out test split (450 images), calibration uses the first 256 images of
the train split, fine-tuning the train split with 10% held out to pick the best epoch.

  1. dense
  2. 2:4 magnitude / magnitude + permutation search / obs (calibrated, SparseGPT-style) /
     obs + permutation: `spa sparsify DENSE --pattern 2:4 [--method obs --calib] [--permute]`
  3. INT8 (`spa quantize --calib`, MinMax) and FP16 (`spa quantize --fp16`)
  4. `spa compress DENSE --ratio R --sparsify 2:4 --int8 --calib train.npz --eval test.npz`:
     obspa pruning (compensated), obs 2:4, INT8; top-1 and size after every stage, no training
  5. the same chain with fine-tuning between the stages: prune, `spa finetune` (distilled from
     DENSE), sparsify obs, `spa finetune --keep-sparsity`, quantize

Prints the tables (--markdown: markdown) and writes OUTDIR/bench_compress.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import SETTINGS, log, print_markdown, print_rich, run_models, spa_cli, top1, train

SPARSE_FT_EPOCHS = 30  # after 2:4: the fine-tuning of the "2:4 by magnitude" section


def size(path: Path) -> int:
    return path.stat().st_size


def bench_model(name: str, args, work: Path, train_npz: Path, test_npz: Path) -> dict:
    from models import digits

    s = SETTINGS[name]
    t0 = time.perf_counter()
    model, _ = digits.train(name, seed=0)
    dense = digits.export(name, work / f"{name}_dense.onnx", model=model)
    log(f"{name}: trained + exported in {time.perf_counter() - t0:.1f} s")
    rows = [{"row": "dense", "top1": top1(dense, test_npz), "bytes": size(dense)}]

    def sparse_row(label: str, extra: list) -> None:
        out = work / f"{name}_{label.replace(' ', '_').replace('+', '')}.onnx"
        doc, timing = spa_cli(["sparsify", dense, "--pattern", "2:4", "-o", out] + extra)
        rows.append({"row": f"2:4 {label}", "top1": top1(out, test_npz), "bytes": size(out),
                     "retained": doc["retained_magnitude"], "eligible": doc["eligible"], "layers": len(doc["layers"]),
                     "permuted": sum(r["permuted"] for r in doc["permutation"] or []), **timing})
        log(f"{name}: 2:4 {label}: {rows[-1]['top1']:.2%}")

    calib = ["--calib", train_npz]
    sparse_row("magnitude", [])
    sparse_row("magnitude + permutation", ["--permute"])
    sparse_row("obs", ["--method", "obs"] + calib)
    sparse_row("obs + permutation", ["--method", "obs", "--permute"] + calib)
    for kind, extra in (("INT8", calib), ("FP16", ["--fp16"])):
        out = work / f"{name}_{kind.lower()}.onnx"
        _, timing = spa_cli(["quantize", dense, "-o", out] + extra)
        rows.append({"row": kind, "top1": top1(out, test_npz), "bytes": size(out), **timing})

    # the pipeline, no training
    out = work / f"{name}_compressed.onnx"
    doc, timing = spa_cli(["compress", dense, "--ratio", args.ratio, "--sparsify", "2:4", "--int8", "--calib", train_npz,
                           "--eval", test_npz, "--labels", "labels", "-o", out])
    chain = [{"stage": r["stage"], "top1": r["eval"]["accuracy"], "bytes": r["bytes"], "weights": r["params"],
              "nonzero": r["nonzero"]} for r in doc["stages"]]
    log(f"{name}: compress: {[round(r['top1'], 4) for r in chain]}")

    # the same chain with fine-tuning after pruning and after 2:4
    pruned, tuned = work / f"{name}_p.onnx", work / f"{name}_pft.onnx"
    sparse, sparse_tuned, final = work / f"{name}_ps.onnx", work / f"{name}_psft.onnx", work / f"{name}_psfq.onnx"
    spa_cli(["prune", dense, "--ratio", args.ratio, "--criterion", "obspa", "--calib", train_npz, "-o", pruned])
    ft = {"epochs": s["epochs"], "lr": s["lr"], "teacher": dense, "alpha": s["alpha"], "temperature": s["temperature"]}
    t_ft1 = train(pruned, tuned, train_npz, **ft)
    spa_cli(["sparsify", tuned, "--pattern", "2:4", "--method", "obs", "--calib", train_npz, "-o", sparse])
    argv = ["finetune", sparse, "--data", train_npz, "--labels", "labels", "--epochs", SPARSE_FT_EPOCHS, "--lr", s["lr"],
            "--seed", 0, "--val-split", 0.1, "--distill-from", dense, "--alpha", s["alpha"], "--temperature",
            s["temperature"], "--keep-sparsity", "-o", sparse_tuned]
    doc2, t_ft2 = spa_cli(argv)
    Path(doc2["checkpoint"]).unlink(missing_ok=True)
    spa_cli(["quantize", sparse_tuned, "--calib", train_npz, "-o", final])
    held = spa_cli(["analyze", final])[0]["sparsity"]
    trained = [{"stage": st, "top1": top1(p, test_npz), "bytes": size(p)} for st, p in
               (("input", dense), ("pruned", pruned), ("pruned + fine-tuned", tuned), ("2:4 obs", sparse),
                ("2:4 + fine-tuned (keep sparsity)", sparse_tuned), ("INT8", final))]
    log(f"{name}: chain with fine-tuning: {[round(r['top1'], 4) for r in trained]}")
    return {"rows": rows, "compress": chain, "trained": trained, "final_sparsity": held,
            "finetune_s": [t_ft1["wall_s"], t_ft2["wall_s"]]}


def _pct(x) -> str:
    return f"{100 * x:.2f}%"


def tables(name: str, res: dict, ratio: float) -> list:
    dense = res["rows"][0]
    head = ["variant", "top-1", "vs dense", "size (bytes)", "x dense", "retained |w|"]
    rows = [[r["row"], _pct(r["top1"]), f"{100 * (r['top1'] - dense['top1']):+.2f}", f"{r['bytes']:,}",
             f"{r['bytes'] / dense['bytes']:.2f}", f"{r['retained']:.3f}" if "retained" in r else "-"]
            for r in res["rows"]]
    chain_head = ["stage", "top-1", "size (bytes)", "x input", "weights", "non-zero"]
    chain = [[r["stage"], _pct(r["top1"]), f"{r['bytes']:,}", f"{r['bytes'] / res['compress'][0]['bytes']:.2f}",
              f"{r['weights']:,}", f"{r['nonzero']:,}"] for r in res["compress"]]
    trained_head = ["stage", "top-1", "size (bytes)", "x input"]
    trained = [[r["stage"], _pct(r["top1"]), f"{r['bytes']:,}", f"{r['bytes'] / res['trained'][0]['bytes']:.2f}"]
               for r in res["trained"]]
    return [(f"{name}: 2:4, INT8, FP16 (no training)", head, rows),
            (f"{name}: spa compress --ratio {ratio} --sparsify 2:4 --int8 (no training)", chain_head, chain),
            (f"{name}: the same chain with fine-tuning after pruning and after 2:4", trained_head, trained)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outdir", type=Path, help="work directory (default: a new temp dir)")
    ap.add_argument("--models", nargs="+", default=["cnn", "vit"], choices=("cnn", "vit"))
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables (default: rich tables)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    doc = run_models(args, "bench_compress", bench_model)
    if doc is None:
        return 1
    work = Path(doc["outdir"])
    show = print_markdown if args.markdown else print_rich
    m = doc["machine"]
    print(f"\n{m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']}, onnxruntime {m['onnxruntime']}")
    for name, res in doc["models"].items():
        for title, head, rows in tables(name, res, args.ratio):
            show(title, head, rows)
    print(f"\ntotal {doc['total_s']:.0f} s; results: {work / 'bench_compress.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
