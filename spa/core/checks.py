"""What every pass ensures of the model it writes: the ONNX checker (no worse than its input)
and a run in ONNX Runtime with the input's outputs' names, dtypes and shapes, all finite."""

from __future__ import annotations

import numpy as np
import onnx

from spa.core.errors import SpaError, VerificationError, first_line
from spa.core.model import check_model
from spa.core.runtime import exact_feeds, ort_reason, outputs, random_feeds, run, session

NOT_RUN = {"status": "not run", "reason": "--no-check"}  # the check document when the caller turned it off


def check_against(candidate, original) -> None:
    """Raise VerificationError unless `candidate` passes the full ONNX check.

    A model whose input already fails the full check (some exporters declare wrong output
    ranks) is held to the plain check plus the same full-check complaint as its input.
    Both arguments may be ModelProtos or file paths (files avoid a serialised copy)."""
    after = checker_message(candidate)
    if after is not None:
        before = checker_message(original)
        if after != before or checker_message(candidate, full=False) is not None:
            raise VerificationError(f"pruned model fails the ONNX checker: {after}")


def checker_message(model, full: bool = True) -> str | None:
    """First line of the ONNX checker's complaint about a ModelProto or a file, or None."""
    try:
        check_model(model if isinstance(model, onnx.ModelProto) else str(model), full=full)
    except Exception as exc:  # noqa: BLE001
        return first_line(exc, default=type(exc).__name__)
    return None


def compare_outputs(reference, candidate, feeds: dict, *, light: bool = False) -> dict:
    """Run both in ONNX Runtime on `feeds`; per-output shapes and errors.

    `reference` may also be its outputs already computed ({name: array})."""
    ref = reference if isinstance(reference, dict) else run(reference, feeds, light)
    out = run(candidate, feeds, light)
    report = {"outputs": {}, "ok": set(ref) == set(out)}
    for name, r in ref.items():
        o = out.get(name)
        if not isinstance(r, np.ndarray):  # sequences/maps (ZipMap): same kind and length
            same = type(o) is type(r) and len(o) == len(r)
            report["outputs"][name] = {"kind": type(r).__name__, "same_shape": same}
            report["ok"] &= same
            continue
        entry = {"shape": list(r.shape), "same_shape": o is not None and o.shape == r.shape}
        if entry["same_shape"] and np.issubdtype(r.dtype, np.floating):
            r64, o64 = r.astype(np.float64), o.astype(np.float64)
            entry["max_abs"] = float(np.max(np.abs(r64 - o64))) if r.size else 0.0
            entry["rel_err"] = float(np.linalg.norm(r64 - o64) / max(np.linalg.norm(r64), 1e-12))
            entry["finite"] = bool(np.isfinite(o64).all())
        report["ok"] &= entry["same_shape"] and (o is None or o.dtype == r.dtype)
        report["outputs"][name] = entry
    return report


def output_check(model, pruned, seed: int = 0, *, pruned_file=None) -> dict:
    """Run original and pruned on the same random inputs; raise if the pruned model breaks.

    An input model that ONNX Runtime cannot load, or cannot run on random inputs that match its
    declared (all fixed) input shapes, or at the shapes it is bound to (`model.input_shapes`: given
    or from the data), is refused (SpaError): no result of it can be verified. Where some input
    dim is symbolic and unbound the random inputs are a guess (dims of 1), so the check is skipped
    with ONNX Runtime's reason. The document names the input shapes it ran at. Models run from
    their files (`model.path`, `pruned_file`) when given: needed over 2 GB."""
    feeds = random_feeds(model.proto, seed=seed, shapes=model.input_shapes)
    # from files where we have them: ORT reads them directly, no serialisation copy
    reference = _baseline(model, feeds)
    if "status" in reference:
        return reference
    candidate = pruned_file if pruned_file is not None else pruned
    try:
        rep = compare_outputs(reference["outputs"], candidate, feeds, light=True)
    except Exception as exc:
        raise VerificationError(f"pruned model fails in ONNX Runtime: {ort_reason(exc, default=type(exc).__name__)}") \
            from exc
    if not rep["ok"]:
        raise VerificationError("pruned model changes the outputs' names, dtypes or shapes")
    if any(o.get("finite") is False for o in rep["outputs"].values()):
        raise VerificationError("pruned model gives non-finite outputs")
    errs = [o["rel_err"] for o in rep["outputs"].values() if "rel_err" in o]
    return {"status": "ok", "max_rel_err": max(errs) if errs else 0.0, "outputs": rep["outputs"],
            "input_shapes": {k: list(v.shape) for k, v in feeds.items()}}


def _baseline(model, feeds: dict) -> dict:
    """{"outputs": the input model's outputs on `feeds`}, or a skipped check's document; raises
    SpaError when ONNX Runtime cannot load the input model or run it on inputs it declares."""
    try:
        sess = session(model.path if model.path is not None else model.proto, light=True)
    except SpaError as exc:  # over 2 GB in memory: it cannot be run here at all
        return {"status": "skipped", "reason": exc.message}
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's many load errors
        if not missing_op(exc):
            raise cannot_run(model, exc) from None
        return {"status": "skipped", "reason": f"ONNX Runtime has no implementation of one of its ops, so the input "
                f"model cannot be run ({ort_reason(exc)})"}
    try:
        return {"outputs": outputs(sess, feeds)}
    except Exception as exc:  # noqa: BLE001
        if exact_feeds(model.proto) or _bound(model):
            raise cannot_run(model, exc) from None
        why = ort_reason(exc, default=type(exc).__name__)
        return {"status": "skipped", "reason": "the input model does not run on random inputs with its symbolic dims "
                f"set to 1, which may not be what it expects ({why})"}


def _bound(model) -> bool:
    """Whether every real input with a dynamic dim has a shape bound (spa.core.shapes.bind)."""
    given = getattr(model, "input_shapes", None) or {}
    return bool(given) and all(name in given for name in model.input_names)


def check_notes(check: dict | None) -> list[str]:
    """The note a result's document carries when its output check did not verify it."""
    if check is not None and check.get("status") == "skipped":
        return [f"output check skipped, the result was not run in ONNX Runtime: {check['reason']}"]
    return []


def missing_op(exc: Exception) -> bool:
    """Whether ONNX Runtime failed only for lack of an op's implementation (a custom domain's op,
    a type its CPU kernels lack): the model may be valid and run elsewhere."""
    text = str(exc)
    return "is not a registered function/op" in text or "NOT_IMPLEMENTED" in text \
        or "Could not find an implementation" in text


def refuse_unrunnable(model) -> None:
    """Raise the refusal of output_check when ONNX Runtime cannot load or run the input model
    (for a rewrite that failed: whether the input itself was the cause); else nothing."""
    _baseline(model, random_feeds(model.proto, shapes=getattr(model, "input_shapes", None)))


def cannot_run(model, exc: Exception) -> SpaError:
    """The refusal of an input model ONNX Runtime cannot load or run, with its reason."""
    name = model.path if model.path is not None else "(in memory)"
    return SpaError(f"ONNX Runtime cannot run '{name}' ({ort_reason(exc, default=type(exc).__name__)})",
                    "pass check=False to go on without the output check")


class Fidelity:
    """Running sums for cosine / relative error of one output."""

    def __init__(self):
        self.dot = self.aa = self.bb = self.dd = 0.0
        self.max_abs = 0.0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        self.dot += float(a @ b)
        self.aa += float(a @ a)
        self.bb += float(b @ b)
        d = a - b
        self.dd += float(d @ d)
        self.max_abs = max(self.max_abs, float(np.abs(d).max()) if d.size else 0.0)

    def result(self) -> dict:
        cos = self.dot / max(np.sqrt(self.aa * self.bb), 1e-300) if self.aa and self.bb else float(self.aa == self.bb)
        return {"cosine": cos, "rel_err": float(np.sqrt(self.dd) / max(np.sqrt(self.bb), 1e-300)),
                "max_abs": self.max_abs}
