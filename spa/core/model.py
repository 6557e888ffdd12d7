"""Model I/O: load (with safe external data), shape inference, atomic save.

    path ─load─▶ Model(proto, shapes) ─save─▶ path'   (temp file + rename; input never touched)

Shapes come from ONNX shape inference; where it leaves a tensor's rank or a dim unknown, from
the same inference at two sets of input sizes with the run-time shape arithmetic folded between
rounds (spa.core.shapefold: a dim that differs between the two is dynamic); where a float tensor
is still unknown, from ONNX Runtime's symbolic shape inference, then from running the model twice
(dynamic dims fed as 1 and 2).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import external_data_helper, numpy_helper

from spa.core import shapefold
from spa.core.errors import SpaError, first_line
from spa.core.runtime import ort_reason, random_feeds, run_with_outputs, session
from spa.core.sizes import FLOAT_TYPES, TWO_GB, file_bytes, weight_bytes  # noqa: F401 - re-exported: model I/O's sizes
from spa.core.tensors import External, all_tensors, check_sizes, external_data, read_external

Shape = tuple  # tuple[int | None, ...]: static dims as int, dynamic/unknown as None


@dataclass
class Model:
    """An ONNX model plus what spa knows about its tensors."""

    proto: onnx.ModelProto
    path: Path | None = None
    shapes: dict[str, Shape] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    unknown: set[str] = field(default_factory=set)  # tensors with a dim neither static nor symbolic
    external_files: set[Path] = field(default_factory=set)  # external data the model was loaded from
    input_shapes: dict | None = None  # {input: dims} it runs at (spa.core.shapes.bind); None: dynamic dims as 1
    input_shapes_from: str = "model"  # where input_shapes came from: "shape", "calib" (or the data's name), "model"
    shapes_at: dict | None = None  # every tensor's shape at input_shapes: what spa.core.cost counts
    # lazily loaded (load(lazy=True)): initializers still in their external data, read one at a time
    weights_at: dict = field(default_factory=dict)  # {initializer name: spa.core.tensors.External}

    def materialize(self) -> None:
        """Read a lazily loaded model's weights into its proto (for passes that need them all)."""
        if self.weights_at:
            materialize_proto(self.proto, Path(self.path).parent)
            self.weights_at = {}

    def drop_weights(self) -> None:
        """Keep the graph, free the initializers' data (the file still has them)."""
        self.proto = skeleton(self.proto)

    def refuse_overwrite(self, *targets) -> None:
        """Error if writing `targets` (or their `.data` companions) would clobber this model's files."""
        mine = {p.resolve() for p in self.external_files}
        if self.path is not None:
            mine.add(Path(self.path).resolve())
        for target in targets:
            if target is None:
                continue
            target = Path(target)
            for candidate in (target, target.with_name(target.name + ".data")):
                if candidate.resolve() in mine:
                    raise SpaError(f"refusing to write '{candidate}': it is a file of the input model",
                                   "choose another output path")

    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    @property
    def input_names(self) -> list[str]:
        """The graph inputs a caller feeds (not initializers listed as inputs)."""
        inits = {t.name for t in self.proto.graph.initializer}
        return [i.name for i in self.proto.graph.input if i.name not in inits]


def read_graph(path: str | os.PathLike) -> tuple[onnx.ModelProto, list[External]]:
    """The model in `path` without its external data, every tensor checked (sizes against dims
    and data type, external data locations and ranges: spa.core.tensors); and where its external
    data lies. Nothing of the external data is read, so this is cheap for any model size."""
    path = Path(path)
    try:
        proto = _parse(path)
    except _NotOnnx as exc:
        raise SpaError(f"cannot load model '{path}': not a valid ONNX file ({exc})",
                       "check that the file is an .onnx model and is complete") from exc.__cause__
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise SpaError(
            f"cannot load model '{path}': not a valid ONNX file (no graph or no nodes)",
            "check that the file is an .onnx model and is complete",
        )
    return proto, _checked_tensors(proto, path)


def check_file(path: str | os.PathLike) -> None:
    """For commands that hand a model file to a runtime as it is: refuse in one line what `load`
    refuses (a special file; a tensor whose size, external location or range is wrong). A file
    that is not ONNX (a TensorRT engine, or garbage) is left to the runtime, which says why."""
    path = Path(path)
    try:
        proto = _parse(path)
    except _NotOnnx:
        return
    _checked_tensors(proto, path)


class _NotOnnx(Exception):
    """The file is regular but protobuf cannot parse it as a model (its message: the error type)."""


def _parse(path: Path) -> onnx.ModelProto:
    """The model in the regular file `path`, without its external data; _NotOnnx when it is none."""
    require_regular(path, "model")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for garbage input
        raise _NotOnnx(type(exc).__name__) from exc


def _checked_tensors(proto: onnx.ModelProto, path: Path) -> list[External]:
    """Every tensor's size and external data checked (spa.core.tensors); where its external data lies."""
    check_sizes(proto, path)
    return external_data(proto, path)


LAZY_BYTES = 1 << 30  # with lazy=True, external data from this size on stays in its file


def load(path: str | os.PathLike, infer: bool = True, lazy: bool = False) -> Model:
    """Load an ONNX model (external data checked and loaded) and infer its shapes. `lazy`: a model
    whose external data holds LAZY_BYTES or more keeps its initializers there (the proto refers to
    them, `Model.weights_at` says where), each read when a value is asked for (GraphIndex.value):
    an LLM's weights are never all in memory at once."""
    path = Path(path)
    proto, external = read_graph(path)
    names = {t.name for t in proto.graph.initializer}
    kept = [e for e in external if e.tensor.name in names] \
        if lazy and sum(e.size for e in external) >= LAZY_BYTES else []
    read_external([e for e in external if e not in kept], path)
    _check_proto(proto, path, from_file=bool(external))
    model = Model(proto, path, external_files={e.file for e in external}, weights_at={e.tensor.name: e for e in kept})
    if infer:
        infer_shapes(model)
    return model


@contextlib.contextmanager
def quiet_stdout():
    """Silence C++ code that prints to fd 1 (the ONNX checker's experimental-op warnings),
    so `--json` output on stdout stays one clean document."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def check_model(model, full: bool = False) -> None:
    with quiet_stdout():
        onnx.checker.check_model(model, full_check=full)


RUNTIME_OP = re.compile(r"No Op registered for (\S+) with domain_version of (\d+)")


def runtime_op(message: str | None) -> str | None:
    """The op of a checker complaint that only says ONNX has no schema for it (ONNX Runtime's own
    ops, e.g. SimplifiedLayerNormalization in the default domain of GenAI exports), else None."""
    found = RUNTIME_OP.search(message or "")
    return found.group(1) if found else None


def _check_proto(proto: onnx.ModelProto, path: Path, from_file: bool) -> None:
    """The ONNX checker; models with external data are checked from their file (no copy). A model
    the checker rejects only for an op it has no schema for is accepted when ONNX Runtime loads it
    (ONNX Runtime registers ops ONNX does not: what it runs is a model)."""
    try:
        check_model(str(path) if from_file else proto)
        return
    except onnx.checker.ValidationError as exc:
        first = first_line(exc, limit=200, default="invalid model")
    op = runtime_op(first)
    if op is None:
        raise SpaError(f"cannot load model '{path}': the ONNX checker rejects it ({first})",
                       "the file may be truncated or written by a broken exporter")
    try:
        session(str(path) if from_file else proto, light=True)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's many load errors, as one line
        raise SpaError(f"cannot load model '{path}': neither ONNX nor ONNX Runtime knows its op '{op}' "
                       f"(ONNX Runtime: {ort_reason(exc)})",
                       "spa runs models ONNX Runtime can run: was it exported for another runtime or a "
                       "newer ONNX Runtime?") from None


# ---------------------------------------------------------------- shapes


def _dims(type_proto: onnx.TypeProto, known_params: set) -> tuple[Shape, bool] | None:
    """(dims, whether one is unknown) of a tensor type with a shape, else None. A dim is None
    unless it has a positive value; it is unknown when it has no value and no symbol the model's
    inputs declare (inference invents symbols such as `unk__3` for sizes it could not compute)."""
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims, unknown = [], False
    for d in type_proto.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            v = d.dim_value
            dims.append(v if v > 0 else None)
        else:
            dims.append(None)
            unknown = unknown or d.dim_param not in known_params
    return tuple(dims), unknown


def _input_params(graph: onnx.GraphProto) -> set:
    return {d.dim_param for i in graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}


def _collect(graph: onnx.GraphProto, shapes: dict, dtypes: dict, unknown: set, params: set, *,
             inferred: bool = False) -> None:
    """Shapes and types the graph declares (value infos, initializers, Constant nodes). `inferred`:
    a copy of the same graph out of a shape inference, whose constants are known already."""
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        found = _dims(vi.type, params)
        if found is not None and (vi.name not in shapes or vi.name in unknown):
            shapes[vi.name] = found[0]
            if found[1]:
                unknown.add(vi.name)
            else:
                unknown.discard(vi.name)
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            dtypes.setdefault(vi.name, vi.type.tensor_type.elem_type)
    if inferred:
        return
    for init in graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
        dtypes[init.name] = init.data_type
        unknown.discard(init.name)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            typed = constant_type(node)
            if typed is not None:
                shapes[node.output[0]], dtypes[node.output[0]] = typed
                unknown.discard(node.output[0])


_CONSTANT_TYPES = {"value_float": ((), onnx.TensorProto.FLOAT), "value_int": ((), onnx.TensorProto.INT64)}


def constant_type(node: onnx.NodeProto) -> tuple | None:
    """(shape, dtype) of a Constant node's value, read without decoding it (None: sparse/unknown)."""
    for attr in node.attribute:
        if attr.name == "value":
            return tuple(int(d) for d in attr.t.dims), attr.t.data_type
        if attr.name in _CONSTANT_TYPES:
            return _CONSTANT_TYPES[attr.name]
        if attr.name == "value_floats":
            return (len(attr.floats),), onnx.TensorProto.FLOAT
        if attr.name == "value_ints":
            return (len(attr.ints),), onnx.TensorProto.INT64
    return None


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """Value of a Constant node, whatever attribute holds it (None if sparse/unknown)."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def constants_as_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `proto` whose top-level float Constant nodes of more than one value are
    initializers of the same name (paddle2onnx and some TensorFlow exports keep every weight in a
    Constant node): the same model, with weights a trainer can find."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    keep = []
    for node in out.graph.node:
        value = constant_node_value(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if value is not None and value.dtype.kind == "f" and value.size > 1:
            out.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        else:
            keep.append(node)
    if len(keep) < len(out.graph.node):
        del out.graph.node[:]
        out.graph.node.extend(keep)
    return out


def _used_outputs(graph: onnx.GraphProto) -> list[str]:
    """Node outputs something reads (unused ones, e.g. Dropout masks, never need a shape)."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    return [o for n in graph.node for o in n.output if o in used]


def _missing(model: Model, outs: list[str] | None = None) -> list[str]:
    """Node outputs whose shape is still unknown (`outs`: _used_outputs, when already known)."""
    outs = _used_outputs(model.graph) if outs is None else outs
    return [o for o in outs if o not in model.shapes or o in model.unknown]


def infer_shapes(model: Model) -> None:
    """Fill model.shapes/dtypes: ONNX inference, then folded at two sizes, then ORT symbolic,
    then a real run."""
    model.shapes, model.dtypes, model.unknown = {}, {}, set()
    params = _input_params(model.graph)
    _collect(model.graph, model.shapes, model.dtypes, model.unknown, params)
    bones = skeleton(model.proto)
    inferred = None
    try:
        inferred = onnx.shape_inference.infer_shapes(bones, data_prop=True)
        _collect(inferred.graph, model.shapes, model.dtypes, model.unknown, params, inferred=True)
    except Exception:  # noqa: BLE001, S110
        pass  # partial knowledge is fine: the fallbacks below fill the gaps
    outs = _used_outputs(model.graph)
    if _missing(model, outs):
        _fold_fallback(model, bones, inferred, _missing(model, outs))
    if _missing_float(model, outs):
        _symbolic_fallback(model, bones, params)
    if _missing(model, outs):
        _run_fallback(model, _missing(model, outs))


def _missing_float(model: Model, outs: list[str]) -> list[str]:
    """Unknown tensors that may carry channels: integer and boolean ones (shape arithmetic, masks)
    do not; one whose type is unknown too might."""
    return [n for n in _missing(model, outs) if model.dtypes.get(n, onnx.TensorProto.FLOAT) in FLOAT_TYPES]


TOKEN_SIZES = (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47)  # batch, tokens, cache lengths
SIGNAL_SIZES = (1009, 1013, 1019, 1021, 1031, 1033, 1039, 1049)  # image sides, audio samples, frames


def fold_sizes(graph: onnx.GraphProto) -> tuple[dict, dict]:
    """Two sets of sizes for the inputs' dim symbols, every symbol twice as large in the second:
    a dim that comes out alike in both is static. A batch axis, or a symbol on an integer input
    (token ids, masks, positions, cache lengths), gets a small size, kept below the position
    table an LLM slices (a clamped slice would look static); any other one (an image's side, an
    audio signal's length) a large one, so that strided layers (a 320x audio front end, 32x
    image backbones) neither reach 0 nor shrink both runs to the same size."""
    small = {}
    for vi in graph.input:
        t = vi.type.tensor_type
        for axis, d in enumerate(t.shape.dim):
            for word in shapefold.WORD.findall(d.dim_param):
                small[word] = small.get(word, False) or axis == 0 or t.elem_type not in FLOAT_TYPES
    words = shapefold.symbols(graph)
    first = {w: TOKEN_SIZES[i % len(TOKEN_SIZES)] for i, w in enumerate(w for w in words if small[w])}
    first.update({w: SIGNAL_SIZES[i % len(SIGNAL_SIZES)] for i, w in enumerate(w for w in words if not small[w])})
    return first, {w: 2 * v for w, v in first.items()}


def _fold_fallback(model: Model, bones: onnx.ModelProto, inferred: onnx.ModelProto | None, missing: list) -> None:
    """Shapes of still-unknown tensors from spa.core.shapefold at two sets of input sizes (one
    when the inputs have no symbolic dim): the dims alike in both are static, the others dynamic.
    Only the part of the graph that computes them is folded (shapefold.part: on a 64-layer LLM
    export, a fifth of the nodes). Nothing is taken when a tensor the first inference typed
    comes out otherwise: a static dim changed, or a dim of the inputs' symbols not at the size
    the symbols give (a slice clamped both runs to one size, a stride rounded them alike)."""
    typed = {vi.name: vi for vi in inferred.graph.value_info} if inferred is not None else {}
    typed.update({vi.name: vi for vi in list(bones.graph.input) + list(bones.graph.output)})
    first, second = fold_sizes(bones.graph)
    part = shapefold.part(bones, set(missing), typed, sizes=first)
    constants = shapefold.constant_values(part.graph)  # read once for both runs
    runs = [shapefold.fold(part, first, constants)] + ([shapefold.fold(part, second, constants)] if first else [])
    if any(r is None for r in runs):
        return
    a, b = runs[0], runs[-1]
    declared = _declared(typed, set(a) | set(b))
    for sizes, run in zip((first, second), runs):
        for name, dims in declared.items():
            got = run.get(name)
            if got is None or len(got) != len(dims):
                continue
            for d, g in zip(dims, got):
                e = d if d is None or isinstance(d, int) else shapefold.dim_value(d, sizes)
                if e is not None and g is not None and e != g:
                    return
    for name in missing:
        x, y = a.get(name), b.get(name)
        if x is None or y is None or len(x) != len(y) or None in x or None in y:
            continue
        dims = tuple(p if p == q and p > 0 else None for p, q in zip(x, y))  # a 0 as ONNX's own: None
        known = model.shapes.get(name)
        if known is not None and len(known) == len(dims) and any(k is not None and k != d for k, d in zip(known, dims)):
            continue
        model.shapes[name] = dims
        model.unknown.discard(name)


def _declared(typed: dict, names: set) -> dict:
    """{name: dims} of the typed tensors among `names` that say something: a dim is its value, its
    symbol text (sized per run: `shapefold.dim_value`) or None (unknown, `unk__3`, no dim)."""
    out = {}
    for name in names:
        vi = typed.get(name)
        if vi is None or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in vi.type.tensor_type.shape.dim)
        if any(d is not None for d in dims):
            out[name] = dims
    return out


def reinfer(proto: onnx.ModelProto) -> Model:
    """A Model of `proto` with its shapes inferred (a rewritten model, before analysis or costing)."""
    model = Model(proto)
    infer_shapes(model)
    return model


@functools.cache
def _symbolic_shape_infer():
    """onnxruntime.tools.symbolic_shape_infer, loaded from its file alone: the package's __init__
    imports torch whenever it is installed (about 300 MB of memory and a second, for nothing the
    shape inference uses; it needs onnx, numpy and sympy only)."""
    path = Path(onnxruntime.__file__).parent / "tools" / "symbolic_shape_infer.py"
    spec = importlib.util.spec_from_file_location("spa_symbolic_shape_infer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _symbolic_fallback(model: Model, bones: onnx.ModelProto, params: set) -> None:
    try:
        inferred = _symbolic_shape_infer().SymbolicShapeInference.infer_shapes(bones, auto_merge=True,
                                                                               guess_output_rank=True)
    except Exception:  # noqa: BLE001
        return
    if inferred is not None:
        _collect(inferred.graph, model.shapes, model.dtypes, model.unknown, params, inferred=True)


def _run_fallback(model: Model, missing: list) -> None:
    """Run the model with every unknown tensor as an output, dynamic dims at 1 and 2. Only when a
    float tensor is still unknown: integer and boolean ones (an attention mask's arithmetic) carry
    no channels, and building the session costs seconds on a deep graph (a 64-layer LLM: 2 s)."""
    names = [n for n in missing if n in model.dtypes]
    if not any(model.dtypes[n] in FLOAT_TYPES for n in names) or weight_bytes(model.proto) >= TWO_GB or model.weights_at:
        return
    try:
        runs = [run_with_outputs(model, names, random_feeds(model, dynamic=d)) for d in (1, 2)]
    except Exception:  # noqa: BLE001
        return
    for name in names:
        a, b = runs[0].get(name), runs[1].get(name)
        if a is None or b is None or a.ndim != b.ndim:
            continue
        model.shapes[name] = tuple(x if x == y else None for x, y in zip(a.shape, b.shape))
        model.unknown.discard(name)


# ---------------------------------------------------------------- copies without the weights

SMALL = 4096  # elements: initializers at most this large are kept in skeletons (shape constants)
CONSTANT_OPS = ("Constant", "ConstantOfShape", "Identity")  # nodes that can hold a parameter's value
COPY = ".spa_use"  # name suffix of the per-use copies of a shared uniform constant (analysis.untie_uniform)


def _copy_except(msg, skip: set):
    """A copy of a protobuf message without the fields named in `skip`."""
    new = type(msg)()
    for fd, value in msg.ListFields():
        if fd.name in skip:
            continue
        target = getattr(new, fd.name)
        if hasattr(value, "extend") and not isinstance(value, (str, bytes)):
            target.extend(value)
        elif fd.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(new, fd.name, value)
    return new


def copy_without_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with an empty initializer list (the caller adds what it needs)."""
    out = _copy_except(proto, {"graph"})
    out.graph.CopyFrom(_copy_except(proto.graph, {"initializer"}))
    return out


def skeleton(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large initializers keep name, dtype and dims but no data: enough for
    shape inference, and it never copies the weights (nor hits the 2 GB protobuf limit)."""
    out = copy_without_initializers(proto)
    for t in proto.graph.initializer:
        if int(np.prod(t.dims, dtype=np.int64)) <= SMALL:
            out.graph.initializer.append(t)
        else:
            out.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
    return out


# ---------------------------------------------------------------- saving


def check_writable(path: str | os.PathLike, source: str | os.PathLike | None = None, *, reads=()) -> Path:
    """Fail early (before any work) when `path` cannot be written: it is the input model or any
    other file the command reads (`reads`: data, plans, teachers; None entries ignored), or it
    exists and is not a regular file (a device node, a FIFO: never replaced by spa's output)."""
    path = Path(path)
    try:
        return _writable(path, source, reads)
    except OSError as exc:  # a name too long for the file system, a loop of links, ...
        raise SpaError(f"cannot write '{str(path)[:120]}': {exc.strerror or exc}") from None


def _writable(path: Path, source, reads) -> Path:
    folder = path.parent
    if source is not None and _same_file(path, source):
        raise SpaError(f"refusing to write '{path}': it is the input model", "choose another -o path")
    for read in reads:
        if read is not None and isinstance(read, (str, os.PathLike)) and _same_file(path, read):
            raise SpaError(f"refusing to write '{path}': the command reads it ('{read}')", "choose another output path")
    if path.is_dir():
        raise SpaError(f"cannot write '{path}': it is a directory", "give a file name such as model.pruned.onnx")
    if path.exists() and not path.is_file() or path.is_symlink() and not path.exists():
        raise SpaError(f"refusing to write '{path}': it is not a regular file", "give a file name such as out.onnx")
    if not folder.is_dir():
        raise SpaError(f"cannot write '{path}': folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise SpaError(f"cannot write '{path}': permission denied", "choose a writable -o path")
    return path


def _same_file(a, b) -> bool:
    """Two paths naming one file (also through links), or one folder-relative name twice."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def require_regular(path: Path, what: str) -> None:
    """A file spa reads must be a regular file: a FIFO or device would hang or exhaust memory."""
    if not path.exists():
        raise SpaError(f"cannot load {what} '{path}': no such file")
    if path.is_dir():
        raise SpaError(f"cannot load {what} '{path}': it is a directory", f"pass the {what} file")
    if not path.is_file():
        raise SpaError(f"cannot load {what} '{path}': not a regular file (a device, FIFO or socket)",
                       f"pass the {what} file itself")


def save(proto: onnx.ModelProto, path: str | os.PathLike, source: Path | None = None, *, verify=None,
         keep_weights: bool = True) -> Path:
    """Write atomically: temp files in the target folder, then rename into place.

    Models whose weights exceed 2 GB get one external data file `<name>.data` beside them.
    `verify(temp_path)` runs on the written file before the rename; if it raises, nothing
    is left behind. `keep_weights=False`: such a model's proto lets go of its weights once they
    are written (its initializers then refer to the data file), so the checks run without a
    second copy of them in memory.
    """
    path = check_writable(path, source)
    folder = path.parent
    sweep_stale(folder)
    tmpdir = Path(tempfile.mkdtemp(prefix=tmp_prefix(), dir=folder))
    try:
        tmp = tmpdir / path.name
        # over 2 GB, or holding weights still in the input's files (a lazily loaded model's)
        external = weight_bytes(proto) >= TWO_GB or any(t.data_location == onnx.TensorProto.EXTERNAL
                                                        for t in proto.graph.initializer)
        if external:
            base = Path(source).parent if source is not None else folder
            _save_with_external_data(proto, tmp, path.name + ".data", keep=keep_weights, base=base)
        else:
            onnx.save_model(proto, str(tmp))
        if verify is not None:
            verify(tmp)
        if external:
            os.replace(tmpdir / (path.name + ".data"), folder / (path.name + ".data"))
        os.replace(tmp, path)
    except (OSError, ValueError) as exc:
        raise SpaError(f"cannot write '{path}': {getattr(exc, 'strerror', None) or exc}") from exc
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


TMP = re.compile(r"^\.spa-(?:tmp|compress)-(?P<pid>\d+)-")


def tmp_prefix(kind: str = "tmp") -> str:
    """Temp names carry the writing process's id, so that a later run can tell a dead run's leftovers."""
    return f".spa-{kind}-{os.getpid()}-"


def sweep_stale(folder: Path) -> None:
    """Remove the temp files and folders a killed spa left in `folder` (SIGKILL, the OOM killer: no
    handler runs): those whose process no longer exists. An interrupt or SIGTERM cleans up at once."""
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return
    for entry in entries:
        m = TMP.match(entry.name)
        if m is None or _alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _save_with_external_data(proto: onnx.ModelProto, tmp: Path, location: str, keep: bool = True,
                             base: Path | None = None) -> None:
    """Move raw tensor bytes >= 1 KiB to `location` beside `tmp`, write the graph, then put
    the bytes back so the caller's proto is unchanged (no second copy of the weights); with
    `keep=False` they stay in the file only. Tensors whose data is still external (relative to
    `base`, the input's folder) are copied from there in chunks."""
    moved, relocated = [], []
    try:
        with open(tmp.parent / location, "wb") as data:
            for tensor in all_tensors(proto):
                if tensor.data_location == onnx.TensorProto.EXTERNAL and base is not None:
                    old = list(tensor.external_data)
                    offset = _copy_external(tensor, base, data)
                    if keep:
                        relocated.append((tensor, old))
                    del tensor.external_data[:]
                    for key, value in (("location", location), ("offset", offset), ("length", data.tell() - offset)):
                        tensor.external_data.add(key=key, value=str(value))
                    continue
                if tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                    raw = tensor.raw_data
                    offset = data.tell()
                    data.write(raw)
                    if keep:
                        moved.append((tensor, raw))
                    external_data_helper.set_external_data(tensor, location, offset=offset, length=len(raw))
                    tensor.data_location = onnx.TensorProto.EXTERNAL
                    tensor.ClearField("raw_data")
        with open(tmp, "wb") as f:
            f.write(proto.SerializeToString())
    finally:
        for tensor, raw in moved:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = raw
        for tensor, old in relocated:
            del tensor.external_data[:]
            tensor.external_data.extend(old)


CHUNK = 64 << 20


def materialize_proto(proto: onnx.ModelProto, base: Path) -> onnx.ModelProto:
    """Read every initializer still in external data (relative to `base`) into the proto (in place)."""
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            buffer = io.BytesIO()
            _copy_external(t, base, buffer)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = buffer.getvalue()
    return proto


def _copy_external(tensor, base: Path, out) -> int:
    """Append a tensor's external bytes (relative to `base`) to `out` in chunks; its offset there."""
    info = {e.key: e.value for e in tensor.external_data}
    start, length = int(info.get("offset", 0)), int(info["length"]) if "length" in info else None
    offset = out.tell()
    with open(base / info["location"], "rb") as src:
        src.seek(start)
        left = length if length is not None else os.fstat(src.fileno()).st_size - start
        while left > 0:
            chunk = src.read(min(CHUNK, left))
            if not chunk:
                raise SpaError(f"external data of tensor '{tensor.name}' ends early")
            out.write(chunk)
            left -= len(chunk)
    return offset


def read_json(path: str | os.PathLike, what: str):
    """The JSON document in `path`; a one-line SpaError naming `what` (plan, sensitivity) if not."""
    if Path(path).exists() and not Path(path).is_file():
        raise SpaError(f"cannot read {what} '{path}': not a regular file", f"pass the {what} file itself")
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SpaError(f"cannot read {what} '{path}': no such file") from None
    except RecursionError:
        raise SpaError(f"cannot read {what} '{path}': nested too deeply to be a {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpaError(f"cannot read {what} '{path}': not valid JSON ({exc})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import: os.umask can only be read by setting it


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Bytes to `path` through a temp file in the same folder and a rename: never half a file.
    The file gets the usual permissions (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(), dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise SpaError(f"cannot write '{path}': {exc.strerror or exc}") from None
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Small text files (plans, reports, bench results), checked writable, written atomically."""
    write_atomic(check_writable(path), text.encode())
