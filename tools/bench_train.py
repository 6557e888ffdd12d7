"""Accuracy recovered by training on the digits models: fine-tuning after pruning, OTO-style
sparse training, and pruning at initialization.

    python tools/bench_train.py [--outdir DIR] [--models cnn vit] [--ratio 0.5] [--epochs E]
                                [--scratch-epochs S] [--criteria l1 obspa taylor snip grasp crop] [--markdown]

The digits CNN and ViT (models/digits.py, seed 0, TorchScript export) are trained as in
tools/bench_digits.py. Every step below runs spa's command line in this process
(`spa.cli.app([...])`, torch limited to --threads threads); top-1 is `spa eval` on the
held-out test split (450 images). Training uses the train split (1347 images) with 10% of it
held out (`--val-split`, seeded) to pick the best epoch.

  1. dense: the trained model's top-1.
  2. pruned: `spa prune DENSE --ratio R --criterion C --calib train.npz [--labels labels]`
     (obspa calibrated and compensated; taylor/snip/grasp/crop with the labels), no training.
  3. fine-tuned: `spa finetune PRUNED --data train.npz --labels labels --distill-from DENSE
     --epochs E --lr LR --alpha A --temperature T`: top-1, gap to dense, seconds (wall, CPU).
  4. train-sparse: `spa train-sparse DENSE --target-ratio R` for the same epochs (distilling from
     DENSE too), then `spa prune SPARSE --zeros`: top-1, params (the same as the uniform plans'),
     and the removal's max rel. error (exact: <= 1e-5).
  5. pruning at initialization: the untrained model (same seed) exported, pruned at R with snip
     and grasp (labels, train data), l1 and random, then trained from scratch with
     `spa finetune PRUNED_INIT --data train.npz --labels labels --epochs S` (no teacher); the
     untrained dense model trained the same way is the reference.

"top-1 trained" is the model spa writes: the epoch with the best accuracy on the hold-out (the
earliest on ties). "last-epoch top-1" is the same run's final weights, rebuilt from the checkpoint
(spa.torch.write_back), shown because 135 hold-out images saturate near 100% and the pick is noisy.
With 450 test images one image is 0.22 points: gaps under ~0.5 points are within noise.

The untrained TorchScript export shares identical initializers through Identity nodes (the CNN's
zero conv biases, the ViT's zero biases and LayerNorm ones), so training from scratch trains them
tied; untying them changed the dense-from-scratch top-1 by under 1 point in a check.

Prints one table per model (--markdown: markdown), progress on stderr, and writes everything
to OUTDIR/bench_train.json with the machine and library versions. Seeds are fixed (0): reruns
give the same accuracies; timings vary with machine load.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import loadavg, own_cpu_s

CRITERIA = ("l1", "obspa", "taylor", "snip", "grasp", "crop")
GRADIENT = ("taylor", "snip", "grasp", "crop")
INIT_CRITERIA = ("snip", "grasp", "l1", "random")
# per model: fine-tuning / train-sparse (epochs, lr, alpha, temperature) and training from scratch (epochs,
# lr). From a hand sweep (epochs 40/100 x lr 1e-3/3e-3 x alpha 0.5/0.9, all six criteria, both models):
# 100 epochs at 3e-3 had the best mean fine-tuned top-1 on both; from scratch the BN-free CNN (the
# exported graph has BN folded) wants 1e-2, the ViT 3e-3. 15-35 CPU-s per run on one thread.
SETTINGS = {
    "cnn": {"epochs": 100, "lr": 3e-3, "alpha": 0.5, "temperature": 4.0, "scratch_epochs": 100, "scratch_lr": 1e-2},
    "vit": {"epochs": 100, "lr": 3e-3, "alpha": 0.5, "temperature": 4.0, "scratch_epochs": 100, "scratch_lr": 3e-3},
}
TARGET_GAP = 0.5  # points of top-1: the goal for fine-tuning
ZEROS_TOL = 1e-5


class BenchError(Exception):
    """A spa command failed: its arguments and its error line."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def spa_cli(argv: list[str]) -> tuple[dict, dict]:
    """Run `spa ARGV --json` in this process: (its JSON document, {wall_s, cpu_s})."""
    from spa.cli import app as cli

    argv = [str(a) for a in argv] + ["--json"]
    out, err = io.StringIO(), io.StringIO()
    wall, cpu = time.perf_counter(), own_cpu_s()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    timing = {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(own_cpu_s() - cpu, 2)}
    if rc != 0:
        raise BenchError(f"spa {' '.join(argv)} -> exit {rc}: {err.getvalue().strip()}")
    return json.loads(out.getvalue()), timing


def top1(model: Path, test: Path) -> float:
    return spa_cli(["eval", model, "--data", test, "--labels", "labels"])[0]["accuracy"]


def prune(src: Path, out: Path, ratio: float, criterion: str, train: Path) -> dict:
    argv = ["prune", src, "--ratio", ratio, "--criterion", criterion, "-o", out]
    if criterion != "l1":  # obspa: calibrated (compensation on by default); gradients: with the labels
        argv += ["--calib", train] + (["--labels", "labels"] if criterion in GRADIENT else [])
    doc, timing = spa_cli(argv)
    return {"params": doc["after"]["params"], "channels_removed": doc["channels_removed"], **timing}


def train(src: Path, out: Path, data: Path, epochs: int, lr: float, teacher: Path | None = None,
          alpha: float = 0.5, temperature: float = 4.0, sparse: float | None = None, test: Path | None = None,
          val_split: float = 0.1) -> dict:
    """`spa finetune` (or with `sparse`, `spa train-sparse --target-ratio`), seed 0; with `test`, also
    the top-1 of the last epoch's weights."""
    argv = (["train-sparse", src, "--target-ratio", sparse] if sparse is not None else ["finetune", src])
    argv += ["--data", data, "--labels", "labels", "--epochs", epochs, "--lr", lr, "--seed", 0, "-o", out,
             "--val-split", val_split]
    if teacher is not None:
        argv += ["--distill-from", teacher, "--alpha", alpha, "--temperature", temperature]
    doc, timing = spa_cli(argv)
    ckpt = Path(doc["checkpoint"])
    res = {"best_epoch": doc["best_epoch"], "val_accuracy": doc["best"], "epochs": len(doc["history"]),
           "write_back_max_rel_err": doc["write_back_max_rel_err"],
           "zero_channels": (doc.get("train_sparse") or {}).get("zero_channels"), **timing}
    if test is not None and sparse is None:  # the last epoch's weights, from the checkpoint
        last = out.with_name(out.stem + ".last.onnx")
        last_epoch_model(src, ckpt, last)
        res["top1_last_epoch"] = top1(last, test)
        last.unlink()
    ckpt.unlink(missing_ok=True)
    return res


def last_epoch_model(src: Path, ckpt: Path, out: Path) -> None:
    """The model `src` with the weights of the last epoch in the checkpoint `ckpt` (fit writes
    the best epoch's; with a saturated validation accuracy those can be an early epoch's)."""
    import onnx
    import torch

    from spa.scoring.gradients import trainable_names
    from spa.torch import to_torch, write_back

    proto = onnx.load(str(src))
    module = to_torch(proto, trainable=trainable_names(proto))
    module.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["module"])
    onnx.save(write_back(proto, module), str(out))


def bench_model(name: str, args, work: Path, train_npz: Path, test_npz: Path) -> dict:
    import spa
    from models import digits

    s = args.settings[name]
    res: dict = {"settings": s}
    t0 = time.perf_counter()
    model, _ = digits.train(name, seed=0)
    dense = digits.export(name, work / f"{name}_dense.onnx", model=model)
    log(f"{name}: trained + exported in {time.perf_counter() - t0:.1f} s")
    dense_params = spa.cost.params(spa.load(dense))
    acc = top1(dense, test_npz)
    res["dense"] = {"params": dense_params, "top1": acc}

    def gap(a: float, ref: float = acc) -> float:
        return round(100 * (a - ref), 2)

    res["pruned"] = []
    for c in args.criteria:
        pruned = work / f"{name}_{c}.onnx"
        row = {"criterion": c, "prune": prune(dense, pruned, args.ratio, c, train_npz)}
        row["params"] = row["prune"]["params"]
        row["top1_pruned"] = top1(pruned, test_npz)
        tuned = work / f"{name}_{c}.ft.onnx"
        row["finetune"] = train(pruned, tuned, train_npz, s["epochs"], s["lr"], dense, s["alpha"], s["temperature"],
                               test=test_npz, val_split=args.val_split)
        row["top1"] = top1(tuned, test_npz)
        row["gap"] = gap(row["top1"])
        res["pruned"].append(row)
        log(f"{name} {c}: pruned {100 * row['top1_pruned']:.1f}% -> fine-tuned {100 * row['top1']:.2f}% "
            f"(gap {row['gap']:+.2f}) in {row['finetune']['wall_s']:.1f} s")

    sparse, removed = work / f"{name}_sparse.onnx", work / f"{name}_sparse.pruned.onnx"
    row = {"train": train(dense, sparse, train_npz, s["epochs"], s["lr"], dense, s["alpha"], s["temperature"],
                          sparse=args.ratio, val_split=args.val_split)}
    row["top1_sparse"] = top1(sparse, test_npz)
    doc, timing = spa_cli(["prune", sparse, "--zeros", "-o", removed])
    row["zeros"] = {"params": doc["after"]["params"], "channels_removed": doc["channels_removed"],
                    "max_rel_err": doc["check"]["max_rel_err"], **timing}
    row["params"] = doc["after"]["params"]
    row["top1"] = top1(removed, test_npz)
    row["gap"] = gap(row["top1"])
    uniform = {r["params"] for r in res["pruned"]}
    row["params_equal_uniform"] = uniform == {row["params"]} if uniform else None
    row["exact"] = row["zeros"]["max_rel_err"] <= ZEROS_TOL
    res["train_sparse"] = row
    log(f"{name} train-sparse: {100 * row['top1']:.2f}% (gap {row['gap']:+.2f}), removal rel. err "
        f"{row['zeros']['max_rel_err']:.1e}, {row['params']:,} params")

    init = digits.export(name, work / f"{name}_init.onnx", model=digits.build(name, 0))
    res["init"] = []
    for c in ("dense", *INIT_CRITERIA):
        row = {"criterion": c}
        src = init
        if c != "dense":
            src = work / f"{name}_init_{c}.onnx"
            argv = ["prune", init, "--ratio", args.ratio, "--criterion", c, "-o", src, "--seed", 0]
            if c in GRADIENT:
                argv += ["--calib", train_npz, "--labels", "labels"]
            doc, timing = spa_cli(argv)
            row["prune"] = {"params": doc["after"]["params"], **timing}
        row["params"] = spa.cost.params(spa.load(src))
        trained = work / f"{src.stem}.trained.onnx"
        row["train"] = train(src, trained, train_npz, s["scratch_epochs"], s["scratch_lr"], test=test_npz,
                             val_split=args.val_split)
        row["top1"] = top1(trained, test_npz)
        res["init"].append(row)
    ref = res["init"][0]["top1"]
    for row in res["init"]:
        row["gap_scratch"] = gap(row["top1"], ref)
        row["gap"] = gap(row["top1"])
        log(f"{name} init {row['criterion']}: {100 * row['top1']:.2f}% (vs dense from scratch "
            f"{row['gap_scratch']:+.2f})")
    return res


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------

def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def tables(name: str, res: dict, args) -> list[tuple[str, list[str], list[list[str]]]]:
    """[(title, header, rows)] of one model. "top-1 trained" is the model spa writes (the best epoch on
    the validation hold-out); "last epoch" the same run's final weights, for comparison."""
    d, s = res["dense"], res["settings"]
    head = ["method", "params", "top-1 pruned %", "top-1 trained %", "gap (pts)", "best / last epoch",
            "last-epoch top-1 %", "train s", "CPU s", "notes"]
    rows = [["dense (models.digits)", f"{d['params']:,}", "-", _pct(d["top1"]), "0.00", "-", "-", "-", "-", ""]]
    for r in res["pruned"]:
        ft = r["finetune"]
        note = "calibrated + compensated" if r["criterion"] == "obspa" else (
            "labels" if r["criterion"] in GRADIENT else "")
        ok = f"within {TARGET_GAP} pts" if r["gap"] >= -TARGET_GAP else ""
        rows.append([f"{r['criterion']} + fine-tune", f"{r['params']:,}", _pct(r["top1_pruned"]), _pct(r["top1"]),
                     f"{r['gap']:+.2f}", f"{ft['best_epoch']} / {ft['epochs']}", _pct(ft.get("top1_last_epoch")),
                     f"{ft['wall_s']:.1f}", f"{ft['cpu_s']:.1f}", "; ".join(filter(None, (note, ok)))])
    t = res["train_sparse"]
    z, tr = t["zeros"], t["train"]
    eq = {True: "params = uniform plans'", False: "PARAMS DIFFER from the uniform plans'", None: ""}
    rows.append(["train-sparse + prune --zeros", f"{t['params']:,}", "-", _pct(t["top1"]), f"{t['gap']:+.2f}",
                 f"{tr['best_epoch']} / {tr['epochs']}", "-", f"{tr['wall_s']:.1f}", f"{tr['cpu_s']:.1f}",
                 f"removal max rel. err {z['max_rel_err']:.1e}" + ("" if t["exact"] else " (NOT EXACT)")
                 + f"; {z['channels_removed']} channels; {eq[t['params_equal_uniform']]}"])
    title = (f"{name}: ratio {args.ratio}; fine-tuning {s['epochs']} epochs, lr {s['lr']:g}, distilled from dense "
             f"(alpha {s['alpha']:g}, T {s['temperature']:g}); train-sparse the same")
    out = [(title, head, rows)]
    head2 = ["method", "params", "top-1 trained %", "vs dense from scratch (pts)", "vs trained dense (pts)",
             "best / last epoch", "last-epoch top-1 %", "train s", "CPU s"]
    rows2 = []
    for r in res["init"]:
        label = "dense from scratch (reference)" if r["criterion"] == "dense" else f"{r['criterion']} at init"
        tr = r["train"]
        rows2.append([label, f"{r['params']:,}", _pct(r["top1"]), f"{r['gap_scratch']:+.2f}", f"{r['gap']:+.2f}",
                      f"{tr['best_epoch']} / {tr['epochs']}", _pct(tr.get("top1_last_epoch")), f"{tr['wall_s']:.1f}",
                      f"{tr['cpu_s']:.1f}"])
    title2 = (f"{name}: pruned at initialization (ratio {args.ratio}), then trained from scratch "
              f"{s['scratch_epochs']} epochs, lr {s['scratch_lr']:g}, labels only")
    out.append((title2, head2, rows2))
    return out


def print_markdown(title: str, head: list[str], rows: list[list[str]]) -> None:
    print(f"\n**{title}**\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


def print_rich(title: str, head: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for h in head:
        table.add_column(h, justify="left" if h in ("method", "notes") else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=None if sys.stdout.isatty() else 240).print(table)


def machine(threads: int) -> dict:
    import onnxruntime
    import torch

    import spa

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "spa": spa.__version__,
            "loadavg_start": loadavg()}


def run_models(args, name: str, bench_model, **settings) -> dict | None:
    """The digits splits in the work directory (--outdir, or a new temp dir), then
    `bench_model(model, args, work, train_npz, test_npz)` for each of --models; the document
    (machine, settings, results, timings) is written to WORK/NAME.json and returned, or None
    when a spa command failed (its error logged)."""
    from models import digits

    start, cpu0 = time.perf_counter(), own_cpu_s()
    work = args.outdir or Path(tempfile.mkdtemp(prefix=f"spa-{name.replace('_', '-')}-"))
    work.mkdir(parents=True, exist_ok=True)
    train_npz = digits.save_npz(work / "digits_train.npz", "train")
    test_npz = digits.save_npz(work / "digits_test.npz", "test")
    doc = {"machine": machine(args.threads), "ratio": args.ratio, **settings, "seed": 0, "outdir": str(work),
           "models": {}}
    try:
        for model in args.models:
            doc["models"][model] = bench_model(model, args, work, train_npz, test_npz)
    except BenchError as exc:
        log(f"error: {exc}")
        return None
    doc["total_s"] = round(time.perf_counter() - start, 1)
    doc["total_cpu_s"] = round(own_cpu_s() - cpu0, 1)
    doc["machine"]["loadavg_end"] = loadavg()
    (work / f"{name}.json").write_text(json.dumps(doc, indent=1))
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outdir", type=Path, help="work directory (default: a new temp dir)")
    ap.add_argument("--models", nargs="+", default=["cnn", "vit"], choices=("cnn", "vit"))
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, help="fine-tuning / train-sparse epochs (default per model: "
                    + ", ".join(f"{k} {v['epochs']}" for k, v in SETTINGS.items()) + ")")
    ap.add_argument("--scratch-epochs", type=int, help="epochs of training from scratch (default per model: "
                    + ", ".join(f"{k} {v['scratch_epochs']}" for k, v in SETTINGS.items()) + ")")
    ap.add_argument("--lr", type=float, help="fine-tuning learning rate (default per model)")
    ap.add_argument("--scratch-lr", type=float, help="learning rate from scratch (default per model)")
    ap.add_argument("--alpha", type=float, help="distillation weight (default per model)")
    ap.add_argument("--temperature", type=float, help="distillation temperature (default per model)")
    ap.add_argument("--val-split", type=float, default=0.1, help="share of the train split held out to pick the "
                    "best epoch (spa finetune --val-split; 0.1)")
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables (default: rich tables)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    overrides = {"epochs": args.epochs, "scratch_epochs": args.scratch_epochs, "lr": args.lr,
                 "scratch_lr": args.scratch_lr, "alpha": args.alpha, "temperature": args.temperature}
    args.settings = {m: {**SETTINGS[m], **{k: v for k, v in overrides.items() if v is not None}} for m in args.models}
    doc = run_models(args, "bench_train", bench_model, criteria=args.criteria, init_criteria=list(INIT_CRITERIA),
                     val_split=args.val_split)
    if doc is None:
        return 1
    work = Path(doc["outdir"])
    show = print_markdown if args.markdown else print_rich
    m = doc["machine"]
    print(f"\n{m['processor']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch thread), torch {m['torch']}, "
          f"onnxruntime {m['onnxruntime']}, Python {m['python']}; load {m['loadavg_start']} -> {m['loadavg_end']}")
    for name, res in doc["models"].items():
        for title, head, rows in tables(name, res, args):
            show(title, head, rows)
    print(f"\ntotal {doc['total_s']:.0f} s wall, {doc['total_cpu_s']:.0f} s CPU; results: {work / 'bench_train.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
