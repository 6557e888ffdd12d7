"""The benchmark models and CLI helpers shared by tools/bench_ort_cpu.py and tools/bench_gpu.py."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quiet_spa(argv: list) -> int:
    """`spa ARGV` in this process, its stdout (the JSON document) swallowed."""
    from spa.cli.app import main

    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


def dense_model(name: str, cache: Path) -> Path:
    """The exported model `name` (resnet50, bert-base, bert-large; tiny: the bundled example),
    built once into `cache`."""
    if name == "tiny":
        return ROOT / "examples" / "tiny_resnet.onnx"
    path = cache / f"{name}.onnx"
    if not path.exists():
        log(f"building {path}")
        if name == "resnet50":
            from models import resnet50

            resnet50.export(path)
        else:
            from models import encoders

            encoders.export(name, path)
    return path


def parser(doc: str, out_dir: str, models: str, batches: str, duration_s: float):
    """The options both benchmark scripts take (each adds its own)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--cache-dir", default="/tmp/spa-bench-cache", help="where the dense models are built once")
    ap.add_argument("--out-dir", default=out_dir, help="pruned/sparse variants and the JSON results")
    ap.add_argument("--models", default=models)
    ap.add_argument("--batches", default=batches)
    ap.add_argument("--duration-s", type=float, default=duration_s, help="timed seconds per model and batch")
    ap.add_argument("--seq", type=int, default=128, help="sequence length of the text models")
    return ap


def folders(args) -> tuple:
    cache, out_dir = Path(args.cache_dir), Path(args.out_dir)
    cache.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    return cache, out_dir
