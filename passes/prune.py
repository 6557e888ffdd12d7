"""Channel pruning pass: remove planned channels from every member of their groups.

    plan {group: [channels]} ─▶ dropped positions per channel space
        ─▶ initializers / Constant nodes sliced (np.take on each pruned axis)
        ─▶ attributes and shape constants rewritten (rule rewriters: group, Reshape, Split, ..)
        ─▶ value_info dims updated, dead nodes removed

Requires: an Analysis of the model and a plan of its prunable groups.
Ensures: every tensor's pruned axes have their new sizes; names of nodes, inputs and
outputs are unchanged; the graph passes the ONNX checker and runs in ONNX Runtime like the
input (PrunePass.ensures, on the written file when there is one); with `exact`, the outputs
equal the input's within ZEROS_TOL (removing all-zero channels, spa prune --zeros).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from spa.passes.base import Pass, remove_dead

from spa.core import kvcache
from spa.core.cost import dropped_positions
from spa.core.errors import SpaError, VerificationError
from spa.core.graph import attr
from spa.core.model import (
    COPY,
    SMALL,
    constant_node_value,
    copy_without_initializers,
    materialize_proto,
    sweep_stale,
    tmp_prefix,
)
from spa.core.rules import REWRITERS
from spa.core.rules import key as rule_key

ZEROS_TOL = 1e-5  # removing all-zero channels must leave the outputs as they were


class Edit:
    """What rewriters may read and change while pruning one model."""

    def __init__(self, analysis, drops: dict):
        self.index = analysis.index
        self.proto = None  # the output model, once built from the kept positions (bind)
        self.opset = analysis.index.opset
        self._kept = {s: np.setdiff1d(np.arange(analysis.sizes[s]), d) for s, d in drops.items()}
        self._axes: dict[str, list[int]] = {}
        for t, a in self._kept:
            self._axes.setdefault(t, []).append(a)
        self._uses: dict[str, int] = {}
        self._counter = 0
        self._elements: dict = {}

    def bind(self, proto: onnx.ModelProto) -> onnx.ModelProto:
        """Rewrite `proto` from now on (counting who reads each tensor, for shared constants)."""
        self.proto = proto
        self._twin = {id(a): b for a, b in zip(self.index.graph.node, proto.graph.node)}
        for node in proto.graph.node:
            for i in node.input:
                self._uses[i] = self._uses.get(i, 0) + 1
        return proto

    # sizes -----------------------------------------------------------
    def kept(self, space):
        return self._kept.get(space)

    def old_shape(self, name):
        return self.index.shape(name)

    def old_size(self, space):
        shape = self.index.shape(space[0])
        return shape[space[1]] if shape is not None and 0 <= space[1] < len(shape) else None

    def new_size(self, space):
        kept = self._kept.get(space)
        return self.old_size(space) if kept is None else len(kept)

    def changed_any(self) -> bool:
        return any(len(k) < self.old_size(s) for s, k in self._kept.items())

    def changed_axes(self, name):
        return self._axes.get(name, [])

    # graph -----------------------------------------------------------
    def attr(self, node, name, default=None):
        return attr(node, name, default)

    def value(self, name):
        return self.index.value(name)

    def set_attr(self, node, name, value):
        self.del_attr(node, name)
        node.attribute.append(onnx.helper.make_attribute(name, value))

    def del_attr(self, node, name):
        for a in list(node.attribute):
            if a.name == name:
                node.attribute.remove(a)

    def set_input_const(self, node, idx, array: np.ndarray):
        """Give input `idx` of `node` a new constant value (a private copy if it is shared)."""
        name = node.input[idx] if idx < len(node.input) else ""
        graph = self.proto.graph
        if name and self._uses.get(name, 0) == 1 and name in self.index.initializers:
            _replace_initializer(graph, name, array)
            return
        self._counter += 1
        new = f"{name or node.name or node.op_type}_spa{self._counter}"
        graph.initializer.append(numpy_helper.from_array(array, new))
        while len(node.input) <= idx:
            node.input.append("")
        if name:
            self._uses[name] = self._uses.get(name, 1) - 1
        self._uses[new] = 1
        node.input[idx] = new


    def set_const_element(self, node, slot, element, *, value):
        """Set one element of the constant input `slot` of `node` (a private copy if shared);
        two different values for one element of one node are a conflict."""
        node = self._twin.get(id(node), node)  # the analysed graph's node -> the output's
        key = (id(node), slot, element)
        done = self._elements.setdefault(key, value)
        if done != value:
            raise SpaError(f"shape constant read by {node.op_type} '{node.name}' would need two sizes "
                           f"({done} and {value})", "prune the groups that share it alike")
        current = _input_value(self.proto.graph, node.input[slot], self.index)
        new = np.array(current, copy=True)
        new.reshape(-1)[element] = value
        self.set_input_const(node, slot, new.astype(current.dtype))


def _input_value(graph, name, index):
    for t in graph.initializer:
        if t.name == name:
            return index.value(name) if t.data_location == onnx.TensorProto.EXTERNAL else numpy_helper.to_array(t)
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return constant_node_value(n)
    return index.value(name)


def _replace_initializer(graph, name, array):
    for i, t in enumerate(graph.initializer):
        if t.name == name:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(array, name))
            return


def _slice(array: np.ndarray, name: str, edit: Edit) -> np.ndarray:
    for axis in edit.changed_axes(name):
        array = np.take(array, edit.kept((name, axis)), axis=axis)
    return array


def _copy_pruning_initializers(src, edit: Edit, names: set[str], values: dict, spill=None) -> onnx.ModelProto:
    """The output model: unchanged initializers copied, pruned ones sliced (never both);
    `values` replace the stored arrays first (compensated weights and biases). With `spill` (a
    Spill), large new arrays go to its file and the proto refers to them there."""
    proto = copy_without_initializers(src)
    for t in src.graph.initializer:
        if t.name in names:
            new = _slice(values[t.name] if t.name in values else edit.index.value(t.name), t.name, edit)
        elif t.name in values:  # a compensated tensor no removal touches (a consumer's corrected bias)
            new = np.asarray(values[t.name])
        else:
            proto.graph.initializer.append(t)
            continue
        proto.graph.initializer.append(spill.tensor(new, t.name) if spill is not None and new.size > SMALL
                                       else numpy_helper.from_array(new, t.name))
    return proto


class Spill:
    """A temp file the new weights of a lazily loaded model's pruning are written to as they are
    made, so that the pruned proto never holds them (upb keeps a message's memory until the whole
    message goes): it refers to them by absolute location, which spa.core.model.save copies into
    the output's data file. `close()` removes the file. A new weight that is not finite is refused
    here, as PassResult's finite-weights check does for weights held in the proto."""

    def __init__(self):
        sweep_stale(Path(tempfile.gettempdir()))  # a killed run's spill
        fd, self.path = tempfile.mkstemp(prefix=tmp_prefix(), suffix=".data")
        self.file = os.fdopen(fd, "wb")

    def tensor(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise VerificationError(f"prune: the result's tensor '{name}' holds non-finite values (NaN or inf); "
                                    "nothing written")
        array = np.ascontiguousarray(array)
        offset = self.file.tell()
        self.file.write(array.tobytes())
        self.file.flush()
        t = onnx.TensorProto(name=name, dims=array.shape,
                             data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                             data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self.path), ("offset", offset), ("length", array.nbytes)):
            t.external_data.add(key=key, value=str(value))
        return t

    def close(self) -> None:
        self.file.close()
        Path(self.path).unlink(missing_ok=True)


def _prune_constant_nodes(proto, edit: Edit, names: set[str], values: dict) -> None:
    """Constant nodes are sliced; an Identity copy of a constant becomes a sliced Constant."""
    for node in proto.graph.node:
        out = node.output[0] if node.output else ""
        if out not in names:
            if node.op_type == "Constant" and out in values:  # compensated, not sliced
                del node.attribute[:]
                node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(values[out])))
            continue
        if node.op_type == "Constant":
            value = values[out] if out in values else constant_node_value(node)
        elif node.op_type == "Identity" and out in edit.index.aliases:
            value = edit.index.value(node.input[0])
            node.op_type = "Constant"
            del node.input[:]
        else:
            continue
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(_slice(value, out, edit))))


def _update_value_infos(proto, edit: Edit) -> None:
    """Pruned axes get their new sizes. Symbolic sizes that are expressions ('128*batch', from
    dynamo exports) may hide a pruned size: inside the graph they are made unknown."""
    graph = proto.graph
    names = {d.dim_param for vi in list(graph.input) + list(graph.output)
             if vi.type.HasField("tensor_type") for d in vi.type.tensor_type.shape.dim if d.dim_param}
    for vi in graph.value_info if edit.changed_any() else ():
        if vi.type.HasField("tensor_type"):
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param and d.dim_param not in names:
                    d.ClearField("dim_param")
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        if not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        for axis in edit.changed_axes(vi.name):
            if axis < len(dims):
                dims[axis].dim_value = edit.new_size((vi.name, axis))


def check_plan(analysis, plan: dict) -> None:
    for gid, channels in plan.items():
        try:
            group = analysis.group(gid)
        except KeyError:
            raise SpaError(f"plan names group '{gid}' which the model does not have",
                           "make the plan with --save-plan on this same model") from None
        bad = [c for c in channels if not isinstance(c, int) or not 0 <= c < group.size]
        if bad:
            raise SpaError(f"plan for group '{gid}' has channel indices outside 0..{group.size - 1}: {bad[:5]}")
        if channels and not group.prunable:
            raise SpaError(f"plan prunes group '{gid}' which is not prunable: {group.reason}")
        if len(set(channels)) >= group.size:
            raise SpaError(f"plan removes every channel of group '{gid}'", "keep at least one channel")
        if (group.size - len(set(channels))) % group.multiple:
            raise SpaError(f"plan for group '{gid}' keeps {group.size - len(set(channels))} channels: its ops need a "
                           f"multiple of {group.multiple}")
        locked = sorted(set(channels) & set(group.locked))
        if locked:
            raise SpaError(f"plan removes locked channels {locked[:5]} of group '{gid}'")


def apply(analysis, plan: dict, values: dict | None = None, *, keep_external: bool = False,
          spill: Spill | None = None) -> onnx.ModelProto:
    """Return the pruned ModelProto (a copy: the analysed model is left as it was). `values`:
    new arrays for some pruned parameters (same shapes), sliced instead of the stored ones. A lazily
    loaded model's untouched weights are read into the result, unless `keep_external`: then they
    stay references to the input's data (spa.core.model.save copies them over, never all at once)."""
    values = values or {}
    check_plan(analysis, plan)
    drops = dropped_positions(analysis, {g: c for g, c in plan.items() if c})
    touched = {t for (t, _) in drops}
    consts = {t for t in touched if analysis.index.is_const(t)}
    edit = Edit(analysis, drops)
    proto = edit.bind(_copy_pruning_initializers(analysis.model.proto, edit, consts, values, spill))
    _prune_constant_nodes(proto, edit, consts, values)
    for node in proto.graph.node:
        fn = REWRITERS.get(rule_key(node))
        if fn and any(n in touched for n in list(node.input) + list(node.output)):
            fn(node, edit)
    _update_value_infos(proto, edit)
    retie_copies(proto)
    remove_dead(proto)
    model = analysis.model
    if model.weights_at and not keep_external:
        materialize_proto(proto, Path(model.path).parent)
    return proto


def retie_copies(proto: onnx.ModelProto) -> None:
    """Per-use copies of a uniform constant (spa.analysis.untie_uniform) that were pruned to
    the same shape read one initializer again, the original where it still fits."""
    graph = proto.graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    target: dict[tuple, str] = {}
    for name, dims in shapes.items():
        if COPY not in name:
            target.setdefault((name, dims), name)
    rename = {}
    for name, dims in shapes.items():
        if COPY in name:
            key = (name.split(COPY)[0], dims)
            rename[name] = target.setdefault(key, name)
    by_output = {n.output[0]: n for n in graph.node if n.output}
    for node in graph.node:  # per-sink shape copies (spa.analysis.untie_shapes) still equal to their original
        if node.output and COPY in node.output[0]:
            twin = by_output.get(node.output[0].split(COPY)[0])
            if twin is not None and _same_node(node, twin):
                rename[node.output[0]] = twin.output[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if rename.get(name, name) != name:
                node.input[i] = rename[name]


def _same_node(a: onnx.NodeProto, b: onnx.NodeProto) -> bool:
    return (a.op_type, a.domain, list(a.input), list(a.attribute)) == (b.op_type, b.domain, list(b.input), list(b.attribute))


class PrunePass(Pass):
    """plan (+ compensated consumer weights) -> the smaller model, verified (module docstring)."""

    name = "prune"

    def __init__(self, analysis, plan: dict, values: dict | None = None, check: bool = True, exact: bool = False,
                 seed: int = 0):
        self.analysis, self.plan, self.values = analysis, plan, values
        self.run_check, self.exact, self.seed = check or exact, exact, seed

    spill = None  # a lazily loaded model's new weights, in a temp file until saved (close() removes it)

    def rewrite(self, model) -> tuple[onnx.ModelProto, dict]:
        lazy = bool(self.analysis.model.weights_at)
        self.spill = Spill() if lazy else None
        proto = apply(self.analysis, self.plan, self.values, keep_external=lazy, spill=self.spill)  # checks the plan
        self.ports = kvcache.ports(self.analysis, dropped_positions(self.analysis, {g: c for g, c in self.plan.items()
                                                                                   if c}))
        return proto, {"channels_removed": sum(map(len, self.plan.values()))}

    def close(self) -> None:
        """Remove the temp file of spilled weights (after the result was saved or read back)."""
        if self.spill is not None:
            self.spill.close()

    def ensures(self, model, proto, file=None):
        check = super().ensures(model, proto, file)
        if self.exact and check and check.get("status") == "ok" and check["max_rel_err"] > ZEROS_TOL:
            raise VerificationError(f"removing the zero channels changed the outputs (max rel. error "
                                    f"{check['max_rel_err']:.2e} > {ZEROS_TOL:g}); nothing written")
        return check
