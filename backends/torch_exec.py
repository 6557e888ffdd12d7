"""torch backends: the ONNX graph run by spa.torch's executor, on the CPU ("torch") or a CUDA GPU
("torch-cuda").

    model.onnx ─spa.torch.OnnxModule─▶ nn.Module ─.to(device, fp16/bf16)─▶
        [2:4 weights of MatMul/Gemm ─torch.sparse.to_sparse_semi_structured─▶ sparse F.linear]
        ─▶ runner: inputs on the device, CUDA graph replay for small batches, CUDA events

2:4 (Options.sparse): a MatMul or Gemm whose constant 2-D weight holds the 2:4 pattern along
its reduction axis is run as F.linear(x, W_sparse), with W stored [out, in] as
to_sparse_semi_structured wants (the pattern then runs along each row). A layer whose weight
does not hold the pattern, or that the sparse kernels refuse (dtype, shape), stays dense and
describe() says why. Convolutions stay dense: torch has no semi-structured convolution.

CUDA graphs (Options.cuda_graph): captured for batches up to CUDA_GRAPH_MAX_BATCH, where
launch overhead is a visible share of the time; a graph that cannot be captured (an op that
synchronises with the host, e.g. a shape read back to the CPU) falls back to plain launches
and describe() says so.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import onnx
from spa.backends.base import TensorInfo, missing

from spa.core.errors import SpaError, first_line
from spa.core.pattern import holds

CUDA_GRAPH_MAX_BATCH = 16
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _torch(backend: str):
    try:
        import torch
    except ImportError:
        raise missing(backend) from None
    if backend == "torch-cuda" and not torch.cuda.is_available():
        raise missing(backend, "a CUDA GPU visible to torch (torch.cuda.is_available() is False; "
                               f"this torch is {torch.__version__})",
                      "on a machine with an NVIDIA GPU, install a CUDA build of torch (see pytorch.org)")
    return torch


def _sparse_linear(ctx, a, *rest, weight, bias_beta=None, alpha=1.0):
    import torch.nn.functional as F

    y = F.linear(a, weight)
    if alpha != 1.0:
        y = y * alpha
    if bias_beta is not None and len(rest) > 1 and rest[1] is not None:
        y = y + rest[1] * bias_beta
    return y


def semi_structured(module, convert=None) -> dict:
    """Run every MatMul/Gemm with a 2:4 constant weight through sparse F.linear; returns
    {"sparse": [node names], "dense": {node name: why}}. `convert` turns a dense [out, in]
    tensor into the sparse one (default: torch.sparse.to_sparse_semi_structured)."""
    if convert is None:
        from torch.sparse import to_sparse_semi_structured as convert
    done, dense = [], {}
    module._sparse_weights = []
    for node in module.graph.nodes:
        if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[1] not in module.keys:
            continue
        w = module.tensor(node.inputs[1]).detach()
        trans_b = node.op == "Gemm" and node.attrs.get("transB", 0)
        if w.dim() != 2 or (node.op == "Gemm" and node.attrs.get("transA", 0)):
            dense[node.name] = "not a 2-D weight on the right of the product"
            continue
        rows = w if trans_b else w.t()  # [out, in]: the pattern must run along `in`
        if not holds(rows.float().cpu().numpy(), 1, 2, m=4):
            dense[node.name] = "the weight does not hold 2:4 along its reduction axis"
            continue
        try:
            sparse = convert(rows.contiguous())
        except Exception as exc:  # noqa: BLE001 - the kernels' own refusals (dtype, shape), as a reason
            dense[node.name] = f"refused by the sparse kernels: {first_line(exc, limit=120)}"
            continue
        module._sparse_weights.append(sparse)
        extra = {"bias_beta": node.attrs.get("beta", 1.0), "alpha": node.attrs.get("alpha", 1.0)} \
            if node.op == "Gemm" else {}
        node.fn = functools.partial(_sparse_linear, weight=sparse, **extra)
        done.append(node.name)
    return {"sparse": done, "dense": dense}


class TorchSession:
    def __init__(self, model, backend: str, options):
        torch = _torch(backend)
        from spa.torch import OnnxModule

        self.torch, self.backend, self.options = torch, backend, options
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        self.device = torch.device("cuda" if backend == "torch-cuda" else "cpu")
        module = OnnxModule(proto).eval().requires_grad_(False)
        module = module.to(self.device)
        if options.precision != "fp32":
            module = module.to(getattr(torch, DTYPES[options.precision]))
        self.sparsity = semi_structured(module) if options.sparse else None
        self.module = module
        self.inputs = [_info(v) for v in proto.graph.input if v.name in module.input_names]
        self.outputs = [_info(v) for v in proto.graph.output]
        self.graph_note = None

    def _feed(self, feeds: dict) -> dict:
        return {k: self.torch.as_tensor(np.ascontiguousarray(v)).to(self.device) for k, v in feeds.items()}

    def run(self, feeds: dict) -> dict:
        with self.torch.inference_mode():
            out = self.module.run(self._feed(feeds))
        return {o.name: _numpy(out[o.name], o.dtype) for o in self.outputs}

    def describe(self) -> dict:
        d = {"backend": self.backend, "runtime": f"torch {self.torch.__version__} (spa.torch executor)",
             "device": self.torch.cuda.get_device_name(0) if self.device.type == "cuda" else "cpu",
             "precision": self.options.precision, "threads": self.torch.get_num_threads()}
        if self.sparsity is not None:
            d["sparse_layers"] = self.sparsity["sparse"]
            d["dense_layers"] = self.sparsity["dense"]
        if self.graph_note:
            d["cuda_graph"] = self.graph_note
        return d

    def runner(self, feeds: dict):
        feeds = self._feed(feeds)
        if self.device.type != "cuda":
            return _CpuRunner(self.torch, self.module, feeds)
        batch = max((len(v) for v in feeds.values() if v.dim()), default=1)
        if self.options.cuda_graph and batch <= CUDA_GRAPH_MAX_BATCH:
            try:
                runner = _GraphRunner(self.torch, self.module, feeds)
                self.graph_note = f"captured (batch {batch})"
                return runner
            except Exception as exc:  # noqa: BLE001 - capture refused: plain launches, and say why
                self.graph_note = f"not captured: {first_line(exc, limit=160)}"
        return _CudaRunner(self.torch, self.module, feeds)


class _CpuRunner:
    clock = "host"

    def __init__(self, torch, module, feeds):
        self.torch, self.module, self.feeds = torch, module, feeds

    def __call__(self) -> float:
        with self.torch.inference_mode():
            start = time.perf_counter()
            self.module.run(self.feeds)
            return (time.perf_counter() - start) * 1e3


class _CudaRunner:
    clock = "cuda events"

    def __init__(self, torch, module, feeds):
        self.torch, self.module, self.feeds = torch, module, feeds
        self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def step(self) -> None:
        with self.torch.inference_mode():
            self.module.run(self.feeds)

    def __call__(self) -> float:
        self.start.record()
        self.step()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end)


class _GraphRunner(_CudaRunner):
    """One CUDA graph of the whole forward pass, replayed on the same (static) input tensors."""

    clock = "cuda events (CUDA graph replay)"

    def __init__(self, torch, module, feeds):
        super().__init__(torch, module, feeds)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):  # warm-up on a side stream, as torch's CUDA graph docs ask
                module.run(feeds)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.static_out = module.run(feeds)

    def step(self) -> None:
        self.graph.replay()


def _numpy(t, dtype: str) -> np.ndarray:
    """A result as the model declares it (float32 outputs of a half-precision run come back float32)."""
    t = t.detach()
    if t.is_floating_point() and t.dtype.itemsize < 4:
        t = t.float()  # numpy has no bfloat16
    return t.cpu().numpy().astype(dtype, copy=False)


def _info(vi) -> TensorInfo:
    tt = vi.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    return TensorInfo(vi.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).name, dims)


def open_session(model, backend: str, options) -> TorchSession:
    try:
        return TorchSession(model, backend, options)
    except SpaError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch's many errors while placing the model, as one line
        raise SpaError(f"cannot run the model on '{backend}': {first_line(exc)}") from None
