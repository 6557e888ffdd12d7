#!/usr/bin/env python3
"""Depth against width at equal MACs: task metric and ONNX Runtime CPU latency (issue 22).

    python tools/bench_depth.py [--out DIR] [--models digits vit cls rec] [--samples 256] [--epochs 3]
                                [--steps 1 2 4]

For every model and every depth step k (1, 2, ... erasable units, calibrated block influence),
at the MACs that erasing k units leaves (B):

- depth:  `erase=k` (calibration data scores the units; nothing else changes);
- width:  channels only, the uniform l1 ratio whose plan keeps B of the MACs (bisection), as
          pruned and with calibrated obspa compensation;
- both:   `erase=k // 2` (when k > 1), then the uniform ratio that brings the erased model to B,
          pruned by calibrated obspa;

each as pruned and after the same distillation budget (`spa.finetune --distill-from DENSE`,
`--epochs` epochs on the calibration images; the direction classifier learns from the dense
model alone, on its calibration lines; not the recognizer: an epoch of it costs minutes here). Latency: CPU seconds of one inference, one intra-op thread, median of
TIMED_RUNS after two warm-up runs, at batch 1 and 32, each variant against the dense model
measured in the same process (tools' rule: ratios, not absolute times).

Models: `digits` / `vit` = the digits CNN and ViT of models/digits.py, trained here (top-1 on
the 450 test digits); `cls` / `rec` = PP-OCR's direction classifier and PP-OCRv4's recognizer
shipped in rapidocr-onnxruntime (`cls`: agreement of top-1 with the dense model on rendered
lines; `rec`: agreement of the greedy CTC decode with the dense model's, per line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from spa.passes.quantize import cpu_seconds

import spa
from spa import api
from spa.core import cost, depth

TIMED_RUNS = 20
BATCHES = (1, 32)  # --batches


def digits_task(name: str, out: Path, samples: int):
    from models import digits

    test = spa.load_npz(digits.save_npz(out / "digits_test.npz", "test"))
    train = spa.load_npz(digits.save_npz(out / "digits_train.npz", "train"))
    model, _ = digits.train(name)
    path = digits.export(name, out / f"digits_{name}.onnx", "torchscript", model=model)
    calib = {k: v[:samples] for k, v in train.items() if k != "labels"}
    tune = {**calib, "labels": train["labels"][:samples]}
    return path, calib, tune, lambda m: 100 * spa.evaluate(m, test, "labels")["accuracy"], "top-1 %"


def ocr_task(name: str, out: Path, samples: int):
    from bench_budget import cls_task

    if name == "cls":
        path, calib, metric, what = cls_task(out, samples)
        return path, calib, dict(calib), metric, what  # distilled on the calibration lines (no labels)
    return rec_task(samples)


def det_task(out: Path, samples: int):
    """PP-OCRv4's detector: box recall on tools/ocr_eval.py's rendered pages (64 of them), calibrated
    on its 320 x 320 page crops."""
    import onnx

    from tools import ocr_eval

    path = ocr_eval.package_models()["det"]
    calib = spa.load_npz(ocr_eval.write_calibration(out / "ocr_calib", samples)["det"])

    def recall(m) -> float:
        if not isinstance(m, (str, Path)):
            onnx.save(m, str(out / "det_candidate.onnx"))
            m = out / "det_candidate.onnx"
        return 100 * ocr_eval.evaluate(det=str(m), samples=64, parts=("det",))["det"]["recall"]
    return path, calib, None, recall, "box recall %"


def rec_task(samples: int):
    import rapidocr_onnxruntime

    from spa.core.runtime import run

    path = Path(rapidocr_onnxruntime.__file__).parent / "models" / "ch_PP-OCRv4_rec_infer.onnx"
    x = _rec_lines(samples + 128)
    name = spa.load(path).input_names[0]
    calib, held = {name: x[:samples]}, {name: x[samples:]}
    ref = _greedy(next(iter(run(str(path), held).values())))

    def agreement(m) -> float:
        got = _greedy(next(iter(run(m, held).values())))
        return 100 * float(np.mean([a == b for a, b in zip(got, ref)]))
    return path, calib, None, agreement, "lines decoded as dense %"


def _rec_lines(n: int) -> np.ndarray:
    from bench_budget import FONTS, WORDS
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(1)
    fonts = Path("/usr/share/fonts/truetype/dejavu")
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS, size=2)) + f" {rng.integers(10, 9999)}"
        font = ImageFont.truetype(str(fonts / FONTS[rng.integers(len(FONTS))]), 30)
        img = Image.new("RGB", (320, 48), "white")
        ImageDraw.Draw(img).text((6, 6), text, fill="black", font=font)
        a = np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0
        out.append((a - 0.5) / 0.5)
    return np.stack(out).astype(np.float32)


def _greedy(logits: np.ndarray) -> list[tuple]:
    ids = np.argmax(logits, -1)
    lines = []
    for row in ids:
        keep = [int(c) for k, c in enumerate(row) if c != 0 and (k == 0 or c != row[k - 1])]
        lines.append(tuple(keep))
    return lines


def cpu_s(model, feeds: dict) -> float:
    return cpu_seconds(model, feeds, runs=TIMED_RUNS)


def uniform_ratio(model, keep_macs: float, shape: dict) -> float:
    """The smallest uniform l1 ratio whose plan leaves at most `keep_macs` MACs (absolute, at `shape`)."""
    analysis = spa.analyze(model, shape=shape)
    lo, hi = 0.0, 0.95
    for _ in range(18):
        mid = (lo + hi) / 2
        if cost.estimate(analysis, api.make_plan(analysis, mid))["macs"] <= keep_macs:
            hi = mid
        else:
            lo = mid
    return hi


def variants(path: Path, calib: dict, k: int):
    """(label, pruned ModelProto, MACs) of depth, width and both at the MACs erasing k units leaves
    (every count at one calibration sample's shape)."""
    x = next(iter(calib.values()))
    shape = {next(iter(calib)): (1, *x.shape[1:])}
    deep = api.prune(str(path), erase=k, calib=calib, check=False, shape=shape)
    target = deep.to_json()["after"]["macs"]
    yield f"depth: erase {k}", deep.model, target
    r = uniform_ratio(spa.load(path), target, shape)
    wide = api.prune(str(path), ratio=r, check=False, shape=shape)
    yield f"width: l1 ratio {r:.3f}", wide.model, wide.to_json()["after"]["macs"]
    wide = api.prune(str(path), ratio=r, criterion="obspa", calib=calib, check=False, shape=shape)
    yield f"width: obspa calibrated {r:.3f}", wide.model, wide.to_json()["after"]["macs"]
    if k > 1:
        half = api.prune(str(path), erase=k // 2, calib=calib, check=False).model
        r2 = uniform_ratio(api.reinfer(half), target, shape)
        both = api.prune(half, ratio=r2, criterion="obspa", calib=calib, check=False, shape=shape)
        yield f"both: erase {k // 2} + obspa calibrated {r2:.3f}", both.model, both.to_json()["after"]["macs"]


def steps(units: int, wanted) -> list[int]:
    """The depth steps measured: every count up to 8 units, then doubling, and the last one."""
    if wanted:
        return [k for k in wanted if k <= units]
    return sorted({k for k in range(1, units + 1) if k <= 8 or k & (k - 1) == 0} | {units})


def table(name: str, task, epochs: int, wanted=None, batches=BATCHES) -> None:  # positional: one bench row set
    path, calib, tune, metric, what = task
    model = spa.load(path)
    x = next(iter(calib.values()))
    macs0 = spa.analyze(model, shape={model.input_names[0]: (1, *x.shape[1:])}).to_json()["macs"]
    units = depth.find(model)[0]
    feeds = {b: {model.input_names[0]: np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])))} for b in batches}
    dense_t = {b: cpu_s(str(path), f) for b, f in feeds.items()}
    print(f"\n**{name}** ({path.name}: dense {metric(str(path)):.1f} {what}, {macs0:,} MACs, {len(units)} erasable "
          f"units; dense CPU ms/run " + ", ".join(f"b{b} {1e3 * t:.2f}" for b, t in dense_t.items()) + ")\n")
    tuned = f" | after {epochs} epochs distillation" if tune else ""
    print(f"| MACs kept | variant | {what}{tuned} | params kept | " + " | ".join(f"speed-up b{b}" for b in batches)
          + " |")
    print("|---|---|---|" + ("---|" if tune else "") + "---|" * (1 + len(batches)))
    for k in steps(len(units), wanted):
        for label, proto, macs in variants(path, calib, k):
            score = metric(proto)
            if tune:
                labels = "labels" if "labels" in tune else None
                fit = api.finetune(proto, data=tune, labels=labels, distill_from=str(path), epochs=epochs, seed=0)
                score_t = f" | {metric(fit.model):.1f}"
            else:
                score_t = ""
            params = cost.summary(api.reinfer(proto))["params"] / cost.summary(model)["params"]
            speed = " | ".join(f"{dense_t[b] / cpu_s(proto, f):.2f}x" for b, f in feeds.items())
            print(f"| {macs / macs0:.3f} | {label} | {score:.1f}{score_t} | {params:.3f} | {speed} |", flush=True)


TASKS = {"digits": lambda out, n: digits_task("cnn", out, n), "vit": lambda out, n: digits_task("vit", out, n),
         "det": det_task,
         "cls": lambda out, n: ocr_task("cls", out, n), "rec": lambda out, n: ocr_task("rec", out, n)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/spa-bench-depth"))
    p.add_argument("--models", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, nargs="+", help="numbers of units to erase (default: 1-8, then doubling)")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="latency batch sizes (1 32)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for name in a.models:
        table(name, TASKS[name](a.out, a.samples), a.epochs, a.steps, tuple(a.batches))


if __name__ == "__main__":
    main()
