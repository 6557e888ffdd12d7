"""Task metrics of the PP-OCR models (det / rec / cls .onnx files, dense or pruned) on rendered text.

rapidocr-onnxruntime (`pip install -e .[real]`) ships PP-OCRv4 det/rec and the PP-OCR mobile v2
direction classifier as ONNX files in its wheel. This script runs the package's own pre- and
post-processing (RapidOCR and its TextDetector / TextRecognizer / TextClassifier, built from the
package's config.yaml) with any of the three model files swapped, on the images of
models/ocr_text.py, and reports:

    det  box recall and precision: detected boxes (their axis-aligned hull) matched one-to-one to
         the true line boxes, greedily by IoU, a match needing IoU >= 0.5
    rec  character accuracy, 1 - edit distance / max(len(truth), len(prediction)) averaged over the
         lines (PaddleOCR's norm_edit_dis), and exact-line accuracy
    cls  accuracy of the 0/180 label (the argmax; the package only turns a crop when its score is
         also over cls_thresh 0.9)
    e2e  RapidOCR on whole pages with all three models: each true line takes the text of the
         detected box it matches (none: the empty string), then character and exact-line accuracy

Text is compared with white space removed, as PaddleOCR's RecMetric does by default (ignore_space):
PP-OCRv4 often drops the space between small words, which a reader does not count as a misread.
Evaluation samples
use `--seed` (default 0); calibration samples use seed 2**20 + `--seed`, so the two never share a
sample.

    python -m tools.ocr_eval --json                                   # the dense models, 200 samples
    python -m tools.ocr_eval --rec pruned_rec.onnx --parts rec,e2e --samples 100
    python -m tools.ocr_eval --write-calib DIR --samples 256          # DIR/{det,rec,cls}.npz

Calibration files hold the tensors each model is given (keyed by its input name, float32): rec
N x 3 x 48 x 320 (the package's resize/pad to its 48 x 320 shape), cls N x 3 x 48 x 192, det
N x 3 x S x S crops (S = `--det-size`, 320 by default) of 736 x 736 pages normalized as the
package does, at the scale the detector sees text at run time (a whole 736 page is 6.5 MB).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from models import ocr_text

PARTS = ("det", "rec", "cls", "e2e")
CALIB_SEED = 1 << 20
IOU = 0.5
PAGE = 736


def package_models() -> dict[str, Path]:
    """The dense .onnx files inside the rapidocr_onnxruntime wheel."""
    import rapidocr_onnxruntime

    folder = Path(rapidocr_onnxruntime.__file__).resolve().parent / "models"
    return {"det": folder / "ch_PP-OCRv4_det_infer.onnx", "rec": folder / "ch_PP-OCRv4_rec_infer.onnx",
            "cls": folder / "ch_ppocr_mobile_v2.0_cls_infer.onnx"}


def _metadata(path) -> dict:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _keys_file() -> str:
    """The recognizer's character list as a file, for a model that lost its `character` metadata."""
    keys = Path(tempfile.gettempdir()) / "spa_ppocr_rec_keys.txt"
    keys.write_text(_metadata(package_models()["rec"])["character"] + "\n", encoding="utf-8")
    return str(keys)


def engine(det=None, rec=None, cls=None):
    """RapidOCR with the given model files (None: the package's dense one), one thread pool each."""
    from rapidocr_onnxruntime import RapidOCR

    dense = package_models()
    paths = {k: Path(v) if v else dense[k] for k, v in (("det", det), ("rec", rec), ("cls", cls))}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(f"model {path} not found")
    kwargs = {f"{k}_model_path": str(v) for k, v in paths.items()}
    if "character" not in _metadata(paths["rec"]):
        kwargs["rec_keys_path"] = _keys_file()
    return RapidOCR(**kwargs)


def clean(text: str) -> str:
    return "".join(text.split())


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def text_scores(predictions, truths) -> dict:
    """{"chars": mean 1 - normalized edit distance, "exact": fraction of identical lines}."""
    preds, trues = [clean(p) for p in predictions], [clean(t) for t in truths]
    chars = [1 - edit_distance(p, t) / max(len(p), len(t), 1) for p, t in zip(preds, trues)]
    exact = [p == t for p, t in zip(preds, trues)]
    return {"chars": float(np.mean(chars)) if chars else 0.0, "exact": float(np.mean(exact)) if exact else 0.0}


def _hull(box) -> tuple:
    pts = np.asarray(box, dtype=np.float64).reshape(-1, 2)
    return (*pts.min(axis=0), *pts.max(axis=0))


def iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def match(detected, truth, threshold: float = IOU) -> dict[int, int]:
    """{truth index: detected index}, one-to-one, greedy from the highest IoU, each pair >= threshold."""
    pairs = sorted(((iou(_hull(d), t), ti, di) for di, d in enumerate(detected) for ti, t in enumerate(truth)),
                   reverse=True)
    taken_t, taken_d, out = set(), set(), {}
    for score, ti, di in pairs:
        if score < threshold:
            break
        if ti not in taken_t and di not in taken_d:
            taken_t.add(ti)
            taken_d.add(di)
            out[ti] = di
    return out


def eval_det(ocr, pages) -> dict:
    found = truths = matched = 0
    for page, truth in pages:
        boxes, _ = ocr.text_det(page)
        boxes = [] if boxes is None else list(boxes)
        matched += len(match(boxes, [t[0] for t in truth]))
        found += len(boxes)
        truths += len(truth)
    return {"recall": matched / max(truths, 1), "precision": matched / max(found, 1), "boxes": found,
            "true_boxes": truths}


def eval_rec(ocr, lines) -> dict:
    results, _ = ocr.text_rec([img for img, _ in lines])
    return {**text_scores([r[0] for r in results], [t for _, t in lines]), "lines": len(lines)}


def eval_cls(ocr, lines) -> dict:
    _, results, _ = ocr.text_cls([img for img, _ in lines])
    right = [("180" in label) == bool(flipped) for (label, _), (_, flipped) in zip(results, lines)]
    return {"accuracy": float(np.mean(right)), "lines": len(lines)}


def eval_e2e(ocr, pages) -> dict:
    preds, trues = [], []
    for page, truth in pages:
        found, _ = ocr(page)
        found = found or []
        pairs = match([f[0] for f in found], [t[0] for t in truth])
        preds += [found[pairs[i]][1] if i in pairs else "" for i in range(len(truth))]
        trues += [t[1] for t in truth]
    return {**text_scores(preds, trues), "lines": len(trues), "pages": len(pages)}


def evaluate(det=None, rec=None, cls=None, *, samples: int = 200, seed: int = 0, parts=PARTS) -> dict:
    """{part: metrics (with wall_s)} for the given model files (None: dense); `samples` per part."""
    ocr = engine(det, rec, cls)
    data = {"det": lambda: ocr_text.pages(samples, seed, PAGE), "rec": lambda: ocr_text.lines(samples, seed),
            "cls": lambda: ocr_text.oriented_lines(samples, seed), "e2e": lambda: ocr_text.pages(samples, seed, PAGE)}
    runs = {"det": eval_det, "rec": eval_rec, "cls": eval_cls, "e2e": eval_e2e}
    out = {"models": {k: str(v) for k, v in (("det", det), ("rec", rec), ("cls", cls)) if v}, "seed": seed}
    for part in parts:
        samples_of_part = data[part]()
        start = time.perf_counter()
        out[part] = {**runs[part](ocr, samples_of_part), "wall_s": round(time.perf_counter() - start, 2)}
    return out


def _crop(tensor: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    _, _, h, w = tensor.shape
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return tensor[0, :, y:y + size, x:x + size]


def calibration(samples: int = 256, seed: int = 0, *, det_size: int = 320) -> dict[str, dict[str, np.ndarray]]:
    """{"det"|"rec"|"cls": {input name: float32 N x C x H x W}}, the tensors the package feeds each model,
    from samples rendered with seed 2**20 + `seed` (never an evaluation sample)."""
    ocr, s = engine(), CALIB_SEED + seed
    rec_shape = ocr.text_rec.rec_image_shape
    rng = np.random.default_rng([s, 99])
    det = [_crop(ocr.text_det.get_preprocess(PAGE)(page), rng, det_size) for page, _ in ocr_text.pages(samples, s)]
    rec = [ocr.text_rec.resize_norm_img(img, rec_shape[2] / rec_shape[1]) for img, _ in ocr_text.lines(samples, s)]
    cls = [ocr.text_cls.resize_norm_img(img) for img, _ in ocr_text.oriented_lines(samples, s)]
    names = {"det": ocr.text_det.infer.get_input_names()[0], "rec": ocr.text_rec.session.get_input_names()[0],
             "cls": ocr.text_cls.infer.get_input_names()[0]}
    tensors = {"det": det, "rec": rec, "cls": cls}
    return {k: {names[k]: np.stack(tensors[k]).astype(np.float32)} for k in names}


def write_calibration(folder, samples: int = 256, seed: int = 0, *, det_size: int = 320) -> dict[str, Path]:
    """DIR/det.npz, DIR/rec.npz, DIR/cls.npz (see `calibration`); {part: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part, arrays in calibration(samples, seed, det_size=det_size).items():
        paths[part] = folder / f"{part}.npz"
        np.savez(paths[part], **arrays)
    return paths


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m tools.ocr_eval", description=__doc__.splitlines()[0])
    p.add_argument("--det", help="detector .onnx (default: the package's PP-OCRv4 det)")
    p.add_argument("--rec", help="recognizer .onnx (default: the package's PP-OCRv4 rec)")
    p.add_argument("--cls", help="direction classifier .onnx (default: the package's mobile v2 cls)")
    p.add_argument("--samples", type=int, default=200, help="samples per part (pages, lines); default 200")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of det,rec,cls,e2e")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON document")
    p.add_argument("--write-calib", metavar="DIR", help="write DIR/{det,rec,cls}.npz calibration tensors instead")
    p.add_argument("--det-size", type=int, default=320, help="side of the det calibration crops (<= 736)")
    args = p.parse_args(argv)
    parts = tuple(x for x in args.parts.split(",") if x)
    if args.samples < 1 or not 32 <= args.det_size <= PAGE or any(x not in PARTS for x in parts):
        p.error(f"--samples must be >= 1, --det-size in 32..{PAGE}, --parts a subset of {','.join(PARTS)}")
    return args, parts


def _print(result: dict) -> None:
    for part in PARTS:
        if part in result:
            metrics = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result[part].items())
            print(f"{part:4s} {metrics}")


def main(argv=None) -> int:
    args, parts = _parse(argv)
    if args.write_calib:
        for path in write_calibration(args.write_calib, args.samples, args.seed, det_size=args.det_size).values():
            with np.load(path) as z:
                print(f"{path}: " + ", ".join(f"{k} {list(z[k].shape)}" for k in z.files))
        return 0
    try:
        result = evaluate(args.det, args.rec, args.cls, samples=args.samples, seed=args.seed, parts=parts)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
