"""ONNX Runtime backend: sessions, random feeds, running with extra outputs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort

from spa.errors import SpaError

ort.set_default_logger_severity(4)  # errors reach the user as exceptions, in one line


def session(model, threads: int = 0, light: bool = False) -> ort.InferenceSession:
    """A CPU session for a ModelProto, or for a file path (needed above 2 GB).

    `light`: no graph optimisations and no weight pre-packing; for checks that run a
    model once, where building an optimised session costs more than the run."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    if light:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(_model_bytes(model), opts, providers=["CPUExecutionProvider"])


_LOAD = """
import sys, onnxruntime as ort
ort.set_default_logger_severity(4)
try:
    ort.InferenceSession(sys.stdin.buffer.read(), providers=["CPUExecutionProvider"])
except Exception as exc:
    sys.exit(str(exc).strip() or type(exc).__name__)
"""


def load_error_isolated(model: onnx.ModelProto, timeout: float = 600) -> str | None:
    """Why ONNX Runtime cannot build a default CPU session for `model`, or None when it can.

    The session is built in a child process, so a crash inside ONNX Runtime (a segfault in a
    graph optimiser) becomes a reason instead of taking the caller's process down. For graphs
    written by third-party converters, before they are loaded in-process."""
    try:
        done = subprocess.run([sys.executable, "-c", _LOAD], input=_model_bytes(model), capture_output=True, check=False,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"ONNX Runtime {ort.__version__} did not finish loading it within {timeout:.0f} s"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        return f"ONNX Runtime {ort.__version__} crashed ({signal.Signals(-done.returncode).name}) loading it"
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    return lines[0] if lines else f"ONNX Runtime's loader exited with code {done.returncode}"


def _np_dtype(elem_type: int):
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type)


def random_feeds(model, dynamic: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every real graph input; dynamic dims set to `dynamic`."""
    from .base import random_array

    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else dynamic for d in tt.shape.dim]
        feeds[vi.name] = random_array(rng, dims, _np_dtype(tt.elem_type))
    return feeds


def run(model, feeds: dict[str, np.ndarray], light: bool = False) -> dict[str, np.ndarray]:
    """Outputs by name for a ModelProto or a model file."""
    sess = session(model, light=light)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def run_with_outputs(model, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run with `names` (intermediate tensors) exposed as extra graph outputs."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    present = {o.name for o in proto.graph.output}
    for name in names:
        if name not in present:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, model.dtypes[name], None))
    return run(proto, feeds)


# -- the Session interface (backends/base.py) -------------------------------------------------

PROVIDERS = {"ort": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
             "ort-trt": "TensorrtExecutionProvider"}


def provider_list(backend: str, options) -> list:
    """The provider chain for a backend name, with the options ORT documents for each."""
    from pathlib import Path

    cpu = "CPUExecutionProvider"
    cuda = ("CUDAExecutionProvider", {"device_id": 0})
    if backend == "ort":
        return [cpu]
    if backend == "ort-cuda":
        return [cuda, cpu]
    trt = {"device_id": 0, "trt_fp16_enable": options.precision in ("fp16", "bf16"),
           "trt_sparsity_enable": bool(options.sparse)}
    if options.cache_dir:
        Path(options.cache_dir).mkdir(parents=True, exist_ok=True)
        trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(options.cache_dir),
                   trt_timing_cache_enable=True, trt_timing_cache_path=str(options.cache_dir))
    return [("TensorrtExecutionProvider", trt), cuda, cpu]


def _info(arg):
    from .base import TensorInfo

    kind = arg.type[len("tensor("):-1] if arg.type.startswith("tensor(") else "float"
    dtype = {"float": "float32", "double": "float64", "float16": "float16", "bool": "bool"}.get(kind, kind)
    return TensorInfo(arg.name, dtype, [d if isinstance(d, int) else (d or None) for d in arg.shape])


class OrtSession:
    """An ONNX Runtime session on the CPU, CUDA or TensorRT execution provider. ORT falls back
    to the CPU silently when a GPU provider cannot load: here that is an error, and describe()
    reports the providers the session really has (get_providers())."""

    def __init__(self, model, backend: str, options):
        from .base import missing

        self.backend = backend
        want = PROVIDERS[backend]
        if want not in ort.get_available_providers():
            raise missing(backend, f"{want} in onnxruntime (this onnxruntime has "
                                   f"{', '.join(ort.get_available_providers())})")
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        if options.threads:
            opts.intra_op_num_threads = options.threads
        self.options = options
        self.sess = ort.InferenceSession(_model_bytes(model), opts, providers=provider_list(backend, options))
        self.providers = self.sess.get_providers()
        if want not in self.providers:
            raise SpaError(f"onnxruntime fell back to {self.providers[0]} instead of {want}",
                           "check the CUDA/cuDNN/TensorRT libraries onnxruntime-gpu needs (ORT's log at -v)")
        self.inputs = [_info(i) for i in self.sess.get_inputs()]
        self.outputs = [_info(o) for o in self.sess.get_outputs()]

    def run(self, feeds: dict) -> dict:
        names = [o.name for o in self.outputs]
        return dict(zip(names, self.sess.run(names, feeds)))

    def describe(self) -> dict:
        return {"backend": self.backend, "runtime": f"onnxruntime {ort.__version__}", "providers": self.providers,
                "device": ort.get_device(), "precision": "model" if self.backend != "ort-trt" else
                self.options.precision, "threads": self.options.threads or "default"}

    def runner(self, feeds: dict):
        names = [o.name for o in self.outputs]
        return (_CpuRunner if self.backend == "ort" else _BoundRunner)(self.sess, feeds, names)


class _CpuRunner:
    clock = "host"

    def __init__(self, sess, feeds: dict, names: list):
        self.sess, self.feeds, self.names = sess, feeds, names

    def __call__(self) -> float:
        start = time.perf_counter()
        self.sess.run(self.names, self.feeds)
        return (time.perf_counter() - start) * 1e3


class _BoundRunner:
    """GPU providers: inputs copied to the device once and outputs left there (IO binding),
    so a step times the inference, not the PCIe transfers (as trtexec does by default)."""

    clock = "host (synchronised)"

    def __init__(self, sess, feeds: dict, names: list):
        self.sess = sess
        self.binding = sess.io_binding()
        for name, value in feeds.items():
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        for name in names:
            self.binding.bind_output(name, "cuda", 0)

    def __call__(self) -> float:
        self.binding.synchronize_inputs()
        start = time.perf_counter()
        self.sess.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()
        return (time.perf_counter() - start) * 1e3


def _model_bytes(model):
    from spa.model import TWO_GB, weight_bytes

    if isinstance(model, onnx.ModelProto):
        if weight_bytes(model) >= TWO_GB:
            raise SpaError("cannot run a >2 GB model from memory", "save it and run it from the file")
        return model.SerializeToString()
    return str(model)


def open_session(model, backend: str, options) -> OrtSession:
    return OrtSession(model, backend, options)
