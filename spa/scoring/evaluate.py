"""Measured quality of a model on data: top-1 accuracy, and fidelity to a reference model.

    model (+ reference) ─ONNX Runtime, batch by batch─▶ {accuracy, outputs: {cosine, rel_err, max_abs}}

Fidelity compares every float output of `model` with the same output of `reference` over
all samples: cosine similarity of the flattened outputs, relative error
||a - b|| / ||b||, and the largest absolute difference. Accuracy is the share of samples
whose arg-max over the last axis of the scored output equals the label.
"""

from __future__ import annotations

import os

import numpy as np
import onnx

from spa.core.checks import Fidelity
from spa.core.data import as_batches, fixed_batch_size, model_batches, require_keys, split_labels, trim
from spa.core.errors import SpaError
from spa.core.runtime import checked_session, ort_reason


def _scored_output(names: list[str], output: str | None) -> str:
    if output is None:
        return names[0]
    if output not in names:
        raise SpaError(f"model has no output '{output}' (outputs: {names})")
    return output


def _graph(model) -> onnx.ModelProto:
    """The model's graph without its external weights (the session opened it already)."""
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)


def _run(sess, names: list, feeds: dict, model) -> dict:
    """Outputs `names` on `feeds`, the padding rows of a fixed-batch model dropped; a run that fails
    as one line naming the model."""
    try:
        return trim(dict(zip(names, sess.run(names, feeds))), feeds)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's run errors, as one line
        name = f"model '{model}'" if isinstance(model, (str, os.PathLike)) else "the model in memory"
        raise SpaError(f"{name} does not run on the data: {ort_reason(exc)}",
                       "give arrays of the model's input shapes, samples along the first axis") from None


def evaluate(model, data, labels=None, *, reference=None, output: str | None = None, batch_size: int = 64) -> dict:
    """Accuracy (with `labels`) and fidelity to `reference` (a model file or ModelProto).

    `data`: arrays keyed by input name (batched here; other keys are ignored) or any iterable
    of feed dicts. `labels`: an array, or with array `data` the key of its labels array."""
    sess = checked_session(model)
    if isinstance(data, dict):
        key = labels if isinstance(labels, str) else None
        data, found = split_labels(data, [i.name for i in sess.get_inputs()], key)
        labels = found if key is not None else labels
        data = model_batches(data, batch_size, fixed=fixed_batch_size(_graph(model)))
    ref_sess = checked_session(reference) if reference is not None else None
    names = [o.name for o in sess.get_outputs()]
    scored = _scored_output(names, output)
    if ref_sess is not None and not set(names) <= {o.name for o in ref_sess.get_outputs()}:
        raise SpaError(f"the reference model lacks outputs of the model ({names})")
    fid = {}
    correct = seen = 0
    for feeds in as_batches(data, batch_size):
        got = _run(sess, names, feeds, model)
        if labels is not None:
            pred = np.argmax(got[scored], axis=-1)
            y = np.asarray(labels[seen:seen + len(pred)])
            if pred.shape != y.shape:
                raise SpaError(f"output '{scored}' of shape {list(got[scored].shape)} does not give one class per "
                               f"sample (labels {list(y.shape)})", "pick the class scores with --output")
            correct += int((pred == y).sum())
        seen += len(got[scored])
        if ref_sess is not None:
            want = _run(ref_sess, names, feeds, reference)
            for n in names:
                if np.issubdtype(np.asarray(got[n]).dtype, np.floating):
                    fid.setdefault(n, Fidelity()).add(got[n], want[n])
    if seen == 0:
        raise SpaError("no samples in the data")
    doc = {"samples": seen, "scored_output": scored}
    if labels is not None:
        if len(labels) != seen:
            raise SpaError(f"{len(labels)} labels for {seen} samples")
        doc["accuracy"] = correct / seen
    if ref_sess is not None:
        doc["fidelity"] = {n: f.result() for n, f in fid.items()}
    return doc


def evaluate_arrays(model_path, arrays: dict, labels: str | None = None, *, reference=None,
                    max_samples: int | None = None, batch_size: int = 64) -> dict:
    """`evaluate` over arrays keyed by input name, batched the way the model takes them: in its
    fixed batch size when its first input has one, 0-d arrays (a sample rate) with every batch.
    `model_path`: a model file or a ModelProto."""
    in_memory = isinstance(model_path, onnx.ModelProto)
    proto = model_path if in_memory else onnx.load(str(model_path), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i.name for i in proto.graph.input if i.name not in inits]
    require_keys(arrays, inputs, labels)
    feeds = model_batches({n: arrays[n] for n in inputs}, batch_size, fixed=fixed_batch_size(proto),
                          max_samples=max_samples)
    y = None
    if labels is not None:
        y = np.asarray(arrays[labels])[:max_samples]
    return evaluate(model_path if in_memory else str(model_path), feeds, y, reference=reference)
