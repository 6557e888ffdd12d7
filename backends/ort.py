"""ONNX Runtime backend: sessions, random feeds, running with extra outputs."""

from __future__ import annotations

import time
from pathlib import Path

import onnxruntime as ort
from spa.backends.base import TensorInfo, missing

from spa.core.errors import SpaError
from spa.core.runtime import (  # noqa: F401 - the CPU helpers live in the core; re-exported for backend users
    load_error_isolated,
    model_bytes,
    random_array,
    random_feeds,
    run,
    run_with_outputs,
    session,
)

ort.set_default_logger_severity(4)  # errors reach the user as exceptions, in one line


# -- the Session interface (backends/base.py) -------------------------------------------------

PROVIDERS = {"ort": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
             "ort-trt": "TensorrtExecutionProvider"}


def provider_list(backend: str, options) -> list:
    """The provider chain for a backend name, with the options ORT documents for each."""
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
    kind = arg.type[len("tensor("):-1] if arg.type.startswith("tensor(") else "float"
    dtype = {"float": "float32", "double": "float64", "float16": "float16", "bool": "bool"}.get(kind, kind)
    return TensorInfo(arg.name, dtype, [d if isinstance(d, int) else (d or None) for d in arg.shape])


class OrtSession:
    """An ONNX Runtime session on the CPU, CUDA or TensorRT execution provider. ORT falls back
    to the CPU silently when a GPU provider cannot load: here that is an error, and describe()
    reports the providers the session really has (get_providers())."""

    def __init__(self, model, backend: str, options):
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
        self.sess = ort.InferenceSession(model_bytes(model), opts, providers=provider_list(backend, options))
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


def open_session(model, backend: str, options) -> OrtSession:
    return OrtSession(model, backend, options)
