"""The pass contract every graph rewrite shares (prune, sparsify, quantize, simplify).

    requires(model)            what the input must be, else SpaError before any work
    rewrite(model) -> (proto, stats)
    ensures(model, proto, file) -> check doc; raises VerificationError when a promise breaks

`run` chains them: the rewrite is verified in memory, or, with `output=`, on the written temp
file before it is renamed into place (the only way over 2 GB), so nothing unverified is ever
left at `output`. The base promises are those of every pass: the ONNX checker passes (no worse
than on the input) and the result runs in ONNX Runtime with the input's output names, dtypes
and shapes, all finite. A pass adds its own (the N:M pattern re-read, outputs within a
tolerance) by extending `ensures`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from spa.core.checks import NOT_RUN, check_against, output_check, refuse_unrunnable
from spa.core.errors import SpaError
from spa.core.model import TWO_GB, Model, save, weight_bytes


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
        return output_check(model, proto, self.seed, pruned_file=file)

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

    def verify(self, model: Model, proto: onnx.ModelProto, *, stats: dict, output=None) -> PassResult:
        if output is None:
            if weight_bytes(proto) >= TWO_GB:
                raise SpaError(f"{self.name}: the result is over 2 GB and can only be verified from a file",
                               "pass output=PATH")
            return PassResult(proto, stats, self.ensures(model, proto))
        checked = {}

        def verify(tmp):
            checked["check"] = self.ensures(model, proto, tmp)

        path = save(proto, output, source=model.path, verify=verify)
        return PassResult(proto, stats, checked.get("check"), path)
