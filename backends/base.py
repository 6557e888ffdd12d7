"""One interface for every runtime, so benchmarking and parity checks are written once.

    backends.open(model, "ort" | "ort-cuda" | "ort-trt" | "trt" | "torch" | "torch-cuda", Options)
        ─▶ Session: .inputs / .outputs (TensorInfo), .run(feeds) -> {name: array},
                    .describe() (what really ran), .runner(feeds) -> Runner (one timed inference)

A backend module is imported when it is asked for, not before: a missing package (tensorrt,
onnxruntime-gpu, torch) or a missing GPU is a SpaError naming what to install, at use time.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np

from spa.core.data import common_batch
from spa.core.errors import SpaError
from spa.core.runtime import random_array

# name -> (module in spa.backends, what it needs, the pip extra that brings it)
BACKENDS = {
    "ort": ("ort", "onnxruntime", None),
    "ort-cuda": ("ort", "onnxruntime-gpu (CUDAExecutionProvider)", "gpu"),
    "ort-trt": ("ort", "onnxruntime-gpu (TensorrtExecutionProvider) and TensorRT", "gpu"),
    "trt": ("trt", "tensorrt", "tensorrt"),
    "torch": ("torch_exec", "torch", "torch"),
    "torch-cuda": ("torch_exec", "torch with CUDA", "torch"),
}
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class Options:
    """What a backend may honour; each one says in describe() what it did with them."""

    precision: str = "fp32"  # fp32 | fp16 | bf16 (ORT CPU runs the model's own types)
    sparse: bool = False  # use 2:4 sparse kernels where the backend has them
    threads: int = 0  # CPU intra-op threads (0: the runtime's default)
    cache_dir: str | None = None  # TensorRT engine and timing caches
    cuda_graph: bool = True  # capture CUDA graphs where the backend can (small batches)
    shapes: dict = field(default_factory=dict)  # {input: (min, opt, max)} for dynamic TensorRT profiles


@dataclass
class TensorInfo:
    name: str
    dtype: str  # numpy dtype name
    shape: list  # ints, or strings/None for dynamic axes

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape}


class Runner:
    """One inference with inputs already where the backend wants them; returns its milliseconds,
    measured with the best clock the backend has (device events on a GPU, a host timer after a
    synchronise elsewhere)."""

    clock = "host"

    def __call__(self) -> float:
        raise NotImplementedError


class Session:
    backend = "?"
    inputs: list
    outputs: list

    def run(self, feeds: dict) -> dict:
        raise NotImplementedError

    def describe(self) -> dict:
        """What really ran: runtime, version, device, providers/precision actually used."""
        raise NotImplementedError

    def runner(self, feeds: dict) -> Runner:
        raise NotImplementedError


def missing(backend: str, what: str | None = None, hint: str | None = None) -> SpaError:
    """The error for a backend whose package or device is not there."""
    _, needs, extra = BACKENDS[backend]
    default = f"pip install 'spa[{extra}]'" if extra else f"pip install {needs}"
    return SpaError(f"backend '{backend}' needs {what or needs}", hint or default)


def open_session(model, backend: str = "ort", options: Options | None = None) -> Session:
    """A Session of `model` (a path or a ModelProto) on `backend`."""
    if backend not in BACKENDS:
        raise SpaError(f"unknown backend '{backend}'", f"choose one of {', '.join(BACKENDS)}")
    options = options or Options()
    if options.precision not in PRECISIONS:
        raise SpaError(f"unknown precision '{options.precision}'", f"choose one of {', '.join(PRECISIONS)}")
    module = importlib.import_module(f"spa.backends.{BACKENDS[backend][0]}")
    return module.open_session(model, backend, options)


def feeds_for(inputs: list, batch: int = 1, dims: dict | None = None, *, seed: int = 0, shapes: dict | None = None) \
        -> dict:
    """Random inputs for a session's inputs: the first axis is `batch` when it is dynamic, other
    dynamic axes take `dims[symbol]` (by their symbolic name), else `shapes[input][axis]`
    (spa.core.shapes: the shape the model runs at), else `dims["INPUT:AXIS"]` (an unnamed axis),
    else 1.
    Integer inputs get small values 0 and 1 (valid token ids, token types, masks and indices),
    floats standard normal values."""
    rng = np.random.default_rng(seed)
    dims, shapes = dims or {}, shapes or {}
    feeds = {}
    for info in inputs:
        given = shapes.get(info.name)
        shape = []
        for k, d in enumerate(info.shape):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif isinstance(d, str) and d in dims:
                shape.append(int(dims[d]))
            elif k == 0:
                shape.append(batch)
            elif given is not None:
                shape.append(int(given[k]))
            else:
                shape.append(int(dims.get(f"{info.name}:{k}", 1)))
        feeds[info.name] = random_array(rng, shape, info.dtype, name=f"input '{info.name}'")
    return feeds


def fixed_batch(inputs: list) -> int | None:
    """The batch size a model is fixed to (its inputs' static first axis), or None if dynamic."""
    return common_batch([list(i.shape or []) for i in inputs])
