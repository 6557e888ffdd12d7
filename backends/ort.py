"""ONNX Runtime backend: sessions, random feeds, running with extra outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from spa.errors import SpaError

ort.set_default_logger_severity(3)


def session(model, threads: int = 0, light: bool = False) -> ort.InferenceSession:
    """A CPU session for a ModelProto, or for a file path (needed above 2 GB).

    `light`: no graph optimisations and no weight pre-packing; for checks that run a
    model once, where building an optimised session costs more than the run."""
    from spa.model import TWO_GB, weight_bytes

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if light:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        opts.intra_op_num_threads = threads
    if isinstance(model, onnx.ModelProto):
        if weight_bytes(model) >= TWO_GB:
            raise SpaError("cannot run a >2 GB model from memory", "save it and run it from the file")
        model = model.SerializeToString()
    else:
        model = str(model)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _np_dtype(elem_type: int):
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type)


def random_feeds(model, dynamic: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every real graph input; dynamic dims set to `dynamic`."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else dynamic for d in tt.shape.dim]
        dtype = _np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.integers(0, 2, dims).astype(bool)
        else:
            feeds[vi.name] = rng.integers(0, 4, dims).astype(dtype)
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
