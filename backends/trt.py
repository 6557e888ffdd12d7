"""TensorRT backend (``trt``): ONNX -> engine -> Session, and the pieces `spa build` is made of.

    ONNX ─OnnxParser─▶ network (strongly typed) ─build_serialized_network─▶ plan bytes ─▶ .engine
    plan ─Runtime.deserialize_cuda_engine─▶ ICudaEngine ─execution context─▶ execute_async_v3
                                               └─create_engine_inspector─▶ JSON: tactics per layer

API used, as documented for TensorRT 10.x and 11.x (Python): Builder.create_network with
NetworkDefinitionCreationFlag.STRONGLY_TYPED, OnnxParser.parse_from_file / get_error (ParserError
.desc/.node_name/.node_operator), IBuilderConfig.set_flag(BuilderFlag.SPARSE_WEIGHTS),
set_memory_pool_limit(MemoryPoolType.WORKSPACE), profiling_verbosity = ProfilingVerbosity.DETAILED,
Builder.create_optimization_profile + IOptimizationProfile.set_shape, create_timing_cache /
set_timing_cache / get_timing_cache().serialize(), Builder.build_serialized_network,
Runtime.deserialize_cuda_engine, ICudaEngine num_io_tensors / get_tensor_name / get_tensor_mode /
get_tensor_dtype / get_tensor_shape / get_tensor_profile_shape / create_engine_inspector,
IExecutionContext set_input_shape / get_tensor_shape / set_tensor_address / execute_async_v3.

Precision: TensorRT 11 removed weakly typed networks and the precision builder flags (FP16, BF16,
INT8, ...; deprecated since 10.12). A strongly typed network runs every layer in the types of the
ONNX graph, so precision lives in the model: `spa quantize --fp16` (float16) or
`--calib DATA --target tensorrt` (Q/DQ) before building. Wherever STRONGLY_TYPED exists (10.x, 11.x, where it is always on) it is used, and
asking for fp16/bf16 of a float32 model is an error saying to convert first; only an old TensorRT
without it falls back to the builder flags.

Device buffers are torch CUDA tensors. TensorRT's Python API takes raw device pointers and a CUDA
stream handle and leaves allocation to the caller; torch (already a spa extra) is the easiest
well-kept way to get allocation, host<->device copies, streams, CUDA events (the runner's clock) and
CUDA graph capture, where pycuda or cuda-python would add one more dependency for the same.
`spa build` itself needs no torch: building and inspecting an engine is TensorRT only.

Pure parts, unit-tested without TensorRT, are in backends/trt_plan.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from spa.backends import base
from spa.backends.trt_plan import (  # noqa: F401 - the pure parts, re-exported for spa build and the tests
    SHAPES_SYNTAX,
    SPARSE_NOTE,
    _fmt,
    _inspector_doc,
    check_precision,
    layer_types,
    model_float_types,
    onnx_inputs,
    parse_shapes,
    profile_shapes,
    sparse_layers,
    sparsity_log,
)

from spa.core.errors import SpaError, first_line
from spa.core.model import write_atomic

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
NO_GPU_HINT = "TensorRT needs an NVIDIA GPU and driver: check nvidia-smi and CUDA_VISIBLE_DEVICES"


# -- TensorRT and torch, imported when used ----------------------------------------------------

def tensorrt():
    """The tensorrt module, or the 'install it' error."""
    try:
        import tensorrt as trt
    except ModuleNotFoundError:
        raise base.missing("trt") from None
    except (ImportError, OSError) as exc:  # a wheel without its libnvinfer, a CUDA mismatch
        raise base.missing("trt", f"a working tensorrt (import failed: {first_line(exc, 150)})") from None
    return trt


def _torch_cuda():
    try:
        import torch
    except ImportError:
        raise base.missing("trt", "torch with CUDA for device buffers") from None
    if torch.version.cuda is None:
        raise base.missing("trt", f"torch with CUDA for device buffers (torch {torch.__version__} is a CPU build)")
    if not torch.cuda.is_available():
        raise SpaError("backend 'trt' found no CUDA device (torch.cuda.is_available() is False)", NO_GPU_HINT)
    return torch


def _logger(trt, log=None):
    """An ILogger that keeps errors and the '(Sparsity)' lines, and passes warnings and errors to `log`."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors, self.lines = [], []

        def log(self, severity, msg):
            bad = severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR)
            if bad:
                self.errors.append(msg)
            if "(Sparsity)" in msg:
                self.lines.append(msg)
            if log is not None and (bad or severity == trt.ILogger.Severity.WARNING):
                log(f"TensorRT: {msg}")

    return Logger()


# -- building ----------------------------------------------------------------------------------

@dataclass
class Built:
    plan: bytes
    precision: str
    strongly_typed: bool
    profiles: dict
    sparsity: dict  # sparsity_log() of the build
    seconds: float
    notes: list = field(default_factory=list)


def build_engine(onnx_path, options: base.Options, workspace_mb: int | None = None, *, timing_cache=None,
                 log=None, batch: int = 1) -> bytes:
    """The serialized engine (plan) of an ONNX file or ModelProto; see build() for the details."""
    return build(onnx_path, options, workspace_mb, timing_cache, log, batch).plan


def build(model, options: base.Options, *, workspace_mb: int | None = None, timing_cache=None, log=None,
          batch: int = 1) -> Built:
    """Build an engine: strongly typed network where TensorRT has it, SPARSE_WEIGHTS with
    options.sparse, one optimization profile for the dynamic inputs (options.shapes), the timing
    cache file `timing_cache` read and written back. `log(line)` gets TensorRT's warnings."""
    trt = tensorrt()
    proto = model if isinstance(model, onnx.ModelProto) else _meta(model)
    logger = _logger(trt, log)
    builder = _builder(trt, logger)
    strongly = strongly_typed(trt)
    precision = check_precision(proto, options.precision, strongly)
    network = builder.create_network(_network_flags(trt, strongly))
    parser = trt.OnnxParser(network, logger)  # owns the weights the network points at: keep it alive
    _parse(parser, model)
    config = builder.create_builder_config()
    _configure(trt, config, options, workspace_mb, strongly)
    inputs = {network.get_input(i).name: list(network.get_input(i).shape) for i in range(network.num_inputs)}
    profiles, notes = profile_shapes(inputs, options.shapes, batch)
    _add_profile(builder, config, profiles)
    notes += _use_timing_cache(config, timing_cache)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        raise SpaError(f"TensorRT could not build the engine: {logger.errors[0] if logger.errors else 'no reason logged'}",
                       "rerun with -v for TensorRT's warnings")
    if timing_cache:
        write_atomic(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return Built(bytes(memoryview(plan)), precision, strongly, profiles, sparsity_log(logger.lines), seconds, notes)


def _meta(path) -> onnx.ModelProto:
    """The graph without external weights (types and shapes are all that is read)."""
    if not Path(path).is_file():
        raise SpaError(f"cannot load model '{path}': no such file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for garbage
        raise SpaError(f"cannot load model '{path}': not a valid ONNX file ({type(exc).__name__})") from None


def _builder(trt, logger):
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # noqa: BLE001 - TensorRT raises plain RuntimeErrors without a device
        raise SpaError(f"TensorRT could not create a builder: {first_line(exc, 200)}", NO_GPU_HINT) from None
    if builder is None:
        raise SpaError("TensorRT could not create a builder (no usable CUDA device?)", NO_GPU_HINT)
    return builder


def strongly_typed(trt) -> bool:
    """10.x: the STRONGLY_TYPED network flag is there to opt in; 11.x: every network is strongly
    typed (the flag is accepted and ignored; the precision builder flags are gone)."""
    return hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") or not hasattr(trt.BuilderFlag, "FP16")


def _network_flags(trt, strongly: bool) -> int:
    flags = trt.NetworkDefinitionCreationFlag
    if strongly:
        return 1 << int(flags.STRONGLY_TYPED) if hasattr(flags, "STRONGLY_TYPED") else 0
    return 1 << int(flags.EXPLICIT_BATCH) if hasattr(flags, "EXPLICIT_BATCH") else 0  # TensorRT < 10


def _parse(parser, model) -> None:
    ok = parser.parse(model.SerializeToString()) if isinstance(model, onnx.ModelProto) \
        else parser.parse_from_file(str(model))
    if not ok:
        raise SpaError(_parser_error(parser), "check the ops against TensorRT's ONNX operator support "
                       "(onnx-tensorrt docs/operators.md); rerun with -v for TensorRT's log")


def _parser_error(parser) -> str:
    """The first parser error as one line, with the node's name and op where the parser has them
    (ParserError.node_name/node_operator, TensorRT 10+)."""
    if parser.num_errors == 0:
        return "TensorRT's ONNX parser failed without saying why"
    error = parser.get_error(0)
    name, op = _ask(error, "node_name"), _ask(error, "node_operator")
    if not name and isinstance(_ask(error, "node"), int) and error.node() >= 0:
        name = f"#{error.node()}"
    where = f" for node '{name}'" + (f" ({op})" if op else "") if name else ""
    more = f" (+{parser.num_errors - 1} more)" if parser.num_errors > 1 else ""
    return f"TensorRT cannot parse the model{where}: {first_line(error.desc(), 200, 'no description')}{more}"


def _ask(obj, method: str):
    fn = getattr(obj, method, None)
    return fn() if callable(fn) else None


def _configure(trt, config, options: base.Options, workspace_mb: int | None, strongly: bool) -> None:
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # tactic names for the inspector
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if options.sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if not strongly and options.precision != "fp32":
        flag = getattr(trt.BuilderFlag, options.precision.upper(), None)
        if flag is None:
            raise SpaError(f"TensorRT {trt.__version__} has neither strongly typed networks nor "
                           f"BuilderFlag.{options.precision.upper()}", "install TensorRT 10 or newer")
        config.set_flag(flag)


def _add_profile(builder, config, profiles: dict) -> None:
    if not profiles:
        return
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(profile) < 0:
        raise SpaError(f"TensorRT rejected the shape profile {profiles}", f"check shapes= ({SHAPES_SYNTAX})")


def _use_timing_cache(config, path) -> list:
    """Load the timing cache file (or start an empty one); a cache from another TensorRT or GPU is
    not used (ignore_mismatch=False) and is replaced when the build writes it back."""
    if not path:
        return []
    old = Path(path).read_bytes() if Path(path).is_file() else b""
    try:
        cache = config.create_timing_cache(old)
    except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt, not fatal
        cache = None
    if cache is not None and config.set_timing_cache(cache, False):
        return []
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return [f"timing cache '{path}' is from another TensorRT version or GPU: starting a new one"]


def _deserialize(trt, plan: bytes, logger, what: str):
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        why = logger.errors[0] if logger.errors else "no reason logged"
        raise SpaError(f"TensorRT {trt.__version__} cannot load {what}: {first_line(why, 200)}",
                       "an engine loads only in the TensorRT version (and on the GPU kind) it was built with: "
                       "rebuild it with spa build")
    return engine


def inspect_plan(plan: bytes, what: str = "the engine") -> dict:
    """The engine inspector's JSON of a plan, as a dict."""
    trt = tensorrt()
    engine = _deserialize(trt, plan, _logger(trt), what)
    return json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))


# -- the Session interface (backends/base.py) -------------------------------------------------

# TensorRT DataType name -> numpy dtype name (torch has the same names); others (BF16, FP8, INT4,
# FP4 I/O) have no numpy type and are refused with a hint.
DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "UINT8": "uint8", "INT32": "int32",
          "INT64": "int64", "BOOL": "bool"}


def open_session(model, backend: str = "trt", options: base.Options | None = None) -> TrtSession:
    """A Session of an ONNX file/ModelProto (engine built in memory, cached in options.cache_dir with
    its timing cache) or of a serialized engine file (.engine, .plan, .trt)."""
    options = options or base.Options()
    tensorrt()
    _torch_cuda()
    if isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() in ENGINE_SUFFIXES:
        if not Path(model).is_file():
            raise SpaError(f"cannot load TensorRT engine '{model}': no such file")
        return TrtSession(Path(model).read_bytes(), options, {"engine": str(model)})
    plan, origin = _cached_build(model, options)
    return TrtSession(plan, options, origin)


def _cached_build(model, options: base.Options) -> tuple[bytes, dict]:
    folder = Path(options.cache_dir) if options.cache_dir else None
    key = folder / f"{_cache_key(model, options)}.engine" if folder else None
    if key is not None and key.is_file() and key.with_suffix(".json").is_file():
        return key.read_bytes(), {**json.loads(key.with_suffix(".json").read_text()), "engine": f"{key} (cached)"}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    built = build(model, options, timing_cache=folder / "timing.cache" if folder else None)
    origin = {"engine": "built in memory", "precision": built.precision, "strongly_typed": built.strongly_typed,
              "sparse_requested": bool(options.sparse), "eligible": built.sparsity["eligible"],
              "profiles": {k: [list(s) for s in v] for k, v in built.profiles.items()}}
    if key is not None:
        write_atomic(key, built.plan)
        write_atomic(key.with_suffix(".json"), json.dumps(origin).encode())
    return built.plan, origin


def _cache_key(model, options: base.Options) -> str:
    import torch

    digest = hashlib.sha256(model.SerializeToString() if isinstance(model, onnx.ModelProto)
                            else Path(model).read_bytes())
    digest.update(json.dumps([options.precision, bool(options.sparse), sorted(options.shapes.items()),
                              tensorrt().__version__, torch.cuda.get_device_name()], default=list).encode())
    return digest.hexdigest()[:20]


class TrtSession(base.Session):
    """An engine with one execution context and one torch CUDA stream. run() copies the feeds to
    the device, runs execute_async_v3 and copies the outputs back; runner() times one launch
    (CUDA graph replay where capture works) with the inputs already on the device."""

    backend = "trt"

    def __init__(self, plan: bytes, options: base.Options, origin: dict):
        self.trt, self.torch = tensorrt(), _torch_cuda()
        self.options, self.origin = options, origin
        self.logger = _logger(self.trt)
        self.engine = _deserialize(self.trt, plan, self.logger, origin.get("engine", "the engine"))
        self.context = self.engine.create_execution_context()
        self.stream = self.torch.cuda.Stream()
        self.inputs, self.outputs = _io(self.trt, self.engine)
        self.cuda_graph = "requested, no runner yet" if options.cuda_graph else "off"
        self.bound: dict = {}

    def run(self, feeds: dict) -> dict:
        with self.torch.cuda.stream(self.stream):
            bufs = self.bind(feeds)
            self.execute()
            out = {o.name: bufs[o.name].cpu().numpy() for o in self.outputs}
        return out

    def bind(self, feeds: dict) -> dict:
        """Device tensors for the feeds and the outputs, with shapes and addresses set; kept alive in
        the returned dict (call inside `torch.cuda.stream(self.stream)`)."""
        absent = [i.name for i in self.inputs if i.name not in feeds]
        if absent:
            raise SpaError(f"missing input '{absent[0]}' for the TensorRT engine",
                           f"the engine's inputs are: {', '.join(i.name for i in self.inputs)}")
        bufs = {i.name: self.torch.from_numpy(np.require(feeds[i.name], i.dtype, ["C", "W"])).to("cuda")
                for i in self.inputs}
        for name, t in bufs.items():
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise self._outside_profile(name, tuple(t.shape))
        for info in self.outputs:
            shape = tuple(self.context.get_tensor_shape(info.name))
            if any(d < 0 for d in shape):
                raise SpaError(f"output '{info.name}' has a data-dependent shape {shape}",
                               "spa's TensorRT backend needs output shapes known from the input shapes")
            bufs[info.name] = self.torch.empty(shape, dtype=getattr(self.torch, info.dtype), device="cuda")
        self.point(bufs)
        return bufs

    def point(self, bufs: dict) -> None:
        """Set the context's input shapes and tensor addresses to `bufs`."""
        for info in self.inputs:
            self.context.set_input_shape(info.name, tuple(bufs[info.name].shape))
        for name, t in bufs.items():
            self.context.set_tensor_address(name, t.data_ptr())
        self.bound = bufs

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            why = self.logger.errors[-1] if self.logger.errors else "no reason logged"
            raise SpaError(f"TensorRT execute_async_v3 failed: {first_line(why, 200)}")

    def _outside_profile(self, name: str, shape: tuple) -> SpaError:
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        return SpaError(f"input '{name}' of shape {_fmt(shape)} is outside the engine's profile "
                        f"{_fmt(lo)}..{_fmt(hi)}", f"build the engine with --shapes {name}:MIN/OPT/MAX covering it")

    def describe(self) -> dict:
        info, note = self._inspector()
        sparse = sparse_layers(info, self.origin.get("eligible")) if info else {"error": note}
        return {"backend": self.backend, "runtime": f"tensorrt {self.trt.__version__}",
                "device": self.torch.cuda.get_device_name(), "engine": self.origin.get("engine"),
                "precision": self.origin.get("precision", "fixed when the engine file was built"),
                "layer_types": layer_types(info) if info else None,
                "sparse": {"requested": self.origin.get("sparse_requested"), **sparse},
                "profiles": self.origin.get("profiles"), "cuda_graph": self.cuda_graph,
                "device_buffers": "torch CUDA tensors", "clock": _Runner.clock}

    def _inspector(self) -> tuple[dict | None, str | None]:
        try:
            text = self.engine.create_engine_inspector().get_engine_information(self.trt.LayerInformationFormat.JSON)
            return _inspector_doc(text), None
        except Exception as exc:  # noqa: BLE001 - a report, not a reason to fail the run
            return None, f"engine inspector failed: {first_line(exc, 150)}"

    def runner(self, feeds: dict) -> _Runner:
        return _Runner(self, feeds)


def _io(trt, engine) -> tuple[list, list]:
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        kind = getattr(engine.get_tensor_dtype(name), "name", str(engine.get_tensor_dtype(name)))
        if kind not in DTYPES:
            raise SpaError(f"engine I/O tensor '{name}' is {kind}, which numpy cannot hold",
                           "keep float32/float16 inputs and outputs (spa quantize does)")
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        dims = list(engine.get_tensor_shape(name))
        if is_input and any(d < 0 for d in dims):
            lo, _, hi = engine.get_tensor_profile_shape(name, 0)
            dims = [d if d >= 0 else f"{lo[k]}..{hi[k]}" for k, d in enumerate(dims)]
        info = base.TensorInfo(name, DTYPES[kind], [d if not isinstance(d, int) or d >= 0 else "dynamic" for d in dims])
        (inputs if is_input else outputs).append(info)
    return inputs, outputs


class _Runner(base.Runner):
    """One inference timed with CUDA events on the session's stream. With options.cuda_graph the
    launch is captured once (after one plain launch, as TensorRT asks) and replayed; a capture that
    fails falls back to plain launches, and describe()['cuda_graph'] says so."""

    clock = "cuda events"

    def __init__(self, session: TrtSession, feeds: dict):
        torch = session.torch
        self.s = session
        with torch.cuda.stream(session.stream):
            self.bufs = session.bind(feeds)
            session.execute()
        session.stream.synchronize()
        self.graph = self._capture() if session.options.cuda_graph else None
        self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def _capture(self):
        torch, s = self.s.torch, self.s
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=s.stream):
                s.execute()
            with torch.cuda.stream(s.stream):
                graph.replay()
            s.stream.synchronize()
        except Exception as exc:  # noqa: BLE001 - some engines cannot be captured; plain launches still work
            s.cuda_graph = f"capture failed, plain launches ({first_line(exc, 150)})"
            return None
        s.cuda_graph = "captured (replayed per step)"
        return graph

    def __call__(self) -> float:
        s = self.s
        if self.graph is None and s.bound is not self.bufs:
            s.point(self.bufs)
        self.start.record(s.stream)
        if self.graph is not None:
            with s.torch.cuda.stream(s.stream):
                self.graph.replay()
        else:
            s.execute()
        self.end.record(s.stream)
        self.end.synchronize()
        return self.start.elapsed_time(self.end)
