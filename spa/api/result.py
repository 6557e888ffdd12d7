"""What every API call returns: its JSON document, and the model it produced (if any).

    result.to_json()   exactly the document the matching command prints with --json
    result.model       the produced onnx.ModelProto (None for reports and measurements)
    result.save(path)  the checked, atomic save the CLI uses (the pass's promises re-checked
                       on the written file before it is renamed into place)
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from spa.core.errors import SpaError, UsageError
from spa.core.model import Model, check_writable, infer_shapes, load, save
from spa.core.tensors import check_sizes


@dataclass
class Result:
    doc: dict
    model: onnx.ModelProto | None = None
    verify: object = field(default=None, repr=False)  # verify(temp_file) on save, from the pass
    source: Path | None = None
    after_save: object = field(default=None, repr=False)  # after_save(path): files that go beside it (configs)

    def to_json(self) -> dict:
        return self.doc

    def __getitem__(self, key):
        return self.doc[key]

    def __contains__(self, key) -> bool:
        return key in self.doc

    def get(self, key, default=None):
        return self.doc.get(key, default)

    def save(self, path: str | os.PathLike) -> Path:
        """Write `.model` atomically to `path`, re-verified on the written file."""
        if self.model is None:
            raise SpaError("this result holds no model to save")
        path = save(self.model, path, source=self.source, verify=self.verify)
        if self.after_save is not None:
            self.after_save(path)
        return path


def as_model(model, infer: bool = True, copy: bool = True, *, lazy: bool = False) -> Model:
    """A spa.Model from a path, an onnx.ModelProto or a spa.Model. The caller's object is never
    changed: analysis and pruning edit the model they get (shared constants untied, weights
    dropped once written), so a ModelProto or spa.Model is copied first (`copy=False`: use a
    spa.Model as it is, as spa.analyze does with the Model it hands back). `lazy`: a file whose
    external data is large keeps its weights there, read one at a time (spa.core.model.load)."""
    if isinstance(model, Model):
        if not copy:
            return model
        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
        return Model(proto, model.path, dict(model.shapes), dict(model.dtypes), set(model.unknown),
                     set(model.external_files), weights_at=dict(model.weights_at))
    if isinstance(model, onnx.ModelProto):
        check_sizes(model, None)
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        wrapped = Model(proto)
        if infer:
            infer_shapes(wrapped)
        return wrapped
    if isinstance(model, (str, os.PathLike)):
        return load(model, infer=infer, lazy=lazy)
    raise UsageError(f"invalid model={type(model).__name__}: expected a path, an onnx.ModelProto or a spa.Model")


def model_name(model) -> str | None:
    """The path a model argument names, as the JSON documents print it (None in memory)."""
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    if isinstance(model, Model) and model.path is not None:
        return str(model.path)
    return None


def output_target(output, model, *reads) -> Path | None:
    """Fail early when `output` cannot be written, is a file of the input or any other file the
    call reads (`reads`: data, plan, teacher paths; arrays and None are ignored)."""
    if output is None:
        return None
    return check_writable(output, model_name(model), reads=reads)


def stepper(progress):
    """`progress(what)` -> a context manager around each named step of a call (the CLI's spinner
    and timing line); None runs the steps silently."""
    return progress if progress is not None else (lambda what: contextlib.nullcontext())


def counter(tick, unit: str):
    """`progress(done, total)` for a step's `tick` (what a CLI step yields): "12/57 groups, ETA
    40 s", the ETA from the rate so far; None when the step gives no tick (the API's default)."""
    if not callable(tick):
        return None
    start = time.perf_counter()

    def progress(done: float, total: int) -> None:
        spent = time.perf_counter() - start
        eta = f", ETA {spent * (total - done) / done:.0f} s" if done > 0 else ""
        tick(f"{int(done)}/{total} {unit}{eta}")
    return progress
