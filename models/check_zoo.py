"""Check the exported zoo: ONNX checker (full_check) and ONNX Runtime vs torch.

``check(name, exporter)`` exports one model to a temporary file, runs
``onnx.checker.check_model(model, full_check=True)``, then runs the file with
ONNX Runtime (CPUExecutionProvider) at batch 1 and batch 3 and returns the
largest absolute difference from the torch model's output.

Command line (exit status 1 if any model fails or exceeds the tolerance)::

    python -m models.check_zoo [--exporter torchscript|dynamo|both] [--only NAME ...] [--tol 1e-4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch

if __package__ in (None, ""):  # run as a file: make the `models` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.cnn_zoo import BUILDERS, EXPORTERS, build, example_input, export

BATCHES = (1, 3)
TOLERANCE = 1e-4


def check_onnx(path: str) -> onnx.ModelProto:
    """Load ``path`` and run the full ONNX checker (with shape inference)."""
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    return model


def ort_session(path: str) -> ort.InferenceSession:
    """A single-threaded CPU ONNX Runtime session for ``path``."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def max_abs_error(path: str, name: str, batches=BATCHES, seed: int = 0) -> float:
    """Largest |ORT - torch| over the given batch sizes for the zoo model ``name``."""
    model = build(name, seed)
    sess = ort_session(path)
    input_name = sess.get_inputs()[0].name
    worst = 0.0
    for i, batch in enumerate(batches):
        x = example_input(name, batch, seed=seed + 100 + i)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = sess.run(None, {input_name: x.numpy()})
        if got.shape != expected.shape:
            raise AssertionError(f"{path}: batch {batch} output shape {got.shape} "
                                 f"!= torch {expected.shape}")
        worst = max(worst, float(np.max(np.abs(got - expected))))
    return worst


def check(name: str, exporter: str = "torchscript", path: str | None = None) -> float:
    """Export ``name`` with ``exporter``, validate it, return the max abs error vs torch.

    If ``path`` is given the model is written there (and kept); otherwise a
    temporary file is used.  Checker failures and export failures raise.
    """
    if path is not None:
        export(name, path, exporter)
        check_onnx(path)
        return max_abs_error(path, name)
    with tempfile.TemporaryDirectory() as tmp:
        return check(name, exporter, os.path.join(tmp, f"{name}.{exporter}.onnx"))


def main(argv: list[str] | None = None) -> int:
    """CLI: check every (model, exporter) pair and print one line each."""
    p = argparse.ArgumentParser(prog="python -m models.check_zoo",
                                description=__doc__.split("\n")[0])
    p.add_argument("--exporter", choices=[*EXPORTERS, "both"], default="both")
    p.add_argument("--only", nargs="+", choices=list(BUILDERS), metavar="NAME")
    p.add_argument("--tol", type=float, default=TOLERANCE)
    args = p.parse_args(argv)
    exporters = EXPORTERS if args.exporter == "both" else (args.exporter,)
    failed = 0
    t_all = time.perf_counter()
    for name in args.only or list(BUILDERS):
        for exporter in exporters:
            t0 = time.perf_counter()
            try:
                err = check(name, exporter)
            except Exception as e:  # noqa: BLE001 - report every failure, keep going
                failed += 1
                first = (str(e).splitlines() or [""])[0]
                print(f"FAIL {name:12s} {exporter:11s} {type(e).__name__}: {first}")
                continue
            ok = err < args.tol
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:12s} {exporter:11s} max_abs_err={err:.2e} "
                  f"({time.perf_counter() - t0:.2f}s)")
    print(f"{failed} failure(s), {time.perf_counter() - t_all:.1f}s total")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
