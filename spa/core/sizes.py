"""Sizes of models in memory and on disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

TWO_GB = 2**31 - 1  # protobuf's limit: larger models live in external data files


FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def weight_bytes(proto: onnx.ModelProto) -> int:
    """Bytes held by initializers, from dims and dtype (reading raw_data would copy it)."""
    total = 0
    for t in proto.graph.initializer:
        try:
            item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            item = 4
        total += int(np.prod(t.dims, dtype=np.int64)) * item
    return total


def file_bytes(path: str | os.PathLike) -> int:
    """Bytes of a model file plus its external weights when they sit beside it under the usual
    names (`<file>.data`: spa and ONNX Runtime GenAI; `<file>_data`: optimum and torch.onnx)."""
    path = Path(path)
    data = [path.with_name(path.name + suffix) for suffix in (".data", "_data")]
    return path.stat().st_size + sum(d.stat().st_size for d in data if d.is_file())
