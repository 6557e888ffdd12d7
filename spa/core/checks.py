"""What every pass ensures of the model it writes: the ONNX checker (no worse than its input)
and a run in ONNX Runtime with the input's outputs' names, dtypes and shapes, all finite.

A pass given a `Gate` also measures how far its result still agrees with the input model
(`agreement`): on calibration samples when there are some, else on random inputs, per float
output the cosine similarity and relative error and, for class scores (rank 2, or rank 3
sequence logits, last axis the classes), the share of rows whose top-1 class is unchanged.
The agreement of an output is its top-1 agreement where that applies, else its cosine; the
model's is the worst output's, and its loss is 1 - agreement (what `max_loss` bounds)."""

from __future__ import annotations

import numpy as np
import onnx

from spa.core import kvcache
from spa.core.data import bounded_batch, fixed_batch_size, model_batches, samples_in, trim
from spa.core.errors import SpaError, VerificationError, first_line, require
from spa.core.model import check_model, runtime_op
from spa.core.runtime import cache_shapes, exact_feeds, graph_inputs, ort_reason, outputs, random_feeds, run, session

NOT_RUN = {"status": "not run", "reason": "--no-check"}  # the check document when the caller turned it off
AGREEMENT_WARN = 0.90  # a result agreeing less than this with its input model is flagged (a warning)
AGREEMENT_SAMPLES = 64  # calibration samples the agreement is measured on (the first ones)
RANDOM_SAMPLES = 8  # random inputs (one sample each) the agreement is measured on without calibration data


def check_against(candidate, original) -> None:
    """Raise VerificationError unless `candidate` passes the full ONNX check.

    A model whose input already fails the full check (some exporters declare wrong output
    ranks) is held to the plain check plus the same full-check complaint as its input.
    Both arguments may be ModelProtos or file paths (files avoid a serialised copy)."""
    after = checker_message(candidate)
    if after is not None:
        before = checker_message(original)
        plain = checker_message(candidate, full=False)
        if after != before or (plain is not None and not _runtime_only(plain, original)):
            raise VerificationError(f"pruned model fails the ONNX checker: {after}")


def _runtime_only(message: str, original) -> bool:
    """Whether the checker's complaint is the input's own, that ONNX has no schema for an op ONNX
    Runtime registers (such inputs load because ONNX Runtime runs them, spa.core.model; the
    output is run in ONNX Runtime by the output check)."""
    return runtime_op(message) is not None and message == checker_message(original, full=False)


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


def output_check(model, pruned, seed: int = 0, *, pruned_file=None, ports=None) -> dict:
    """Run original and pruned on the same random inputs; raise if the pruned model breaks.

    An input model that ONNX Runtime cannot load, or cannot run on random inputs that match its
    declared (all fixed) input shapes, or at the shapes it is bound to (`model.input_shapes`: given
    or from the data), is refused (SpaError): no result of it can be verified. Where some input
    dim is symbolic and unbound the random inputs are a guess (dims of 1), so the check is skipped
    with ONNX Runtime's reason. The document names the input shapes it ran at. Models run from
    their files (`model.path`, `pruned_file`) when given: needed over 2 GB. `ports`: the KV-cache
    axes the pruning shrank (spa.core.kvcache.ports): the pruned model gets the same cache cut to
    them, and its cache outputs are compared with the input's, cut alike."""
    feeds = random_feeds(model.proto, seed=seed, shapes=check_shapes(model))
    # from files where we have them: ORT reads them directly, no serialisation copy
    reference = _baseline(model, feeds)
    if "status" in reference:
        return reference
    empty = _empty_reference(model, seed)  # while the input's session is loaded
    candidate = pruned_file if pruned_file is not None else pruned
    try:
        rep = compare_outputs(kvcache.fit(reference["outputs"], ports), candidate, kvcache.fit(feeds, ports),
                              light=True)
    except Exception as exc:
        raise VerificationError(f"pruned model fails in ONNX Runtime: {ort_reason(exc, default=type(exc).__name__)}") \
            from exc
    _verified(rep)
    errs = [o["rel_err"] for o in rep["outputs"].values() if "rel_err" in o]
    doc = {"status": "ok", "max_rel_err": max(errs) if errs else 0.0, "outputs": rep["outputs"],
           "input_shapes": {k: list(v.shape) for k, v in feeds.items()}}
    return {**doc, **_empty_cache(empty, candidate, ports)}


def check_shapes(model) -> dict | None:
    """The input shapes the random-input checks run at: those the model is bound to, else a KV-cache
    decoder's consistent lengths (spa.core.runtime.cache_shapes), else None (symbolic dims 1)."""
    return getattr(model, "input_shapes", None) or cache_shapes(model.proto, hints=_hints(model))


def _hints(model) -> dict:
    return kvcache.head_size_hints(model.proto.graph, getattr(model, "shapes", None) or {})


def _verified(rep: dict) -> None:
    if not rep["ok"]:
        raise VerificationError("pruned model changes the outputs' names, dtypes or shapes")
    if any(o.get("finite") is False for o in rep["outputs"].values()):
        raise VerificationError("pruned model gives non-finite outputs")


def _empty_reference(model, seed: int) -> tuple | None:
    """(feeds, the input's outputs or why it did not run) with an empty KV cache, for a decoder."""
    shapes = None if model.input_shapes else cache_shapes(model.proto, past=0, hints=_hints(model))
    if shapes is None:
        return None
    feeds = random_feeds(model.proto, seed=seed, shapes=shapes)
    try:
        return feeds, run(model.path if model.path is not None else model.proto, feeds, light=True)
    except Exception as exc:  # noqa: BLE001 - the input model itself does not take an empty cache
        return feeds, ort_reason(exc, default=type(exc).__name__)


def _empty_cache(empty: tuple | None, candidate, ports=None) -> dict:
    """A decoder with a KV cache is also run with an empty one (the first step of a generation),
    where the input model runs so: {"empty_cache": {"max_rel_err"} or {"skipped": why}}, or {}."""
    if empty is None:
        return {}
    feeds, reference = empty
    if isinstance(reference, str):
        return {"empty_cache": {"skipped": reference}}
    try:
        rep = compare_outputs(kvcache.fit(reference, ports), candidate, kvcache.fit(feeds, ports), light=True)
    except Exception as exc:
        raise VerificationError(f"pruned model fails in ONNX Runtime with an empty KV cache: "
                                f"{ort_reason(exc, default=type(exc).__name__)}") from exc
    _verified(rep)
    errs = [o["rel_err"] for o in rep["outputs"].values() if "rel_err" in o]
    return {"empty_cache": {"max_rel_err": max(errs) if errs else 0.0}}


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


class Agreement(Fidelity):
    """Fidelity of one output plus, for class scores, how many rows keep their top-1 class."""

    def __init__(self):
        super().__init__()
        self.same = self.rows = 0
        self.classes = True

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        """`a`: the candidate's output, `b`: the reference's (same shape)."""
        super().add(a, b)
        if not class_scores(b.shape):
            self.classes = False
            return
        top_a, top_b = np.argmax(a, axis=-1), np.argmax(b, axis=-1)
        self.same += int((top_a == top_b).sum())
        self.rows += top_b.size

    def result(self) -> dict:
        r = super().result()
        if self.classes and self.rows:
            r["top1"] = self.same / self.rows
        r["agreement"] = r.get("top1", r["cosine"])
        return r


def class_scores(shape) -> bool:
    """Whether an output of `shape` reads as class scores: (batch, classes) or (batch, steps,
    classes) sequence logits, with at least two classes."""
    return len(shape) in (2, 3) and shape[-1] >= 2


def agreement_batches(proto: onnx.ModelProto, calib=None, seed: int = 0, *, shapes=None) -> tuple[list, str]:
    """(feed dicts, "calibration" | "random"): the first AGREEMENT_SAMPLES samples of `calib`
    (arrays keyed by input name) batched the way the model takes them, else RANDOM_SAMPLES random
    inputs (symbolic dims 1, or at `shapes`)."""
    names = [vi.name for vi, _ in graph_inputs(proto)]
    if isinstance(calib, dict) and all(n in calib for n in names):
        feeds = {n: calib[n] for n in names}
        return model_batches(feeds, bounded_batch(feeds, 16), fixed=fixed_batch_size(proto),
                             max_samples=AGREEMENT_SAMPLES), "calibration"
    return [random_feeds(proto, seed=seed + k, shapes=shapes) for k in range(RANDOM_SAMPLES)], "random"


def agreement(reference, candidate, batches: list, *, ports=None) -> dict:
    """How far `candidate` agrees with `reference` (models or files) on `batches`: per float output
    cosine, relative error, max abs and (class scores) top-1 agreement; the worst output's
    `agreement`, `metric` and `loss` (1 - agreement). `ports`: as for output_check."""
    ref = session(reference, light=True)  # one model at a time: the input's outputs first
    wanted = [kvcache.fit(trim(outputs(ref, feeds), feeds), ports) for feeds in batches]
    del ref
    cand = session(candidate, light=True)
    acc, samples = {}, 0
    for feeds, want in zip(batches, wanted):
        got = trim(outputs(cand, kvcache.fit(feeds, ports)), feeds)
        for name, b in want.items():
            a = got.get(name)
            floating = isinstance(b, np.ndarray) and np.issubdtype(b.dtype, np.floating)
            if floating and getattr(a, "shape", None) == b.shape:
                acc.setdefault(name, Agreement()).add(a, b)
        samples += samples_in(feeds)
    per = {name: a.result() for name, a in acc.items()}
    if not per:
        return {"status": "skipped", "reason": "the model has no float output to compare", "outputs": {}}
    worst = min(per, key=lambda n: per[n]["agreement"])
    return {"status": "ok", "samples": samples, "outputs": per, "output": worst,
            "metric": "top-1" if "top1" in per[worst] else "cosine", "agreement": per[worst]["agreement"],
            "loss": 1.0 - per[worst]["agreement"]}


class Gate:
    """The agreement a pass measures on its result (`Pass.gate`), and the most loss it may have.

    `calib`: arrays keyed by input name (else random inputs, `seed`); `max_loss`: None (measure
    only) or the largest 1 - agreement allowed, else VerificationError before anything is written."""

    def __init__(self, calib=None, seed: int = 0, max_loss: float | None = None, advice: str | None = None):
        self.calib, self.seed, self.max_loss, self.advice = calib, seed, max_loss, advice or ADVICE

    def measure(self, model, candidate, ports=None) -> dict:
        """The agreement document of `candidate` (a ModelProto or file) with the input `model`
        (`ports`: the KV-cache axes the candidate's I/O lost, spa.core.kvcache.ports)."""
        inputs = "random"
        try:
            batches, inputs = agreement_batches(model.proto, self.calib, self.seed,
                                                shapes=check_shapes(model))
            doc = {"inputs": inputs, **agreement(model.path if model.path is not None else model.proto, candidate,
                                                 batches, ports=ports)}
        except Exception as exc:  # noqa: BLE001 - a model ORT cannot run on these inputs: said, not fatal
            reason = exc.message if isinstance(exc, SpaError) else ort_reason(exc, default=type(exc).__name__)
            doc = {"inputs": inputs, "status": "skipped", "reason": reason}
        if self.max_loss is None:
            return doc
        if doc["status"] != "ok":
            raise VerificationError(f"the agreement with the input model could not be measured ({doc['reason']}), "
                                    f"so max_loss={self.max_loss:g} cannot be verified; nothing written")
        if doc["loss"] > self.max_loss:
            raise VerificationError(f"the result no longer agrees with the input model: {agreement_phrase(doc)}, a "
                                    f"loss of {doc['loss']:.3f} > max_loss={self.max_loss:g}; nothing written",
                                    ADVICE)
        return doc


def check_max_loss(max_loss, check: bool) -> None:
    """max_loss= is a fraction in [0, 1], and needs the output check (it is measured there)."""
    require(max_loss is None or (isinstance(max_loss, (int, float)) and not isinstance(max_loss, bool)
                                 and 0 <= max_loss <= 1),
            f"invalid max_loss={max_loss}: it must be in [0, 1] (1 - agreement with the input model)")
    require(max_loss is None or check, "max_loss= is verified by running the result: it needs the output check",
            "drop check=False")


def gate_fields(check: dict | None, advice: str | None = None) -> dict:
    """The document's "agreement" (the Gate's measurement, None when not run) and "warnings"."""
    fit = (check or {}).get("agreement")
    return {"agreement": fit, "warnings": agreement_warning(fit, advice)}


SPARSIFY_ADVICE = ("use method=obs with calib=DATA.npz (it compensates what it masks), or leave small layers dense "
                   "(a larger min_size=)")
QUANTIZE_ADVICE = "try method=entropy or method=percentile, more calib_samples=, or fp16=True"
ADVICE = ("prune less (a smaller ratio= or a target_macs= budget), use criterion=obspa with calib=DATA.npz, "
          "then recover with `spa finetune PRUNED --distill-from DENSE`")


def agreement_phrase(doc: dict) -> str:
    """'top-1 agreement 0.412 on output 'logits' (64 calibration samples)'."""
    return (f"{doc['metric']} agreement {doc['agreement']:.3f} on output '{doc['output']}' "
            f"({doc['samples']} {doc['inputs']} sample{'s' if doc['samples'] != 1 else ''})")


def agreement_warning(doc: dict | None, advice: str | None = None) -> list[str]:
    """The warning of a result whose measured agreement is below AGREEMENT_WARN (else []), with
    `advice` (default: a prune's)."""
    if not doc or doc.get("status") != "ok" or doc["agreement"] >= AGREEMENT_WARN:
        return []
    where = "" if doc["inputs"] == "calibration" else " (random inputs: pass calib= to measure on real data)"
    line = f"the result no longer agrees with the input model: {agreement_phrase(doc)} < {AGREEMENT_WARN:g}{where}"
    return [f"{line}; {advice or ADVICE}"]
