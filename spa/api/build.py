"""spa.build: an ONNX model -> a TensorRT engine, and what TensorRT really picked.

    model ─checks─▶ TensorRT builder (strongly typed; sparse=; shapes= profile; timing cache)
          ─▶ engine bytes ─inspector─▶ doc: layer types, sparse kernels picked
          ─▶ output= (temp file + rename: never half an engine); result.engine holds the bytes

Every check that needs no TensorRT runs first (the options, the model, shapes= against its inputs,
the output path), then tensorrt is imported (missing: one line naming `pip install 'spa[tensorrt]'`),
then the precision is checked against the model's types, and only then does the build start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from spa.api.result import Result, as_model, model_name, stepper
from spa.backends import base
from spa.backends import trt as trt_backend  # tensorrt itself is imported when used
from spa.backends.trt_plan import layer_types, onnx_inputs, parse_shapes, profile_shapes, sparse_layers
from spa.core.errors import SpaError, first_line, positive_int, require
from spa.core.model import check_writable, quiet_stdout, write_atomic

SCHEMA = 1


@dataclass
class Engine(Result):
    """A Result whose product is a serialized TensorRT engine (`engine`), not an ONNX model."""

    engine: bytes = b""

    def save(self, path: str | os.PathLike) -> Path:
        """Write the engine atomically to `path`."""
        if not self.engine:
            raise SpaError("this result holds no engine to save")
        path = check_writable(path, self.source)
        write_atomic(path, self.engine)
        return path


def build(model, *, fp16: bool = False, bf16: bool = False, sparse: bool = False, shapes=None, timing_cache=None,
          workspace: int | None = None, output=None, log=None, progress=None) -> Engine:
    """Build a TensorRT engine of `model` (a path, onnx.ModelProto or spa.Model). `shapes`: the
    profile of dynamic inputs, as text 'NAME:MIN/OPT/MAX[,...]' or {name: (min, opt, max)};
    `timing_cache`: a file read and updated; `workspace`: MiB; `log(line)`: TensorRT's warnings.
    Without `output` the engine is only in `result.engine` (`result.save(path)` writes it)."""
    out, profiles, source = _check(model, fp16, bf16, shapes, timing_cache, workspace, output)
    trt = trt_backend.tensorrt()
    precision = "fp16" if fp16 else "bf16" if bf16 else "fp32"
    options = base.Options(precision=precision, sparse=sparse, shapes=profiles)
    with stepper(progress)("building the TensorRT engine"), quiet_stdout():
        built = trt_backend.build(source, options, workspace_mb=workspace, timing_cache=timing_cache, log=log)
    sparse_doc, types = _inspect(trt_backend, built)
    if out is not None:
        write_atomic(out, built.plan)
    doc = {"schema_version": SCHEMA, "input": model_name(model), "output": None if out is None else str(out),
           "bytes": len(built.plan), "tensorrt": trt.__version__,
           "precision": {"requested": precision, "used": built.precision, "strongly_typed": built.strongly_typed,
                         "layer_types": types},
           "sparse": {"requested": bool(sparse), **sparse_doc},
           "profiles": {k: {"min": list(lo), "opt": list(opt), "max": list(hi)}
                        for k, (lo, opt, hi) in built.profiles.items()},
           "timing_cache": None if timing_cache is None else str(timing_cache),
           "build_seconds": round(built.seconds, 3), "notes": built.notes}
    name = model_name(model)
    return Engine(doc, source=Path(name) if name else None, engine=built.plan)


def _check(model, fp16: bool, bf16: bool, shapes, timing_cache, workspace, output) -> tuple:
    """Every check that needs no TensorRT, cheapest first: (output path or None, profiles, what
    the builder reads: the model's file where it has one, else its ModelProto)."""
    require(not (fp16 and bf16), "fp16 and bf16 exclude each other", "choose one precision")
    if workspace is not None:
        positive_int("workspace", workspace)
    loaded = as_model(model, infer=False)
    profiles = parse_shapes(shapes) if isinstance(shapes, str) else dict(shapes or {})
    profile_shapes(onnx_inputs(loaded.proto), profiles)
    name = model_name(model)
    out = None
    if output is not None:
        out = check_writable(output, name, reads=(timing_cache,))
        if out.suffix.lower() == ".onnx":
            raise SpaError(f"refusing to write a TensorRT engine to '{out}'", "name it .engine")
    if timing_cache:
        check_writable(timing_cache, name)
    return out, profiles, name if name is not None else loaded.proto


def _inspect(backend, built) -> tuple[dict, dict | None]:
    """(sparse kernels picked, layer types) from the engine inspector; a failure is reported, the
    engine is still written."""
    eligible = built.sparsity.get("eligible")
    try:
        info = backend.inspect_plan(built.plan, "the engine just built")
    except SpaError as exc:
        return {"error": str(exc), "eligible": eligible}, None
    except Exception as exc:  # noqa: BLE001 - the inspector is a report; the engine is fine
        return {"error": f"engine inspector failed: {first_line(exc, 200)}", "eligible": eligible}, None
    return sparse_layers(info, eligible), layer_types(info)
