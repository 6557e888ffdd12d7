"""The pass contract every graph rewrite shares (prune, sparsify, quantize, simplify).

    requires(model)            what the input must be, else SpaError before any work
    rewrite(model) -> (proto, stats)
    ensures(model, proto, file) -> check doc; raises VerificationError when a promise breaks

`run` chains them: the rewrite is verified in memory, or, with `output=`, on the written temp
file before it is renamed into place (the only way over 2 GB), so nothing unverified is ever
left at `output`. The base promises are those of every pass: the ONNX checker passes (no worse
than on the input) and the result runs in ONNX Runtime with the input's output names, dtypes
and shapes, all finite. A pass adds its own (the N:M pattern re-read, outputs within a
tolerance) by extending `ensures`. A pass given a `gate` (spa.core.checks.Gate) also measures
its result's agreement with the input on calibration (else random) inputs, recorded in the
check document as "agreement", and fails when it lost more than the gate's max_loss. Before
any of that, `verify` refuses a rewrite that made a weight or scale non-finite
(`require_finite_weights`): nothing with a new NaN or inf is written.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from spa.core.checks import NOT_RUN, check_against, output_check, refuse_unrunnable
from spa.core.errors import SpaError, VerificationError
from spa.core.model import TWO_GB, Model, save, weight_bytes
from spa.core.runtime import release
from spa.core.sizes import FLOAT_TYPES
from spa.core.tensors import reads


@dataclass
class PassResult:
    """What a pass hands back: the rewritten model, its stats, and the output check."""

    model: onnx.ModelProto
    stats: dict = field(default_factory=dict)
    check: dict | None = None
    output: Path | None = None


class Pass:
    """Subclasses set `name` and implement `rewrite`; `requires`/`ensures` extend the defaults."""

    name = "pass"
    run_check = True  # run the result in ONNX Runtime against the input (else the checker only)
    seed = 0  # random inputs of the output check
    gate = None  # a spa.core.checks.Gate: the agreement with the input measured (and bounded) too
    ports = None  # graph inputs/outputs whose axes the rewrite shrank (a KV cache): {name: {axis: kept}}

    def requires(self, model: Model) -> None:
        """Raise SpaError when `model` is not something this pass can rewrite."""

    def rewrite(self, model: Model) -> tuple[onnx.ModelProto, dict]:
        raise NotImplementedError

    def ensures(self, model: Model, proto: onnx.ModelProto, file: Path | None = None) -> dict | None:
        """The promises every pass keeps, checked on `file` when written, else on `proto`."""
        candidate = file if file is not None else proto
        check_against(candidate, model.path if model.path is not None else model.proto)
        if not self.run_check:
            return dict(NOT_RUN)
        try:
            check = output_check(model, proto, self.seed, pruned_file=file, ports=self.ports)
            if self.gate is not None:
                check["agreement"] = self.gate.measure(model, candidate, self.ports)
        finally:
            release(small=False)  # the checks' kept session, unless small: the decode check runs them again
        return check

    def run(self, model: Model, output=None, *, step=None, what: str | None = None) -> PassResult:
        """requires -> rewrite -> ensures (on the written file when `output` is given); `step(name)`:
        the caller's progress context around the rewrite (named `what`) and around the checks."""
        step = step or (lambda name: contextlib.nullcontext())
        self.requires(model)
        with step(what or self.name):
            try:
                proto, stats = self.rewrite(model)
            except SpaError:
                if self.run_check:  # a rewrite that runs the model fails on an input ONNX Runtime cannot run
                    refuse_unrunnable(model)
                raise
        with step("saving + checking" if output is not None else "checking"):
            return self.verify(model, proto, stats=stats, output=output)

    def verify(self, model: Model, proto: onnx.ModelProto, *, stats: dict, output=None,
               keep_weights: bool = True) -> PassResult:
        """The promises checked on `proto` (written to `output` first when given, renamed into place
        only when they hold); a weight or scale the rewrite made non-finite is refused first."""
        require_finite_weights(model, proto, self.name)
        if output is None:
            if weight_bytes(proto) >= TWO_GB:
                raise SpaError(f"{self.name}: the result is over 2 GB and can only be verified from a file",
                               "pass output=PATH")
            return PassResult(proto, stats, self.ensures(model, proto))
        checked = {}

        def verify(tmp):
            checked["check"] = self.ensures(model, proto, tmp)

        path = save(proto, output, source=model.path, verify=verify, keep_weights=keep_weights)
        return PassResult(proto, stats, checked.get("check"), path)




def require_finite_weights(model: Model, after: onnx.ModelProto, name: str) -> None:
    """VerificationError naming the first float initializer of `after` holding NaN or inf where
    the input `model` had none (or no such tensor): a pass never writes a non-finite weight or
    scale. Tensors already non-finite in the input (a -inf mask) and weights kept outside the
    file are left as they are."""
    for t in after.graph.initializer:
        if t.data_type not in FLOAT_TYPES or t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        finite = np.isfinite(_values(t))  # each weight decoded once
        if finite.all() or _was_non_finite(model, t.name):
            continue
        bad = int(finite.size - finite.sum())
        raise VerificationError(f"{name}: the result's tensor '{t.name}' holds {bad} non-finite value(s) (NaN or inf) "
                                "that the input did not; nothing written",
                                "check the calibration or training data (value ranges) and the options")


def _was_non_finite(model: Model, name: str) -> bool:
    """Whether the input's initializer `name` holds NaN or inf; read from the input's file when
    its data was freed (`Model.drop_weights`): a rare path, taken only for a non-finite result."""
    old = next((t for t in model.proto.graph.initializer if t.name == name), None)
    if old is not None and not _has_data(old) and model.path is not None:
        old = next((t for t in onnx.load(str(model.path)).graph.initializer if t.name == name), None)
    return old is not None and old.data_location != onnx.TensorProto.EXTERNAL and _has_data(old) and not _finite(old)


def _has_data(t: onnx.TensorProto) -> bool:
    return bool(t.raw_data) or any(len(getattr(t, f)) for f in ("float_data", "double_data", "int32_data"))


def _values(t: onnx.TensorProto) -> np.ndarray:
    a = numpy_helper.to_array(t)
    return a if a.dtype.kind == "f" else a.astype(np.float32)  # bfloat16 as an extension type


def _finite(t: onnx.TensorProto) -> bool:
    return bool(np.isfinite(_values(t)).all())


def remove_dead(proto: onnx.ModelProto) -> int:
    """Remove nodes whose outputs nobody reads and initializers nobody uses. Returns count."""
    graph = proto.graph
    removed = 0
    while True:
        used = {o.name for o in graph.output} | reads(graph)
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
        removed += len(dead)
    used = reads(graph) | {o.name for o in graph.output}
    inputs = {i.name for i in graph.input}
    for t in [t for t in graph.initializer if t.name not in used and t.name not in inputs]:
        graph.initializer.remove(t)
    return removed
