"""spa.sparsify: N:M semi-structured sparsity (2:4 for NVIDIA sparse tensor cores), verified.

    model ─load─▶ (analysis, to search permutations) ─SparsifyPass: mask N:M─▶ sparse model
          ─ensures: ONNX checker, ONNX Runtime vs the input, the pattern re-read from the written file─▶ Result

The Result's document is `spa sparsify --json`'s: schema_version, input, output, pattern,
min_size, layers, eligible, retained_magnitude, method, permutation, check, agreement, warnings.
"""

from __future__ import annotations

import numpy as np

from spa.api.common import arrays, saver
from spa.api.result import Result, as_model, model_name, output_target, stepper
from spa.core import shapes
from spa.core.analysis import analyze
from spa.core.checks import SPARSIFY_ADVICE, Gate, check_max_loss, check_notes, gate_fields
from spa.core.data import conform
from spa.core.errors import positive_int, require
from spa.passes.base import PassResult
from spa.passes.sparsify import METHODS, SparsifyPass, parse_pattern

SCHEMA = 1


def sparsify(model, *, pattern: str = "2:4", method: str = "magnitude", calib=None, calib_samples: int = 256,
             min_size: int = 16, permute: bool = False, permute_budget: float = 2.0, shape=None, check: bool = True,
             max_loss: float | None = None, output=None, progress=None) -> Result:
    """Mask every eligible Conv/Gemm/MatMul weight of `model` to `pattern` (N:M along the reduction).

    method "magnitude" keeps the N largest |w| of each run of M; "obs" (needs `calib`: a path to an
    .npz or arrays keyed by input name, `calib_samples` of them used) selects and compensates with
    second-order statistics (SparseGPT-style). `permute`: search channel permutations of coupled
    groups first (`permute_budget` seconds per group). `output`: write there (checked on the written
    file before it is renamed into place), else the result is checked in memory. `min_size`: the
    smallest reduction/output size a layer needs. `check=False`: no run in ONNX Runtime against the
    input (the ONNX checker and the pattern re-read only). `shape`: the input shapes the output check
    runs at ({"x": (1, 3, 736, 736)}; default: the first sample of `calib`, else dynamic dims as 1).

    With `check`, the result's agreement with the input is measured on `calib` (with method
    "magnitude" it is used for that alone), else on random inputs (spa.core.checks.Gate); below
    AGREEMENT_WARN it is warned about in "warnings"; `max_loss`: the most it may lose (else
    VerificationError, nothing written)."""
    n, m = parse_pattern(pattern)
    _check(method, calib, calib_samples, min_size, permute_budget)
    check_max_loss(max_loss, check)
    shapes.parse(shape)
    out = output_target(output, model, calib)
    step = stepper(progress)
    with step("load + shape inference"):
        loaded = as_model(model)
    loaded.refuse_overwrite(out)
    data = conform(arrays(calib), loaded.proto, "calib=")
    shapes.bind(loaded, shape, data)
    analysis = None
    if permute:
        with step("analysis"):
            analysis = analyze(loaded)
    rewrite = SparsifyPass(n, m, min_size, method, data if method == "obs" else None, calib_samples, analysis,
                           permute_budget)
    rewrite.run_check = check
    rewrite.gate = Gate(data, 0, max_loss, SPARSIFY_ADVICE) if check else None
    what = f"masking {n}:{m}" + (" (calibrated OBS)" if method == "obs" else "") + \
        (" + permutation search" if permute else "")
    done = rewrite.run(loaded, out, step=step, what=what)
    doc = {**_doc(model, out, rewrite, done, permute), **shapes.record(loaded)}
    return Result(doc, done.model, saver(rewrite, loaded, done), loaded.path)


def _check(method: str, calib, calib_samples: int, min_size: int, permute_budget: float) -> None:
    """Every bad value or combination, before any work."""
    positive_int("min_size", min_size)
    require(method in METHODS, f"invalid method={method!r}", f"choose one of: {', '.join(METHODS)}")
    require(method != "obs" or calib is not None, "method=obs needs calibration data", "pass calib=DATA.npz")
    positive_int("calib_samples", calib_samples)
    require(isinstance(permute_budget, (int, float)) and permute_budget > 0,
            f"invalid permute_budget={permute_budget}: it must be a positive number of seconds")


def _doc(model, out, rewrite: SparsifyPass, done: PassResult, permute: bool) -> dict:
    found = done.stats["layers"]
    eligible = [x for x in found if x.eligible]
    return {"schema_version": SCHEMA, "input": model_name(model), "output": None if out is None else str(out),
            "pattern": f"{rewrite.n}:{rewrite.m}", "min_size": rewrite.min_size,
            "layers": [x.to_json() for x in found], "eligible": len(eligible),
            "retained_magnitude": float(np.mean([x.retained for x in eligible])) if eligible else None,
            "method": rewrite.method, "permutation": done.stats["permutation"] if permute else None,
            "check": done.check, "notes": check_notes(done.check), **gate_fields(done.check, SPARSIFY_ADVICE)}
