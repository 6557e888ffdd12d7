"""ONNX Runtime on the CPU, as the core uses it: sessions, random feeds, runs with extra outputs.

The core's checks (shape inference's run fallback, the checked save, fidelity on data) run
models here; the Session interface for benchmarking every backend is spa.backends."""

from __future__ import annotations

import functools
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import spa.core
from spa.core.errors import SpaError, clip
from spa.core.sizes import TWO_GB, file_bytes, weight_bytes

ort.set_default_logger_severity(4)  # errors reach the user as exceptions, in one line


@functools.cache  # once per process
def shared_arena() -> bool:
    """Register one CPU memory arena with ONNX Runtime's environment (once per process) for the
    sessions to share; False where this ONNX Runtime cannot. Calibrated compensation runs a dense
    and a pruned session in turns, each holding an arena sized for its largest run; sharing one
    arena holds one (the PP-OCR detector's compensation peak: about 1.1 -> 0.9 GB, same CPU,
    docs/benchmarks.md). The arena is never given back while the process lives, so only the CLI,
    whose process ends with the command, turns this on."""
    try:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 0, -1, -1))  # ORT's default extension
    except Exception:  # noqa: BLE001 - an ONNX Runtime without environment allocators: one arena each
        return False
    return True


_HELD: dict = {}  # the last light sessions of model files: {key: (session, bytes)}, oldest first
HOLD_BYTES = 256 << 20  # model bytes of light sessions kept together; one is always kept, whatever its size


def session(model, threads: int = 0, light: bool = False) -> ort.InferenceSession:
    """A CPU session for a ModelProto, or for a file path (needed above 2 GB).

    `light`: no graph optimisations and no weight pre-packing; for checks that run a
    model once, where building an optimised session costs more than the run. The last light
    sessions of files are kept, so the checks that run an input and its result in turn build
    each once (a 15k-node LLM graph takes about a second to load): as many as fit in HOLD_BYTES
    of model files, at least the last one (an LLM of billions of parameters: one at a time).
    A file is known by its inode, size and time, so a result renamed into place keeps its
    session. `release()` drops them."""
    if light and isinstance(model, (str, os.PathLike)):
        st = os.stat(model)
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, threads)
        if key not in _HELD:
            size = file_bytes(model)
            while _HELD and sum(b for _, b in _HELD.values()) + size > HOLD_BYTES:
                del _HELD[next(iter(_HELD))]  # the oldest first, before the new one is built
            _HELD[key] = (_session(model, threads, light), size)
        return _HELD[key][0]
    return _session(model, threads, light)


def release(*, small: bool = True) -> None:
    """Drop the kept sessions (their weights): after the checks, before other work. With
    `small=False` the sessions of models that fit in HOLD_BYTES together stay (an LLM's
    decode check after the output check runs the same two files)."""
    if small or sum(b for _, b in _HELD.values()) > HOLD_BYTES:
        _HELD.clear()


def _session(model, threads: int, light: bool) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    if light:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if threads or spa.core.THREADS:
        opts.intra_op_num_threads = threads or spa.core.THREADS
    if spa.core.SHARED_ARENA and shared_arena():  # the CLI's sessions share one arena
        opts.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(model_bytes(model), opts, providers=["CPUExecutionProvider"])


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
        done = subprocess.run([sys.executable, "-c", _LOAD], input=model_bytes(model), capture_output=True, check=False,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"ONNX Runtime {ort.__version__} did not finish loading it within {timeout:.0f} s"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        return f"ONNX Runtime {ort.__version__} crashed ({signal.Signals(-done.returncode).name}) loading it"
    return ort_reason(done.stderr.decode(errors="replace"), default=f"ONNX Runtime's loader exited with code "
                      f"{done.returncode}")


def _np_dtype(elem_type: int):
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type)


def graph_inputs(proto: onnx.ModelProto) -> list[tuple]:
    """(value info, dims) of the real graph inputs (not initializers listed as inputs): dims a tuple
    with None for a dynamic dim, or None when the input declares no shape."""
    inits = {t.name for t in proto.graph.initializer}
    out = []
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = None if not tt.HasField("shape") else \
            tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
        out.append((vi, dims))
    return out


def random_feeds(model, dynamic: int = 1, seed: int = 0, *, shapes: dict | None = None) -> dict[str, np.ndarray]:
    """Random inputs for every real graph input; dynamic dims set to `dynamic`, inputs named in
    `shapes` ({name: dims}, checked by spa.core.shapes) at those dims."""
    rng = np.random.default_rng(seed)
    feeds = {}
    where = f" of '{model.path}'" if getattr(model, "path", None) is not None else ""
    for vi, declared in graph_inputs(model):
        dims = list((shapes or {}).get(vi.name) or [d or dynamic for d in declared or ()])
        feeds[vi.name] = random_array(rng, dims, _np_dtype(vi.type.tensor_type.elem_type),
                                      name=f"input '{vi.name}'{where}")
    proto = model if isinstance(model, onnx.ModelProto) else getattr(model, "proto", None)
    if proto is not None and cache_shapes(proto) is not None:
        _decoder_values(proto, feeds, rng)
    return feeds


def _decoder_values(proto: onnx.ModelProto, feeds: dict, rng) -> None:
    """A decoder with a KV cache reads its inputs' values, not only their shapes: the attention
    mask is all ones (ONNX Runtime's GroupQueryAttention takes its sum as the sequence length),
    position ids count on from the past length, token ids lie within the vocabulary."""
    mask, ids = feeds.get("attention_mask"), feeds.get("input_ids")
    if mask is not None and mask.dtype.kind in "iub":
        feeds["attention_mask"] = np.ones_like(mask)
    pos = feeds.get("position_ids")
    if pos is not None and pos.ndim == 2 and mask is not None and ids is not None:
        start = mask.shape[1] - ids.shape[1]
        feeds["position_ids"] = np.broadcast_to(np.arange(start, start + pos.shape[1]), pos.shape).astype(pos.dtype)
    if ids is not None and ids.dtype.kind in "iu":
        feeds["input_ids"] = rng.integers(0, _vocabulary(proto), ids.shape).astype(ids.dtype)


def _vocabulary(proto: onnx.ModelProto) -> int:
    """Rows of the embedding table `input_ids` indexes (a Gather of a constant), else 2."""
    tables = {t.name: t.dims for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == "input_ids" and node.input[0] in tables:
            return max(int(tables[node.input[0]][0]), 1)
    return 2


CACHE_PAST, CACHE_CURRENT = 3, 2  # past and current lengths cache_shapes gives a decoder with a KV cache


def cache_shapes(proto: onnx.ModelProto, past: int = CACHE_PAST, hints: dict | None = None) -> dict | None:
    """{input: dims} for a decoder exported with a KV cache (inputs `input_ids` or `inputs_embeds`,
    `attention_mask`, and past key/values whose names hold "past"), else None. Dims of 1 would make
    its attention_mask one long where the model needs past + current (optimum's exports then fail
    to run on random inputs); here the batch is 1, the current length CACHE_CURRENT, the past
    `past` (0: an empty cache, the first step of a generation), and the mask's length their sum (or
    its declared sum, e.g. "past_sequence_length + 1", which then sets the current length). `hints`:
    {symbol: size} known otherwise (a cache's symbolic head size, spa.core.kvcache.head_size_hints)."""
    named = {vi.name: [d.dim_param or (d.dim_value or None) for d in vi.type.tensor_type.shape.dim]
             for vi, dims in graph_inputs(proto) if dims is not None}
    ids = next((n for n in ("input_ids", "inputs_embeds") if len(named.get(n) or ()) >= 2), None)
    pasts = [n for n in named if "past" in n and n != ids]
    if ids is None or len(named.get("attention_mask") or ()) != 2 or not pasts:
        return None
    (batch, seq), total = named[ids][:2], named["attention_mask"][1]
    known = {**(hints or {}), **({batch: 1} if isinstance(batch, str) else {})}
    cached = {d for n in pasts for d in named[n] if isinstance(d, str) and d not in known and d != seq}
    known.update(dict.fromkeys(cached, past))
    if isinstance(seq, str):
        known[seq] = CACHE_CURRENT
    if isinstance(total, str) and total not in known:
        terms = [t.strip() for t in total.split("+")]
        consts = [int(t) for t in terms if t.isdigit()]
        if isinstance(seq, str) and seq not in terms and len(consts) == 1:
            known[seq] = consts[0]  # "past_sequence_length + 1": one token at a time
        known[total] = sum(known.get(t, past) if not t.isdigit() else int(t) for t in terms) \
            if len(terms) > 1 else past + known.get(seq, 1)
    return {n: [known.get(d, 1) if isinstance(d, str) or d is None else d for d in dims] for n, dims in named.items()}


def exact_feeds(model: onnx.ModelProto) -> bool:
    """Whether random_feeds gives exactly what the model declares: every real input a tensor whose
    dims are all fixed (no symbolic or unknown dim that random feeds would have to guess)."""
    return all(vi.type.HasField("tensor_type") and dims is not None and all(dims)
               for vi, dims in graph_inputs(model))


def run(model, feeds: dict[str, np.ndarray], light: bool = False) -> dict[str, np.ndarray]:
    """Outputs by name for a ModelProto or a model file."""
    return outputs(session(model, light=light), feeds)


def outputs(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of a session by name, on `feeds`."""
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


_ORT_CODE = re.compile(r"\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*")
_SOURCE = re.compile(r"(?:[\w.+-]*/)*[\w.+-]+\.(?:h|hpp|cc|cpp|c):\d+\s*")
_SIGNATURE = re.compile(r"(?:[\w:<>,*&~]+\s+)*?[\w:~<>]+::[\w~<>]+\(")
_NOISE = ("status.IsOK() was false. ",)
_FALSE = re.compile(r"[\w.()\[\]]+ (?:==|!=|<=|>=|<|>) [\w.()\[\]]+ was false\. ")
_NODE = re.compile(r"Non-zero status code returned while running (\S+) node\. Name:'([^']*)' Status Message: ")


def ort_reason(exc, limit: int = 300, default: str = "") -> str:
    """ONNX Runtime's reason for a failure, as one line: without its `[ONNXRuntimeError] : N : CODE :`
    prefix and the C++ source location and function that raised it, every line joined (the indices of
    "Got invalid dimensions" included), cut only at a sentence, clause or word boundary (clip)."""
    text = _ORT_CODE.sub("", " ".join(str(exc).split()))
    while (at := _SOURCE.search(text)) is not None:
        text = text[:at.start()] + " " + text[_signature_end(text, at.end()):]
    for noise in _NOISE:
        text = text.replace(noise, "")
    text = _FALSE.sub("", text)
    text = _NODE.sub(lambda m: f"{m[1]} node '{m[2]}': " if m[2] else f"{m[1]} node: ", text)
    text = re.sub(r"failed:(?=\S)", "failed: ", " ".join(text.split()))
    return clip(text, limit) if text else default


def _signature_end(text: str, start: int) -> int:
    """Where the C++ function signature after a source location (`void ns::f(int, const T&) const`)
    ends: the index after its closing parenthesis (and `const`); `start` when there is none."""
    sig = _SIGNATURE.match(text, start)
    if sig is None:
        return start
    depth, i = 0, sig.end() - 1
    for i in range(sig.end() - 1, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            break
    rest = text[i + 1:]
    return i + 1 + (len(rest) - len(rest.lstrip())) + (6 if rest.lstrip().startswith("const ") else 0)


def run_with_outputs(model, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a spa Model or a ModelProto with `names` (intermediate tensors) exposed as extra graph
    outputs (typed where the Model knows their dtypes)."""
    source = model if isinstance(model, onnx.ModelProto) else model.proto
    dtypes = getattr(model, "dtypes", {})
    proto = onnx.ModelProto()
    proto.CopyFrom(source)
    present = {o.name for o in proto.graph.output}
    for name in names:
        if name not in present:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, dtypes[name], None) if name in dtypes
                                      else onnx.ValueInfoProto(name=name))
    return run(proto, feeds)


def checked_session(model, *, name=None):
    """session(model), with ONNX Runtime's many load errors as one SpaError line naming the model
    (`name`: the file an in-memory copy came from)."""
    try:
        return session(model)
    except SpaError:
        raise
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's many load errors, as one line
        name = name or (model if isinstance(model, (str, Path)) else "(in memory)")
        raise SpaError(f"cannot load model '{name}' in ONNX Runtime: {ort_reason(exc)}") from None


def _memory() -> int:
    """Physical memory in bytes (16 GiB where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 16 * 2**30


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""


def random_array(rng, shape: list, dtype, *, name: str = "an input") -> np.ndarray:
    """Standard normal floats; integers and bools 0 or 1 (valid token types, masks, indices).
    An input larger than half this machine's memory (a dim of 2**40 in a broken export) is refused
    in one line naming it (`name`), before anything is allocated."""
    dtype = np.dtype(dtype)
    need = math.prod(int(d) for d in shape) * dtype.itemsize
    if need > _memory() // 2:
        raise SpaError(f"{name} has shape ({', '.join(map(str, shape))}): a random input of that shape would need "
                       f"{need} bytes ({_human(need)}), more than this machine can hold",
                       "check the model's input shapes, or give it real data")
    try:
        if dtype.kind == "f":
            return rng.standard_normal(shape).astype(dtype)
        return rng.integers(0, 2, shape).astype(dtype)
    except MemoryError:
        raise SpaError(f"{name} has shape ({', '.join(map(str, shape))}): not enough memory for a random input "
                       f"of {need} bytes") from None


def model_bytes(model):
    if isinstance(model, onnx.ModelProto):
        if weight_bytes(model) >= TWO_GB:
            raise SpaError("cannot run a >2 GB model from memory", "save it and run it from the file")
        return model.SerializeToString()
    return str(model)


def session_with_outputs(proto, names: list, dtypes: dict, *, only: bool = False):
    """An ONNX Runtime session of `proto` that also returns the tensors `names`.

    `only`: it returns just those, and computes only the nodes they depend on (ONNX Runtime runs
    every node of a graph, wanted or not): a prefix of the model is much cheaper to run."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    if only:
        del out.graph.output[:]
    present = {o.name for o in out.graph.output}
    for name in names:
        if name not in present and name in dtypes:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, dtypes[name], None))
    if only:
        kept = onnx.ModelProto()
        kept.CopyFrom(out)
        _keep_needed(kept.graph)
        if kept.graph.node:  # graph inputs alone (the tensors read by a model's first layer) make no graph: ORT
            out = kept       # refuses one without nodes, so the whole model runs instead
    return checked_session(out)


def _keep_needed(graph) -> None:
    """Drop the nodes and initializers no graph output depends on (left whole when a node has a
    subgraph, whose outer-scope reads are not listed as inputs)."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return
    need, keep = {o.name for o in graph.output}, []
    for node in reversed(graph.node):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(node.input)
    nodes = list(reversed(keep))
    dropped = {t.name for t in graph.initializer if t.name not in need}
    inits = [t for t in graph.initializer if t.name in need]
    inputs = [i for i in graph.input if i.name not in dropped]  # old IRs list initializers as inputs too
    del graph.node[:], graph.initializer[:], graph.input[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    graph.input.extend(inputs)
