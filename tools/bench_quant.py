#!/usr/bin/env python3
"""INT8 that makes the model faster where it runs: spa's placements against float32 and against ONNX
Runtime's own `quantize_static` / `quantize_dynamic` (references, run here only), on one machine in one run.

    python tools/bench_quant.py [--cache-dir DIR] [--out-dir DIR] [--only resnet50,bert-base,digits,corpus]
                                [--batches 1,8] [--runs 10] [--seq 128] [--corpus-models 8]

Models (random weights unless said; built once into --cache-dir):
  resnet50   models/resnet50.py (TorchScript, opset 17, 224x224); calibration: 16 random images
  bert-base  models/encoders.py (hidden 768, 12 layers), sequence --seq; calibration: 16 random sentences
  digits     models/digits.py's CNN and ViT, trained here on scikit-learn's digits (TorchScript exports):
             top-1 accuracy on the 450 test digits, calibration on 256 training digits
  corpus     the first --corpus-models models of ../shared/corpus/real with Conv/Gemm/MatMul layers that spa's
             INT8 accepts (the test suite's inputs, tests/oracles.py; a refusal is a row with its reason and
             does not count): valid or not, cosine to float32 at the manifest's shapes, batch as given
Variants: fp32; `spa quantize --target ort-cpu` (mode auto: static, or dynamic where faster); `--target
tensorrt` (the placement spa used for every target before); ORT `quantize_static` with its defaults (QDQ,
int8 activations and weights, per tensor) and `quantize_dynamic` with its defaults.
Latency: ONNX Runtime CPU provider, one thread, median CPU seconds of --runs runs after 2 warm-up runs,
at each batch size; ratio = fp32 / variant (above 1: faster). Fused: the integer kernels in the graph ORT's
optimizer makes (spa.passes.quantize.fused_kernels). Markdown on stdout, JSON in OUT_DIR/bench_quant.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools._machine import loadavg
from tools._models import dense_model, log

CORPUS = ROOT.parent / "shared" / "corpus" / "real"


def reference_static(src: Path, out: Path, data: dict) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            n = max((len(v) for v in data.values() if np.ndim(v)), default=1)
            self.it = iter([{k: v if np.ndim(v) == 0 else v[i:i + 1] for k, v in data.items()} for i in range(n)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(out), Reader())
    return out


def reference_dynamic(src: Path, out: Path) -> Path:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(src), str(out))
    return out


def spa_int8(src: Path, out: Path, calib: Path, target: str) -> tuple[Path, dict]:
    import spa

    doc = spa.quantize(src, calib=str(calib), target=target, output=out).to_json()
    return out, doc


def variants(name: str, src: Path, calib_npz: Path, data: dict, work: Path) -> list[tuple[str, Path, dict]]:
    """(label, file, spa's document or {}) of every variant, quantized once into `work`."""
    made = [("fp32", src, {})]
    for target in ("ort-cpu", "tensorrt"):
        log(f"{name}: spa quantize --target {target}")
        out, doc = spa_int8(src, work / f"{name}.spa-{target}.onnx", calib_npz, target)
        made.append((f"spa --target {target}" + (f" ({doc['mode']})" if target == "ort-cpu" else ""), out, doc))
    log(f"{name}: ORT quantize_static / quantize_dynamic (defaults)")
    for label, make in (("ORT quantize_static", lambda: reference_static(src, work / f"{name}.ort-static.onnx", data)),
                        ("ORT quantize_dynamic", lambda: reference_dynamic(src, work / f"{name}.ort-dynamic.onnx"))):
        try:
            made.append((label, make(), {}))
        except Exception as exc:  # noqa: BLE001 - the reference tool fails on this model: a row that says so
            made.append((label, None, {"error": str(exc).splitlines()[0][:160]}))
    return made


def measure(name: str, made: list, feeds_at: dict, runs: int, score) -> list[dict]:
    """Per variant: bytes, fused kernels, latency per batch (and ratio to fp32), the task score."""
    from spa.passes.quantize import cpu_seconds, fused_kernels

    rows, base = [], {}
    for label, path, doc in made:
        if path is None:
            rows.append({"model": name, "variant": label, "valid": False, "bytes": 0, "vs_fp32": {},
                         "error": doc["error"]})
            continue
        row = {"model": name, "variant": label, "bytes": path.stat().st_size, "latency_s": {}, "vs_fp32": {}}
        try:
            row["fused"] = fused_kernels(path)
            for batch, feeds in feeds_at.items():
                t = cpu_seconds(path, feeds, runs)
                base.setdefault(batch, t)
                row["latency_s"][batch], row["vs_fp32"][batch] = t, base[batch] / t
            row["score"] = score(path)
            row["valid"] = True
        except Exception as exc:  # noqa: BLE001 - a reference quantizer's model that ORT cannot run: reported
            row.update(valid=False, error=str(exc).splitlines()[0][:160])
        row.update(mode=doc.get("mode"), elementwise=doc.get("elementwise"), fallback=doc.get("fallback"),
                   speed=doc.get("speed"))
        rows.append(row)
        log(f"  {label}: {row.get('vs_fp32')} {row.get('score')}")
    return rows


def batch_feeds(data: dict, batches: list[int]) -> dict:
    return {b: {k: np.repeat(v[:1], b, axis=0) for k, v in data.items()} for b in batches}


def bench_resnet(a, work: Path) -> list[dict]:
    src = dense_model("resnet50", a.cache_dir)
    rng = np.random.default_rng(0)
    data = {"input": rng.standard_normal((16, 3, 224, 224)).astype(np.float32)}
    return _bench("resnet50", src, data, work, a, _cosine_score(src, {"input": data["input"][:4]}))


def bench_bert(a, work: Path) -> list[dict]:
    src = dense_model("bert-base", a.cache_dir)
    rng = np.random.default_rng(0)
    n, seq = 16, a.seq
    data = {"input_ids": rng.integers(0, 30522, (n, seq)).astype(np.int64),
            "attention_mask": np.ones((n, seq), np.int64), "token_type_ids": np.zeros((n, seq), np.int64)}
    return _bench("bert-base", src, data, work, a, _cosine_score(src, {k: v[:4] for k, v in data.items()}))


def bench_digits(a, work: Path) -> list[dict]:
    from models import digits

    rows = []
    split = digits.load_data()
    for name in ("cnn", "vit"):
        src = a.cache_dir / f"digits_{name}.onnx"
        if not src.exists():
            log(f"training digits {name}")
            digits.export(name, src, "torchscript")
        data = {"x": split["x_train"][:256]}
        rows += _bench(f"digits-{name}", src, data, work, a,
                       lambda p: float(digits.ort_accuracy(p, split["x_test"], split["y_test"])))
    return rows


def bench_corpus(a, work: Path) -> list[dict]:
    """Validity and cosine on real exported models: only spa's placement and the references."""
    manifest = json.loads((CORPUS / "MANIFEST.json").read_text())
    rows, taken = [], 0
    for entry in manifest["files"]:
        hist = entry.get("op_histogram", {})
        if taken >= a.corpus_models or not entry.get("ort_runs") or entry.get("external_data"):
            continue
        if not any(op in hist for op in ("Conv", "Gemm", "MatMul")):
            continue
        src = CORPUS / entry["file"]
        proto = onnx.load(src, load_external_data=False)
        if any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer):
            continue
        data = corpus_feeds(src, entry)
        try:
            rows += _bench(entry["file"].replace("/", "_"), src, data, work, a, _cosine_score(src, data),
                           batches=[None])
            taken += 1
        except Exception as exc:  # noqa: BLE001 - a model spa refuses: a row with its reason, and the next one
            rows.append({"model": entry["file"], "variant": "spa --target ort-cpu", "valid": False,
                         "bytes": src.stat().st_size, "vs_fp32": {}, "error": str(exc).splitlines()[0][:160]})
    return rows


def corpus_feeds(src: Path, entry: dict) -> dict:
    """The test suite's inputs for a corpus model (tests/oracles.py: the manifest's shapes, real
    values where a model needs them)."""
    import spa
    from tests.oracles import feeds_for

    return feeds_for(spa.load(src), entry)


def _cosine_score(src: Path, feeds: dict):
    """The score of a variant with no task labels: its outputs' lowest cosine to float32's on `feeds`."""
    from spa.passes.quantize import output_cosine

    return lambda path: output_cosine(src, path, feeds)


def _bench(name, src, data, work, a, score, batches=None) -> list[dict]:
    calib = work / f"{name}.calib.npz"
    np.savez(calib, **data)
    made = variants(name, src, calib, data, work)
    if batches == [None]:  # corpus: the one sample at the manifest's shapes
        feeds_at = {1: data}
    else:
        feeds_at = batch_feeds(data, a.batches)
    return measure(name, made, feeds_at, a.runs, score)


def table(rows: list[dict], batches: list[int]) -> str:
    head = "| model | variant | valid | score | MB | " + " | ".join(f"vs fp32 b{b}" for b in batches) + " | fused |"
    lines = [head, "|" + "---|" * (6 + len(batches))]
    for r in rows:
        ratios = [f"{r['vs_fp32'][b]:.2f}x" if b in r.get("vs_fp32", {}) else "" for b in batches]
        fused = ", ".join(f"{n} {op}" for op, n in (r.get("fused") or {}).items()) or "none"
        score = f"{r['score']:.4f}" if r.get("score") is not None else r.get("error", "")
        lines.append(f"| {r['model']} | {r['variant']} | {'yes' if r['valid'] else 'NO'} | {score} | "
                     f"{r['bytes'] / 1e6:.1f} | " + " | ".join(ratios) + f" | {fused} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/spa-bench-cache"))
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/spa-bench-quant"))
    ap.add_argument("--only", default="resnet50,bert-base,digits,corpus")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--corpus-models", type=int, default=8)
    a = ap.parse_args()
    a.batches = [int(b) for b in a.batches.split(",")]
    a.cache_dir.mkdir(parents=True, exist_ok=True)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    start = loadavg()
    rows = []
    for part, fn in (("resnet50", bench_resnet), ("bert-base", bench_bert), ("digits", bench_digits),
                     ("corpus", bench_corpus)):
        if part in a.only.split(","):
            rows += fn(a, a.out_dir)
    (a.out_dir / "bench_quant.json").write_text(json.dumps(rows, indent=1))
    print(table(rows, a.batches))
    print(f"\nload average at start / end: {start} / {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
