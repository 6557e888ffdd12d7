"""Top-1 accuracy of the digits models (models/digits.py) pruned without fine-tuning.

    python tools/bench_digits.py [--out DIR] [--ratios 0.3 0.5] [--exporter torchscript]

Trains both models (seconds on a CPU), exports them, prunes every prunable zero-invariant
group at each ratio with each criterion (no compensation, no fine-tuning) and measures
top-1 accuracy on the test split with `spa.evaluate`, plus the cosine similarity of the
logits to the dense model. Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spa
from spa import api, importance


def main() -> None:
    from models import digits

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/spa-digits")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--exporter", default="torchscript", choices=("torchscript", "dynamo"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test = spa.load_npz(digits.save_npz(out / "digits_test.npz", "test"))
    criteria = sorted(importance.CRITERIA)
    print("| model | dense | params | " + " | ".join(f"ratio {r} {c}" for r in args.ratios for c in criteria) + " |")
    print("|---|---|---|" + "---|" * (len(args.ratios) * len(criteria)))
    for name in ("cnn", "vit"):
        start = time.perf_counter()
        model, _ = digits.train(name)
        path = digits.export(name, out / f"digits_{name}.{args.exporter}.onnx", args.exporter, model=model)
        trained = time.perf_counter() - start
        dense = spa.evaluate(str(path), test, "labels")["accuracy"]
        cells = []
        for ratio in args.ratios:
            for criterion in criteria:
                analysis = spa.analyze(spa.load(path))
                pruned = api.prune(analysis, api.make_plan(analysis, ratio, criterion))
                doc = spa.evaluate(pruned, test, "labels", reference=str(path))
                cells.append(f"{100 * doc['accuracy']:.1f}% (cos {doc['fidelity']['logits']['cosine']:.2f})")
        params = spa.cost.params(spa.load(path))
        print(f"| {name} (trained in {trained:.0f} s) | {100 * dense:.1f}% | {params:,} | " + " | ".join(cells) + " |",
              flush=True)


if __name__ == "__main__":
    main()
