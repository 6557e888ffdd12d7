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
    from spa.cli import main

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
