"""spa.compress: prune -> sparsify -> quantize as one pipeline of API calls, each stage verified.

    model ─spa.prune─▶ stage 1 ─spa.sparsify─▶ stage 2 ─spa.quantize─▶ stage 3 ─▶ output
          each stage is the single call with its own checks (ONNX checker, ONNX Runtime on random
          inputs, the N:M pattern re-read from the written file), then measured against the input
          on calibration samples (and on `eval` data): size, parameters, fidelity, accuracy

Stages are written in a temporary folder (beside `output`); `output` is written only when every
stage passed (`save_stages` keeps OUT.<stage>.onnx too, written with OUT and only then: a failed
run leaves no file). Defaults follow the data: with `calib`
the pruning criterion is obspa (compensated) and the N:M selection is obs (SparseGPT-style), the
best data-aware choices we measured (docs/benchmarks.md); without it l1 and magnitude.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from onnx import numpy_helper

from spa.api.common import arrays, require_files
from spa.api.prune import prune_model
from spa.api.quantize import quantize
from spa.api.result import Result, as_model, model_name, output_target, stepper
from spa.api.sparsify import sparsify
from spa.api.train import finetune
from spa.core import shapes
from spa.core.data import conform
from spa.core.errors import SpaError, UsageError, positive_int, require
from spa.core.model import check_writable, load, save, sweep_stale, tmp_prefix
from spa.core.runtime import ort_reason
from spa.core.sizes import file_bytes
from spa.passes.quantize import TARGETS
from spa.passes.sparsify import parse_pattern
from spa.planning import planner
from spa.scoring import criteria
from spa.scoring.evaluate import evaluate_arrays

SCHEMA = 1
FIDELITY_SAMPLES = 64
QUANT_METHODS = ("minmax", "entropy", "percentile")


def compress(model, *, ratio: float = 0.0, criterion=None, global_rank: bool = False, prune_hidden: bool = False,
             sparsify=None, sparsify_method=None, permute: bool = False, min_size: int = 16, int8: bool = False,
             fp16: bool = False, calib=None, calib_samples=None, quant_method: str = "minmax", target: str = "ort-cpu",
             eval=None,
             labels=None, distill_epochs: int = 0, save_stages: bool = False, shape=None, check: bool = True,
             output=None, progress=None) -> Result:
    """Prune `ratio` of each group (`criterion`, `global_rank`, `prune_hidden`), then N:M `sparsify`
    (e.g. "2:4"; `sparsify_method`, `permute`, `min_size`), with `distill_epochs` first recovering
    the pruned model by distillation from the input on `calib` (unlabeled; the torch extra), then `int8` (needs `calib`;
    `quant_method`; Q/DQ placed for `target`'s runtime, see spa.quantize) or `fp16`; every stage measured on `calib` and on `eval` (with `labels`: the
    key of its labels, for accuracy). `calib_samples`: per stage (default: each call's own).
    `output`: the final model's path (None: kept in memory, `.model`). `check=False`: the stages are
    not run in ONNX Runtime against their inputs (the ONNX checker only). `shape`: the input shapes
    every stage costs and checks at ({"x": (1, 3, 736, 736)}; default: the first sample of `calib`).
    With `sparsify`, pruned widths are kept multiples of its M (`round_to`), so pruned layers stay
    eligible for N:M."""
    options = {"ratio": ratio, "criterion": criterion, "global_rank": global_rank, "prune_hidden": prune_hidden,
               "sparsify": sparsify, "sparsify_method": sparsify_method, "permute": permute, "min_size": min_size,
               "int8": int8, "fp16": fp16, "calib": calib, "calib_samples": calib_samples,
               "quant_method": quant_method, "target": target, "eval": eval, "labels": labels,
               "distill_epochs": distill_epochs, "save_stages": save_stages,
               "shape": shape, "check": check}
    _check(model, options)
    return _Pipeline(model, options, output_target(output, model, calib, eval), stepper(progress)).run()


def _check(model, o: dict) -> None:
    """Every bad value or combination, before any slow work."""
    require_files(model)
    planner.check_ratio(o["ratio"])
    if o["sparsify"]:
        parse_pattern(o["sparsify"], "sparsify")
    require(o["sparsify"] or not (o["sparsify_method"] or o["permute"]),
            "sparsify_method= and permute= go with sparsify=N:M")
    require(o["ratio"] > 0 or o["sparsify"] or o["int8"] or o["fp16"], "nothing to do",
            "give ratio=R, sparsify=N:M, int8=True or fp16=True")
    require(not (o["int8"] and o["fp16"]), "int8= and fp16= exclude each other")
    require(o["criterion"] is None or o["criterion"] in criteria.CRITERIA, f"unknown criterion '{o['criterion']}'",
            f"choose one of: {', '.join(criteria.CRITERIA)}")
    require(o["sparsify_method"] in (None, "magnitude", "obs"), f"invalid sparsify_method={o['sparsify_method']}",
            "choose magnitude or obs")
    require(o["quant_method"] in QUANT_METHODS, f"invalid quant_method={o['quant_method']}",
            f"choose one of: {', '.join(QUANT_METHODS)}")
    require(o["target"] in TARGETS, f"invalid target={o['target']!r}", f"choose one of: {', '.join(TARGETS)}")
    needs = criteria.NEEDS.get(o["criterion"] or "l1") in ("calibration", "gradients")
    if o["calib"] is None and (o["int8"] or o["sparsify_method"] == "obs" or (o["ratio"] > 0 and needs)):
        what = "int8=True" if o["int8"] else ("sparsify_method=obs" if o["sparsify_method"] == "obs"
                                              else f"criterion '{o['criterion']}'")
        raise UsageError(f"{what} needs calibration data", "pass calib=DATA.npz")
    require(not (o["labels"] and o["eval"] is None), "labels= names a key of eval=", "pass eval=DATA.npz")
    if o["calib_samples"] is not None:
        positive_int("calib_samples", o["calib_samples"])
    positive_int("min_size", o["min_size"])
    shapes.parse(o["shape"])
    require(isinstance(o["distill_epochs"], int) and o["distill_epochs"] >= 0,
            f"invalid distill_epochs={o['distill_epochs']}: it must be 0 or more")
    if o["distill_epochs"]:
        require(o["ratio"] > 0, "distill_epochs= recovers a pruned model: it goes with ratio=R")
        require(o["calib"] is not None, "distill_epochs= trains on unlabeled inputs", "pass calib=DATA.npz")


class _Pipeline:
    """The stages in order over the options `o`, in a work folder removed at the end."""

    def __init__(self, model, o: dict, out: Path | None, step):
        self.model, self.o, self.out, self.step = model, o, out, step
        self.calib, self.held_out = arrays(o["calib"]), arrays(o["eval"], "eval")
        self.shape, self.shape_from, self.src = None, "model", None  # set by run(); _calls() names stages before

    def run(self) -> Result:
        with self.step("load + shape inference"):
            source = as_model(self.model, infer=False)
        source.refuse_overwrite(self.out)
        for kept in self._kept_paths():  # the stage files too, before any work
            check_writable(kept, source.path, reads=(self.o["calib"], self.o["eval"]))
        self.calib = conform(self.calib, source.proto, "calib=")
        self.held_out = conform(self.held_out, source.proto, "eval=")
        self.shape, self.shape_from = shapes.choose(source.proto, self.o["shape"], self.calib)
        parent = self.out.parent if self.out is not None else None
        sweep_stale(parent if parent is not None else Path(tempfile.gettempdir()))
        work = Path(tempfile.mkdtemp(prefix=tmp_prefix("compress"), dir=parent))
        try:
            src = self.src = self._input_file(source, work)
            with self.step("input: measuring"):
                rows = [{"stage": "input", "file": model_name(self.model), **self._measure(src, src)}]
            final = self._stages(src, work, rows)
            proto = load(final, infer=False).proto
            if self.out is not None:
                with self.step("saving"):
                    self._write(proto, rows, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for row in rows[1:] if not (self.o["save_stages"] and self.out is not None) else []:
            row["file"] = None
        rows[-1]["file"] = None if self.out is None else str(self.out)
        doc = {"schema_version": SCHEMA, "input": model_name(self.model),
               "output": None if self.out is None else str(self.out), "stages": rows,
               "input_shapes": None if self.shape is None else {k: list(v) for k, v in self.shape.items()},
               "input_shapes_from": self.shape_from}
        return Result(doc, proto, None, source.path)

    def _input_file(self, source, work: Path) -> Path:
        """The input as a file: its own, or (in memory) written into the work folder."""
        if source.path is not None:
            return Path(source.path)
        return save(source.proto, work / "0.input.onnx")

    def _stages(self, src: Path, work: Path, rows: list) -> Path:
        current = src
        for k, (name, call) in enumerate(self._calls(), 1):
            target = work / f"{k}.{name}.onnx"
            with self.step(f"stage {k}: {name}"):
                try:
                    detail = call(str(current), target).to_json()
                except SpaError as exc:
                    raise type(exc)(f"stage '{name}' failed: {exc.message}; nothing written", exc.hint) from exc
                rows.append({"stage": name, "file": str(target), **self._measure(target, src),
                             "detail": _summary(name, detail),
                             "check": _check_summary(detail["check"]) if "check" in detail else
                             {"status": "written back", "max_rel_err": detail["write_back_max_rel_err"]}})
            current = target
        return current

    def _calls(self) -> list:
        """(stage name, call(input file, output file) -> Result) for each requested stage."""
        o, calib = self.o, self.calib
        samples = {} if o["calib_samples"] is None else {"calib_samples": o["calib_samples"]}
        at = {"shape": self.shape}  # every stage costs and checks at the pipeline's input shapes
        calls = []
        if o["ratio"] > 0:
            criterion = o["criterion"] or ("obspa" if calib is not None else "l1")
            data = dict(calib=calib, **samples) if criterion in criteria.NEEDS and calib is not None else {}
            calls.append(("pruned", lambda i, t: prune_model(
                i, ratio=o["ratio"], criterion=criterion, global_rank=o["global_rank"], round_to=self.round_to(),
                prune_hidden=o["prune_hidden"], check=o["check"], output=t, **data, **at)))
        if o["distill_epochs"]:
            calls.append(("distilled", lambda i, t: finetune(i, data=calib, distill_from=str(self.src),
                                                             epochs=o["distill_epochs"], output=t)))
        if o["sparsify"]:
            method = o["sparsify_method"] or ("obs" if calib is not None else "magnitude")
            data = dict(calib=calib, **samples) if method == "obs" else {}
            calls.append(("sparse", lambda i, t: sparsify(i, pattern=o["sparsify"], method=method,
                                                           min_size=o["min_size"], permute=o["permute"],
                                                           check=o["check"], output=t, **data, **at)))
        if o["int8"]:
            calls.append(("int8", lambda i, t: quantize(i, calib=calib, method=o["quant_method"], target=o["target"],
                                                        output=t, check=o["check"], **samples, **at)))
        elif o["fp16"]:
            calls.append(("fp16", lambda i, t: quantize(i, fp16=True, check=o["check"], output=t, **at)))
        return calls

    def round_to(self) -> int:
        """The multiple pruned widths keep: M of a later N:M stage (its layers' reduction sizes must
        be multiples of M, else they are not eligible), else 1."""
        return parse_pattern(self.o["sparsify"], "sparsify")[1] if self.o["sparsify"] else 1

    def _kept_paths(self) -> list[Path]:
        """OUT.<stage>.onnx for every stage `save_stages` keeps (none without it or an output)."""
        if not self.o["save_stages"] or self.out is None:
            return []
        return [self.out.with_name(f"{self.out.stem}.{name}.onnx") for name, _ in self._calls()]

    def _write(self, proto, rows: list, work: Path) -> None:
        """OUT (and with `save_stages` every stage file) written in the work folder first, then
        renamed into place together, OUT last: a failed write leaves none of them behind."""
        ready = work / "ready"
        ready.mkdir()
        kept = self._kept_paths()
        moves = [(save(load(Path(row["file"]), infer=False).proto, ready / path.name), path)
                 for row, path in zip(rows[1:], kept)]
        moves.append((save(proto, ready / self.out.name), self.out))
        done: list[Path] = []
        try:
            for tmp, path in moves:
                for suffix in (".data", ""):  # a >2 GB model's weights first, then the graph naming them
                    if Path(str(tmp) + suffix).exists():
                        os.replace(str(tmp) + suffix, str(path) + suffix)
                        done.append(Path(str(path) + suffix))
        except OSError as exc:
            for path in done:
                path.unlink(missing_ok=True)
            raise SpaError(f"cannot write '{path}': {exc.strerror or exc}; nothing written") from None
        for row, path in zip(rows[1:], kept):
            row["file"] = str(path)

    def _measure(self, path: Path, source: Path) -> dict:
        """Size and weights of a stage's file, and its fidelity to the input (and accuracy) on the
        data; a measurement ORT cannot make on the calibration data is recorded, the pipeline goes on."""
        params, nonzero = _params(load(path, infer=False))
        doc = {"bytes": file_bytes(path), "params": params, "nonzero": nonzero}
        for key, data, lab, limit in (("calib", self.calib, None, FIDELITY_SAMPLES),
                                      ("eval", self.held_out, self.o["labels"], None)):
            if data is not None:
                doc[key] = _fidelity_on(path, source, data, lab, limit, strict=key == "eval")
        return doc


def _fidelity_on(path: Path, source: Path, data: dict, labels, limit, strict: bool) -> dict:
    """Cosine / relative error against the input (and accuracy with `labels`) on `data`. `strict`:
    the user's own evaluation data must fit the model (else the error is raised)."""
    try:
        rep = evaluate_arrays(path, data, labels, reference=str(source), max_samples=limit)
    except SpaError as exc:
        if strict:
            raise
        return {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - ORT cannot run the data: say so, go on
        return {"error": ort_reason(exc)}
    fid = rep.get("fidelity") or {}
    doc = {"samples": rep["samples"], "cosine": min((f["cosine"] for f in fid.values()), default=None),
           "rel_err": max((f["rel_err"] for f in fid.values()), default=None)}
    if "accuracy" in rep:
        doc["accuracy"] = rep["accuracy"]
    return doc


def _check_summary(check: dict) -> dict:
    """A stage's output check without the per-output details."""
    return {k: v for k, v in check.items() if k != "outputs"}


def _params(model) -> tuple[int, int]:
    """(weights, non-zero weights): elements of the numeric initializers of more than one value,
    Q/DQ scales and zero points left out, so a quantized stage counts the same weights."""
    qparams = {i for n in model.proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
               for i in n.input[1:]}
    total = nonzero = 0
    for t in model.proto.graph.initializer:
        if t.name in qparams or int(np.prod(t.dims)) <= 1 or t.data_type not in (1, 2, 3, 10, 11, 16):
            continue
        a = numpy_helper.to_array(t)
        total += a.size
        nonzero += int(np.count_nonzero(a))
    return total, nonzero


def _summary(name: str, detail: dict) -> dict:
    """The few numbers of a stage's own document that the summary shows."""
    if name == "pruned":
        return {"criterion": detail["criterion"], "ratio": detail["ratio"], "channels_removed": detail["channels_removed"],
                "macs_before": detail["before"].get("macs"), "macs_after": detail["after"].get("macs"),
                "round_to": detail["round_to"], "agreement": detail["agreement"], "warnings": detail["warnings"]}
    if name == "distilled":
        return {"epochs": detail["epochs"], "best_epoch": detail["best_epoch"], "metric": detail["metric"],
                "best": detail["best"], "distilled": detail["distilled"]}
    if name == "sparse":
        return {"pattern": detail["pattern"], "method": detail["method"], "eligible": detail["eligible"],
                "layers": len(detail["layers"]), "retained_magnitude": detail["retained_magnitude"],
                "permuted_groups": sum(r["permuted"] for r in detail["permutation"] or []),
                "agreement": detail["agreement"], "warnings": detail["warnings"]}
    return {"coverage": detail.get("coverage"), "target": detail.get("target"), "mode": detail.get("mode"),
            "fused_kernels": detail.get("fused_kernels"), "fallback": detail.get("fallback"),
            "fidelity_on_calib": detail.get("fidelity_on_calib"), "agreement": detail.get("agreement"),
            "warnings": detail.get("warnings") or []}
