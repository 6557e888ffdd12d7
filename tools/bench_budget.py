"""Budget allocation against the uniform ratio at the same MACs, on a task metric, no fine-tuning.

    python tools/bench_budget.py [--out DIR] [--budgets 0.8 0.65 0.5] [--models digits cls] [--samples 256]
    python tools/bench_budget.py --members

For every MACs budget B and model, the rows of docs/benchmarks.md "Budgets":

- l1 uniform: `--ratio R`, R the smallest ratio whose plan keeps at most B of the MACs (the
  uniform plan at the same cost, found by bisection on spa.cost.estimate);
- l1 budget (no data): `--target-macs B` (sensitivity estimated, structure protects);
- l1 budget (measured): `--target-macs B --calib` (each group alone at ratio 0.5, no compensation);
- obspa calibrated uniform: `--ratio R --criterion obspa --calib` (calibrated compensation);
- obspa calibrated budget: `--target-macs B --criterion obspa --calib`.

`--members` instead measures the data-free criteria question of issue 19: spa's l1/l2 divide each
member's scores by their mean before averaging over the group's members; Torch-Pruning's group
magnitude sums raw magnitudes. Both, on the digits CNN trained with seeds 0-2, uniform ratios
0.2/0.3/0.5, top-1 as pruned / with data-free compensation.

Models: `digits` = the digits CNN of models/digits.py (trained here in seconds; top-1 on the 450
test digits, calibration on training images); `cls` = the PP-OCR direction classifier shipped in
rapidocr-onnxruntime (agreement of the pruned model's top-1 with the dense model's on rendered
text lines, half of them upside down, DejaVu fonts; calibration on other renders).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spa
from spa import api
from spa.core import cost
from spa.core.runtime import run
from spa.planning.plan import allocate
from spa.scoring import criteria

WORDS = ("invoice", "total", "amount", "date", "name", "address", "phone", "number", "order", "item",
         "quantity", "price", "tax", "paid", "receipt", "customer", "account", "balance", "due", "payment",
         "method", "street", "city", "country", "code", "reference")
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")


def digits_task(out: Path, samples: int):
    from models import digits

    test = spa.load_npz(digits.save_npz(out / "digits_test.npz", "test"))
    train = spa.load_npz(digits.save_npz(out / "digits_train.npz", "train"))
    model, _ = digits.train("cnn")
    path = digits.export("cnn", out / "digits_cnn.torchscript.onnx", "torchscript", model=model)
    calib = {k: v[:samples] for k, v in train.items() if k != "labels"}
    return path, calib, lambda m: 100 * spa.evaluate(m, test, "labels")["accuracy"], "top-1 %"


def _line(rng, font_dir: Path):
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_dir / FONTS[rng.integers(len(FONTS))]), int(rng.integers(22, 34)))
    text = " ".join(rng.choice(WORDS, int(rng.integers(1, 4))))
    w = int(font.getlength(text)) + 16
    img = Image.new("RGB", (w, 48), tuple(int(v) for v in rng.integers(200, 256, 3)))
    ImageDraw.Draw(img).text((8, 6), text, fill=tuple(int(v) for v in rng.integers(0, 80, 3)), font=font)
    return img.rotate(180) if rng.random() < 0.5 else img


def _preprocess(img) -> np.ndarray:
    """rapidocr's classifier input: height 48, width up to 192 (ratio kept), [-1, 1], right-padded."""
    w = min(192, int(np.ceil(48 * img.width / img.height)))
    a = np.asarray(img.resize((w, 48)), dtype=np.float32).transpose(2, 0, 1) / 255.0
    out = np.zeros((3, 48, 192), np.float32)
    out[:, :, :w] = (a - 0.5) / 0.5
    return out


def cls_task(out: Path, samples: int):
    rapidocr = __import__("rapidocr_onnxruntime")
    path = Path(rapidocr.__file__).parent / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    fonts = Path("/usr/share/fonts/truetype/dejavu")
    rng = np.random.default_rng(0)
    x = np.stack([_preprocess(_line(rng, fonts)) for _ in range(samples + 256)])
    name = spa.load(path).input_names[0]
    calib, held = {name: x[:samples]}, {name: x[samples:]}
    dense = run(str(path), held)
    ref = np.argmax(next(iter(dense.values())), -1)

    def agreement(m) -> float:
        got = run(m, held)
        return 100 * float(np.mean(np.argmax(next(iter(got.values())), -1) == ref))
    return path, calib, agreement, "agreement with dense %"


def uniform_ratio(analysis, keep: float) -> float:
    """The smallest uniform ratio whose plan keeps at most `keep` of the MACs."""
    full = cost.estimate(analysis, {})["macs"]
    lo, hi = 0.0, 0.95
    for _ in range(20):
        mid = (lo + hi) / 2
        if cost.estimate(analysis, api.make_plan(analysis, mid))["macs"] / full <= keep:
            hi = mid
        else:
            lo = mid
    return hi


def rows(path: Path, calib: dict, keep: float):
    r = uniform_ratio(spa.analyze(spa.load(path)), keep)
    yield f"l1 uniform (ratio {r:.3f})", {"ratio": r}
    yield "l1 budget, no data", {"target_macs": keep}
    yield "l1 budget, measured", {"target_macs": keep, "calib": calib}
    yield f"obspa calibrated uniform (ratio {r:.3f})", {"ratio": r, "criterion": "obspa", "calib": calib}
    yield "obspa calibrated budget", {"target_macs": keep, "criterion": "obspa", "calib": calib}


def table(name: str, task, budgets) -> None:
    path, calib, metric, what = task
    print(f"\n**{name}** ({path.name}, dense {metric(str(path)):.1f} {what}, "
          f"{cost.summary(spa.load(path))['macs']:,} MACs; {len(next(iter(calib.values())))} calibration samples)\n")
    print("| MACs budget | method | MACs kept | params kept | " + what + " | groups protected | spa wall s |")
    print("|---|---|---|---|---|---|---|")
    for keep in budgets:
        for label, opts in rows(path, calib, keep):
            start = time.perf_counter()
            res = api.prune(str(path), check=False, **opts)
            wall = time.perf_counter() - start
            doc = res.to_json()
            b, a = doc["before"], doc["after"]
            prot = len(doc["budget"]["protected"]) if doc["budget"] else "-"
            print(f"| {keep} | {label} | {a['macs'] / b['macs']:.3f} | {a['params'] / b['params']:.3f} | "
                  f"{metric(res.model):.1f} | {prot} | {wall:.1f} |", flush=True)


def _raw(group, weights, power: int) -> np.ndarray:
    """Torch-Pruning's group magnitude: raw per-channel sums over every weight member, not normalised."""
    total = 0.0
    for m in [m for m in group.members if weights[m.tensor].ndim >= 2] or group.members:
        w = weights[m.tensor]
        axes = tuple(a for a in range(w.ndim) if a != m.axis)
        mag = np.abs(w) if power == 1 else np.square(w)
        per = mag.sum(axis=axes, dtype=np.float64) if axes else mag.astype(np.float64)
        total = total + np.array([per[np.asarray(ix)].sum() for ix in m.positions])
    return total if power == 1 else np.sqrt(total)


def members_table(out: Path) -> None:
    from models import digits

    criteria.criterion("l1-raw")(lambda g, w, data=None, seed=0: _raw(g, w, 1))
    criteria.criterion("l2-raw")(lambda g, w, data=None, seed=0: _raw(g, w, 2))
    test = spa.load_npz(digits.save_npz(out / "digits_test.npz", "test"))
    print("| seed | dense | criterion | 0.2 | 0.3 | 0.5 |\n|---|---|---|---|---|---|")
    for seed in (0, 1, 2):
        model, _ = digits.train("cnn", seed=seed)
        path = digits.export("cnn", out / f"digits_cnn_{seed}.onnx", "torchscript", model=model, seed=seed)
        a, top1 = spa.analyze(spa.load(path)), lambda m: 100 * spa.evaluate(m, test, "labels")["accuracy"]
        st = api.statistics(a)
        for c in ("l1", "l1-raw", "l2", "l2-raw"):
            cells = []
            for r in (0.2, 0.3, 0.5):
                plan = api.make_plan(a, r, c)
                comp = api.compensation(a, plan, stats=st)[0]
                cells.append(f"{top1(api.prune(a, plan, check=False)):.1f} / "
                             f"{top1(api.prune(a, plan, check=False, compensate=comp)):.1f}")
            print(f"| {seed} | {top1(str(path)):.1f} | {c} | " + " | ".join(cells) + " |", flush=True)


def no_data_table(out: Path, budgets) -> None:
    """Issue 19's "no data: never worse than l1 uniform": the digits CNN (seeds 0-2), l1, no
    calibration data, top-1 % at each MACs budget for the uniform ratio, the allocation with every
    group alike (the estimate), and the allocation from sensitivity measured on 64 random inputs
    (spa's default without data), each at round_to 1 and at the default rounding."""
    from models import digits

    test = spa.load_npz(digits.save_npz(out / "digits_test.npz", "test"))
    print("| seed | dense | MACs budget | l1 uniform | estimated, round 1 | estimated, default round | "
          "random-input sensitivity, round 1 | random-input sensitivity, default round (spa's default) |")
    print("|---|---|---|---|---|---|---|---|")
    for seed in (0, 1, 2):
        model, _ = digits.train("cnn", seed=seed)
        path = str(digits.export("cnn", out / f"digits_cnn_{seed}.onnx", "torchscript", model=model, seed=seed))
        top1 = lambda m: 100 * spa.evaluate(m, test, "labels")["accuracy"]
        name = spa.load(path).input_names[0]
        rnd = {name: np.random.default_rng(0).standard_normal((64, *test[name].shape[1:])).astype(np.float32)}
        sens = spa.sensitivity(path, rnd, ratios=(0.5,)).to_json()
        analysis = spa.analyze(spa.load(path))
        for keep in budgets:
            cells = [top1(api.prune(path, check=False, ratio=uniform_ratio(analysis, keep)).model)]
            for round_to, round_min in ((1, 0), (8, 32)):  # every group alike (w_g = 1): spa without data before
                plan = allocate(analysis, "macs", keep, round_to=round_to, round_min=round_min)[0]
                cells.append(top1(api.prune(analysis, plan, check=False)))
            for rounding in ({"round_to": 1}, {}):
                cells.append(top1(api.prune(path, check=False, target_macs=keep, sensitivity=sens, **rounding).model))
            print(f"| {seed} | {top1(path):.1f} | {keep} | " + " | ".join(f"{c:.1f}" for c in cells) + " |",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/spa-budget")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.65, 0.5])
    ap.add_argument("--models", nargs="+", default=["digits", "cls"], choices=("digits", "cls"))
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--members", action="store_true", help="raw versus per-member normalised l1/l2 (digits CNN)")
    ap.add_argument("--no-data", action="store_true", help="allocations without calibration data (digits CNN)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.members:
        return members_table(out)
    if args.no_data:
        return no_data_table(out, args.budgets)
    for name in args.models:
        task = digits_task(out, args.samples) if name == "digits" else cls_task(out, args.samples)
        table(name, task, args.budgets)


if __name__ == "__main__":
    main()
