"""Top-1 accuracy of the digits models (models/digits.py) pruned without fine-tuning.

    python tools/bench_digits.py [--out DIR] [--ratios 0.3 0.5 0.7] [--models cnn vit] [--exporter torchscript]

Trains both models (seconds on a CPU) and exports them. For every criterion and ratio, every
prunable group loses that fraction of its channels; the pruned model's top-1 accuracy on the
test split is measured (`spa.evaluate`) three ways: as pruned, with data-free OBS compensation
(moments from the graph), and with calibrated compensation (512 training images, group by
group). Criteria that need data score on the same 512 training images; `obspa` is run both
data-free and calibrated. Prints one markdown table per model for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spa
from spa import api
from spa.scoring import criteria

MODES = ("none", "data-free", "calibrated")


def rows(stats: dict) -> list[tuple[str, str, object]]:
    """(label, criterion, scoring stats) for every criterion; obspa once per kind of statistics."""
    out = []
    for name in sorted(criteria.CRITERIA):
        need = criteria.NEEDS.get(name)
        if need == "gradients":  # taylor/snip/grasp/crop need torch and labels: tools/bench_train.py measures them
            continue
        if name == "obspa":
            out += [("obspa (data-free)", name, stats["data-free"]), ("obspa (calibrated)", name, stats["calibrated"])]
        else:
            out.append((name + (" (calibrated)" if need else ""), name, stats["calibrated"] if need else None))
    return out


def accuracy(analysis, plan, mode: str, stats: dict, train, test) -> float:
    values = None
    if mode == "data-free":
        values = api.compensation(analysis, plan, stats=stats["data-free"])[0]
    elif mode == "calibrated":
        values = api.compensation(analysis, plan, calib=train)[0]
    pruned = api.prune(analysis, plan, check=False, compensate=values)
    return spa.evaluate(pruned, test, "labels")["accuracy"]


def table(name: str, path: Path, ratios: list[float], train, test) -> None:
    analysis = spa.analyze(spa.load(path))
    stats = {"data-free": api.statistics(analysis), "calibrated": api.statistics(analysis, train)}
    dense = spa.evaluate(str(path), test, "labels")["accuracy"]
    print(f"\n**{name}** ({path.name}, dense top-1 {100 * dense:.1f}%, {spa.cost.params(spa.load(path)):,} params)\n")
    print("| criterion | " + " | ".join(f"{r} {m}" for r in ratios for m in MODES) + " |")
    print("|---|" + "---|" * (len(ratios) * len(MODES)))
    for label, criterion, scoring in rows(stats):
        cells = []
        for ratio in ratios:
            plan = api.make_plan(analysis, ratio, criterion, stats=scoring)
            cells += [f"{100 * accuracy(analysis, plan, mode, stats, train, test):.1f}" for mode in MODES]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    from models import digits

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/spa-digits")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--models", nargs="+", default=["cnn", "vit"], choices=("cnn", "vit"))
    ap.add_argument("--exporter", default="torchscript", choices=("torchscript", "dynamo"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test = spa.load_npz(digits.save_npz(out / "digits_test.npz", "test"))
    train = spa.load_npz(digits.save_npz(out / "digits_train.npz", "train"))
    for name in args.models:
        start = time.perf_counter()
        model, _ = digits.train(name)
        path = digits.export(name, out / f"digits_{name}.{args.exporter}.onnx", args.exporter, model=model)
        print(f"{name}: trained and exported in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        table(name, path, args.ratios, train, test)


if __name__ == "__main__":
    main()
