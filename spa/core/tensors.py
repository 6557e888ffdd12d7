"""A model file's tensors, checked before any byte of them is read or reshaped.

Every TensorProto of a model (initializers, the values and indices of sparse initializers,
tensors in node attributes such as Constant values, in subgraphs and in functions) must:
  - hold exactly the bytes its dims and data type need (sizes computed with Python ints, so a
    dim of 2**40 is a size, not an overflow or a 32 TiB allocation);
  - if its data is external: name a regular file inside the model's folder (no absolute path,
    no `..`, no link leading out, no NUL byte), at a non-negative offset and length that lie
    within that file.
A fault is one SpaError naming the model file and the tensor.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from spa.core.errors import SpaError

BROKEN = "the file may be truncated or written by a broken exporter"
_PACKED = {getattr(TensorProto, n): bits for n, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4),
                                                          ("INT2", 2), ("UINT2", 2)) if hasattr(TensorProto, n)}
# the repeated field that holds values when raw_data is not used, and values per element
_FIELDS = {TensorProto.FLOAT: ("float_data", 1), TensorProto.COMPLEX64: ("float_data", 2),
           TensorProto.DOUBLE: ("double_data", 1), TensorProto.COMPLEX128: ("double_data", 2),
           TensorProto.INT64: ("int64_data", 1), TensorProto.UINT32: ("uint64_data", 1),
           TensorProto.UINT64: ("uint64_data", 1), TensorProto.STRING: ("string_data", 1),
           **{t: ("int32_data", 1) for t in (TensorProto.INT32, TensorProto.INT16, TensorProto.INT8,
                                             TensorProto.UINT16, TensorProto.UINT8, TensorProto.BOOL,
                                             TensorProto.FLOAT16, TensorProto.BFLOAT16)}}


@dataclass
class External:
    """Where one tensor's external data lies, checked: `size` bytes at `offset` of `file`."""

    tensor: TensorProto
    file: Path
    offset: int
    size: int


def _sparse(sparse: onnx.SparseTensorProto):
    for part in ("values", "indices"):
        if sparse.HasField(part):
            yield getattr(sparse, part)


def _node_tensors(node: onnx.NodeProto):
    for attr in node.attribute:
        for field, value in attr.ListFields():  # the fields set, whatever the attribute's type says
            name = field.name
            if name == "t":
                yield value
            elif name == "tensors":
                yield from value
            elif name in ("sparse_tensor", "sparse_tensors"):
                for sparse in [value] if name == "sparse_tensor" else value:
                    yield from _sparse(sparse)
            elif name in ("g", "graphs"):
                for graph in [value] if name == "g" else value:
                    yield from _graph_tensors(graph)


def _graph_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from _sparse(sparse)
    for node in graph.node:
        yield from _node_tensors(node)


def all_tensors(model: onnx.ModelProto):
    """Every TensorProto of the model: its graph's and subgraphs' initializers, sparse
    initializers' values and indices, and tensors held by node attributes (functions too)."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _type_name(data_type: int) -> str:
    """float32, int64, ...: numpy's names where it has one, else ONNX's."""
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).name
    except (KeyError, TypeError, ValueError):
        try:
            return TensorProto.DataType.Name(data_type).lower()
        except ValueError:
            return f"data type {data_type}"


def expected_bytes(tensor: TensorProto) -> int | None:
    """Bytes of raw data the tensor's dims and data type need; None for strings and unknown types."""
    count = math.prod(int(d) for d in tensor.dims)
    if tensor.data_type in _PACKED:
        return (count * _PACKED[tensor.data_type] + 7) // 8
    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    try:
        return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def _what(path: Path | None) -> str:
    return "the model in memory" if path is None else f"model '{path}'"


def _shape(tensor: TensorProto) -> str:
    return f"shape ({', '.join(str(int(d)) for d in tensor.dims)}) of {_type_name(tensor.data_type)}"


def check_sizes(model: onnx.ModelProto, path: Path | None) -> None:
    """Every tensor held in the file (`path`; None: a model in memory) holds exactly what its dims
    and data type need (tensors whose data is external are checked by `external_data`)."""
    for tensor in all_tensors(model):
        if any(int(d) < 0 for d in tensor.dims):
            raise SpaError(f"cannot load {_what(path)}: tensor '{tensor.name}' has a negative dimension "
                           f"({_shape(tensor)})", BROKEN)
        if tensor.data_location == TensorProto.EXTERNAL:
            continue
        if tensor.HasField("raw_data"):
            need, have = expected_bytes(tensor), len(tensor.raw_data)
            if need is not None and need != have:
                raise SpaError(f"cannot load {_what(path)}: tensor '{tensor.name}' holds {have} bytes of data "
                               f"but its {_shape(tensor)} needs {need} bytes", BROKEN)
        elif tensor.data_type in _FIELDS:
            field, per = _FIELDS[tensor.data_type]
            need, have = math.prod(int(d) for d in tensor.dims) * per, len(getattr(tensor, field))
            if need != have:
                raise SpaError(f"cannot load {_what(path)}: tensor '{tensor.name}' holds {have} values "
                               f"but its {_shape(tensor)} needs {need}", BROKEN)


def _entries(tensor: TensorProto, path: Path) -> dict:
    """The external data keys of a tensor, offset and length as non-negative ints."""
    keys = {e.key: e.value for e in tensor.external_data}
    for key in ("offset", "length"):
        if key in keys:
            value = keys[key]
            if not value.isascii() or not value.isdigit():
                raise SpaError(f"cannot load {_what(path)}: tensor '{tensor.name}' has an external data {key} "
                               f"of {value[:40]!r}: it must be a non-negative whole number", BROKEN)
            keys[key] = int(value)
    if not keys.get("location"):
        raise SpaError(f"cannot load {_what(path)}: tensor '{tensor.name}' has external data without a location",
                       BROKEN)
    return keys


def _data_file(tensor: TensorProto, loc: str, root: Path, path: Path) -> Path:
    """The external data file `loc` names, if it is a regular file inside the model's folder."""
    if "\0" in loc:
        raise SpaError(f"cannot load {_what(path)}: the external data location of tensor '{tensor.name}' "
                       f"contains a NUL byte ({loc[:60]!r})", BROKEN)
    target = (root / loc).resolve()
    if os.path.isabs(loc) or root not in target.parents:
        raise SpaError(f"cannot load {_what(path)}: refusing external data for tensor '{tensor.name}': location "
                       f"'{loc}' escapes the model's folder {root}",
                       "external data files must sit beside the model (relative paths inside its folder)")
    if not target.exists():
        raise SpaError(f"cannot load {_what(path)}: external data file '{loc}' for tensor '{tensor.name}' is missing "
                       f"from the model's folder {root}", "copy the .data file next to the model")
    if not target.is_file():
        raise SpaError(f"cannot load {_what(path)}: external data '{loc}' of tensor '{tensor.name}' is not a "
                       "regular file (a folder, device, FIFO or socket)")
    return target


def external_data(model: onnx.ModelProto, path: Path) -> list[External]:
    """Every tensor's external data, checked (location, offset, length, size); nothing is read."""
    root = path.parent.resolve()
    found = []
    for tensor in all_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        keys = _entries(tensor, path)
        target = _data_file(tensor, keys["location"], root, path)
        found.append(_in_range(tensor, keys, target, path))
    return found


def _in_range(tensor: TensorProto, keys: dict, target: Path, path: Path) -> External:
    loc, offset, file_size = keys["location"], keys.get("offset", 0), target.stat().st_size
    need = expected_bytes(tensor)
    if offset > file_size:
        raise SpaError(f"cannot load {_what(path)}: tensor '{tensor.name}' has an external data offset of {offset}, "
                       f"past the end of '{loc}' ({file_size} bytes): the file is truncated or the offset is wrong")
    size = keys.get("length", file_size - offset if need is None else need)
    if need is not None and size != need:
        raise SpaError(f"cannot load {_what(path)}: tensor '{tensor.name}' has an external data length of {size} "
                       f"bytes but its {_shape(tensor)} needs {need} bytes", BROKEN)
    if offset + size > file_size:
        raise SpaError(f"cannot load {_what(path)}: external data for tensor '{tensor.name}' reads past the end of "
                       f"'{loc}' ({offset + size} > {file_size} bytes): the file is truncated")
    return External(tensor, target, offset, size)


def read_array(ext: External) -> np.ndarray:
    """One tensor's value read from its external data (a lazily loaded model's weights,
    spa.core.model.load(lazy=True)): only its own bytes, straight from the file."""
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ext.tensor.data_type))
    count = int(np.prod(ext.tensor.dims, dtype=np.int64))
    arr = np.fromfile(ext.file, dtype=dtype, count=count, offset=ext.offset)
    if arr.size != count:  # the file shrank since it was checked
        raise SpaError(f"external data of tensor '{ext.tensor.name}' ends early in '{ext.file}' "
                       f"({arr.nbytes} of {count * dtype.itemsize} bytes)")
    return arr.reshape(tuple(ext.tensor.dims))


def read_external(found: list[External], path: Path) -> None:
    """Read each tensor's checked external bytes into its raw_data (the tensor then holds its data)."""
    for ext in found:
        with open(ext.file, "rb") as f:
            f.seek(ext.offset)
            data = f.read(ext.size)
        if len(data) != ext.size:  # the file shrank since it was checked
            raise SpaError(f"cannot load {_what(path)}: external data of tensor '{ext.tensor.name}' ends early "
                           f"({len(data)} of {ext.size} bytes)")
        ext.tensor.raw_data = data
        ext.tensor.data_location = TensorProto.DEFAULT
        del ext.tensor.external_data[:]


def reads(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of `graph` reads, subgraphs (If/Loop bodies reading outer values) included."""
    names = {i for n in graph.node for i in n.input if i}
    return names | subgraph_reads(graph)


SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})  # ONNX's own ops with graph attributes


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a node's attributes hold (an If's branches, a Loop's body). Only ONNX's
    control-flow ops and ops of other domains can hold one (the checker refuses an attribute an
    ONNX op does not declare): the attributes of the others are not looked at."""
    if node.op_type not in SUBGRAPH_OPS and node.domain in ("", "ai.onnx"):
        return []
    return [sub for a in node.attribute for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


def subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names the subgraphs of `graph`'s nodes read (outer-scope captures and their own)."""
    names = set()
    for node in graph.node:
        for sub in subgraphs(node):
            names |= reads(sub)
    return names
