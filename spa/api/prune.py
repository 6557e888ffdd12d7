"""spa.prune: remove channels and hand back a smaller model, verified.

    model ─load─▶ (simplify) ─analyze─▶ groups ─statistics─▶ scores ─plan─▶ plan
          ─compensate (OBS)─▶ values ─PrunePass─▶ smaller model ─ensures─▶ Result

Two ways to call it:
- `spa.prune(model, ratio=0.5, ...)` (a path, ModelProto or spa.Model) runs the whole `spa prune`
  command and returns a Result whose `.to_json()` is what `spa prune --json` prints;
- `spa.prune(analysis, plan)` (an Analysis and a plan dict) is the single step: the plan applied,
  the ModelProto returned, checked by the ONNX checker.
"""

from __future__ import annotations

import inspect
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np

from spa.api import companions
from spa.api.common import arrays, saver
from spa.api.result import Result, as_model, counter, model_name, output_target, stepper
from spa.core import cost, kvcache, shapes
from spa.core.analysis import Analysis, analyze, unmatched
from spa.core.blocks import attention_blocks
from spa.core.checks import Gate, agreement_phrase, agreement_warning, check_against, check_max_loss, check_notes
from spa.core.data import bounded_batch, conform, samples_used, split_labels
from spa.core.errors import SpaError, UsageError, positive_int, require
from spa.core.model import (
    TWO_GB,
    Model,
    check_writable,
    materialize_proto,
    read_json,
    reinfer,
    weight_bytes,
    write_text_atomic,
)
from spa.core.runtime import random_feeds
from spa.core.sizes import file_bytes
from spa.passes import prune as prune_pass
from spa.passes.erase import erase_with_io
from spa.passes.simplify import simplify_model
from spa.planning import budget, latency, planner, sensitivity
from spa.planning.depth import BY, plan_erasure
from spa.planning.plan import allocate, make_plan, scores
from spa.reporting.report import why_nothing
from spa.scoring import criteria, obspa
from spa.scoring.depth import branch_means
from spa.scoring.gradients import require_torch
from spa.scoring.measure import compensation, saliency, statistics
from spa.scoring.obspa import NOT_COMPENSATED
from spa.training.train import zero_plan

SCHEMA = 1
SENSITIVITY_LOSS = 0.01  # with sensitivity= and no max_loss=: 1 - cosine allowed per group
WEIGHTS_ONLY = ("l1", "l2", "fpgm", "random", "bn-scale")  # criteria that see no data at all
TARGETS = ("target_params", "target_macs", "target_latency")
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
             "MatMulInteger", "DynamicQuantizeLinear", "QGemm", "QLinearAdd"}
DYNAMIC_OPS = ("ConvInteger", "DynamicQuantizeLinear", "MatMulInteger")  # onnxruntime's quantize_dynamic


def refuse_quantized(model: Model, action: str = "prune") -> None:
    """Refuse a model that is already quantized, saying how: QDQ (Q/DQ pairs around float layers),
    dynamically quantized (integer layers fed by DynamicQuantizeLinear) or integer layers."""
    found = [n for n in model.graph.node if n.op_type in QUANT_OPS]
    if not found:
        return
    kinds = sorted({n.op_type for n in found})
    dynamic = [k for k in kinds if k in DYNAMIC_OPS]
    what = f"dynamically quantized ({'/'.join(dynamic)})" if dynamic else f"quantized ({'/'.join(kinds)})"
    where = f"found {found[0].op_type} '{found[0].name or '#'}'"
    if action == "quantize":
        raise SpaError(f"cannot quantize an already quantized model: it is {what}, {where}", "quantize the float model")
    qdq = "" if dynamic else "; pruning quantized graphs is not supported yet"
    raise SpaError(f"cannot prune this model: it is {what}, {where}{qdq}", "prune the float model, then quantize it")


# long: the docstring is the reference of every option (the body is a dozen lines)
def prune(model, plan=None, *, ratio=None, target_params=None, target_macs=None, target_latency=None,
          zeros: bool = False, erase: int | str | None = None, erase_ratio: float | None = None,
          erase_by: str = "influence", criterion: str = "l1", calib=None, calib_samples: int = 512, labels=None,
          compensate=None,
          global_rank: bool = False, max_group_ratio: float = 0.9, round_to: int | None = None,
          prune_hidden: bool = False, freeze_io: bool = False,
          exclude=(), simplify: bool = False, sensitivity=None, max_loss: float | None = None, save_plan=None,
          seed: int = 0, shape=None, check: bool = True, output=None, progress=None, executor=None):
    """`spa prune` as a call, returning a Result (what `spa prune --json` prints; `.model`).

    `model`: a path, ModelProto or spa.Model. What to remove, exactly one of: `plan` (a plan dict,
    a plan document or a plan file), `ratio` (of each group's channels), `target_params` /
    `target_macs` / `target_latency` (keep at most this fraction of the params, MACs or ONNX Runtime
    CPU latency, removal allocated across groups by sensitivity: measured on `calib` or read from
    `sensitivity` when given, else estimated; stems, heads and narrow groups protected;
    docs/budget.md) or `zeros=True` (exactly the all-zero channels; the outputs must not change).
    Depth: `erase` (a count) or `erase_ratio` (of the erasable units) removes whole residual
    branches (spa.core.depth: a block, an attention or MLP sub-block), those of lowest block
    influence on `calib` (else on random inputs), alone or with one of the ways above; with a
    params/MACs target, `erase="auto"` searches how many (the target bounds the final model and
    the channels take what erasing left); a plan file's "erase" list names them (docs/depth.md).
    `erase_by="fidelity"` scores each unit by the output with it erased alone instead.
    `criterion` scores the channels (data
    criteria read `calib`: an .npz path or arrays keyed by input name, `calib_samples` of them;
    `labels`: the key of labels in `calib` for the gradient criteria). `compensate`: the OBS update
    of the consumers (default: on for obspa). `global_rank` (with `max_group_ratio`), `round_to` (pruned
    widths kept multiples of it; default None: with a target, SIMD_WIDTH in groups of ROUND_MIN
    channels or more, as ONNX Runtime's CPU convolutions want them, else 1),
    `prune_hidden`, `freeze_io` (a decoder's KV-cache inputs and outputs keep their shapes, which
    locks its KV heads and head size; by default they follow the pruning, and the genai_config.json /
    config.json beside the input are written beside the output with the new sizes: spa.api.companions),
    `exclude` (name globs), `simplify` (onnxslim first), `sensitivity` (a
    sensitivity document or file: each group pruned as far as its measured loss, 1 - cosine,
    stays within `max_loss`, 0.01 when not given; max_loss then bounds each group, not the result),
    `save_plan` (path), `seed`, `shape` (the input shapes MACs, targets and the output check use,
    e.g. {"x": (1, 3, 736, 736)}; default: the first sample of `calib`, else dynamic dims as 1),
    `check` (run the result in ONNX Runtime, and an LLM's greedy decode with its cache), `output` (written atomically, verified on the written
    file; a result over 2 GB written there is not also kept in memory: `.model` is None, load the file),
    `executor` (where a target's sensitivity trials run: spa.executor; default in-process).

    With `check`, the result's agreement with the input model is measured (spa.core.checks.Gate:
    on the first calibration samples of `calib`, else on random inputs) and, below
    AGREEMENT_WARN, warned about in the document's "warnings". `max_loss`: the most agreement it
    may lose, 1 - top-1 agreement for class-score outputs, else 1 - cosine, worst output; more
    is a VerificationError before anything is written.

    Given an Analysis and a plan instead, the single step: the plan applied and the ModelProto
    returned, passing the ONNX checker when `check` (over 2 GB only a written file can be checked:
    `check_against(path, original)`); `compensate` there is updated weights from `compensation`
    (or Stats, compensated in one shot)."""
    options = {k: v for k, v in locals().items() if k not in ("model", "plan", "check", "compensate")}
    if not isinstance(model, Analysis):
        o = {**options, "plan": plan, "check": check, "compensate": compensate}
        _check_options(o)
        return _searched_depth(model, o) if o["erase"] == "auto" else _Run(model, o).result()
    given = sorted(k for k, v in options.items() if v != DEFAULTS[k])
    require(not given, f"{', '.join(given)} go with a model, not an Analysis and a plan")
    if compensate is not None and not isinstance(compensate, dict):
        compensate = compensation(model, plan, stats=compensate)[0]
    proto = prune_pass.apply(model, plan, compensate)
    if check and weight_bytes(proto) < TWO_GB:
        check_against(proto, model.model.proto)
    return proto


def _check_options(o: dict) -> None:
    """Every bad value or combination fails here, before any slow work (UsageError, exit 2)."""
    ways = [k for k in ("ratio", "plan", *TARGETS) if o[k] is not None] + (["zeros"] if o["zeros"] else [])
    depth = [k for k in ("erase", "erase_ratio") if o[k] is not None]
    require(len(ways) == 1 or (not ways and depth), "give exactly one of ratio=, plan=, target_params=, target_macs=, "
            "target_latency=, zeros=True (or erase= or erase_ratio= alone)" + (f" (got {', '.join(ways)})" if ways else ""))
    require(len(depth) < 2, "give erase= (a count of units) or erase_ratio=, not both")
    require(o["erase_by"] in BY, f"invalid erase_by={o['erase_by']!r}", f"choose one of: {', '.join(BY)}")
    require(not (depth and (o["plan"] is not None or o["zeros"])),
            f"{depth[0] if depth else ''}= does not go with " + ("plan= (its 'erase' list names the units)"
                                                               if o["plan"] is not None else "zeros=True"))
    if o["erase"] == "auto":
        require(o["target_macs"] is not None or o["target_params"] is not None,
                "erase='auto' searches how many units to erase within a budget: give target_macs= or target_params=")
        require(o["check"], "erase='auto' compares its candidates by their agreement with the input: it needs check")
    elif o["erase"] is not None:
        require(isinstance(o["erase"], int) and not isinstance(o["erase"], bool) and o["erase"] >= 0,
                f"invalid erase={o['erase']}: a count of units (0 or more) or 'auto'")
    if o["erase_ratio"] is not None:
        planner.check_ratio(o["erase_ratio"], "erase_ratio")
    for k in TARGETS:
        if o[k] is not None:
            budget.check_keep(k[len("target_"):], o[k])
    if o["plan"] is None and not o["zeros"]:
        if o["ratio"] is not None:
            planner.check_ratio(o["ratio"])
        planner.check_ratio(o["max_group_ratio"], "max_group_ratio")
        if o["round_to"] is not None:
            positive_int("round_to", o["round_to"])
    require(not (o["sensitivity"] is not None and o["ratio"] is None and all(o[k] is None for k in TARGETS)),
            "sensitivity= goes with ratio= (the most any group is pruned) or a target (the groups' weights)")
    positive_int("calib_samples", o["calib_samples"])
    shapes.parse(o["shape"])
    check_max_loss(o["max_loss"], o["check"])
    require(isinstance(o["seed"], int) and o["seed"] >= 0, f"invalid seed={o['seed']}: it must be 0 or more")
    require(o["criterion"] in criteria.CRITERIA, f"unknown criterion={o['criterion']}",
            f"choose one of: {', '.join(sorted(criteria.CRITERIA))}")
    require(not (o["zeros"] and o["compensate"]),
            "zeros=True removes channels that carry nothing: there is nothing to compensate")
    need = criteria.NEEDS.get(o["criterion"])
    require(o["plan"] is not None or need not in ("calibration", "gradients") or o["calib"] is not None,
            f"criterion '{o['criterion']}' needs calibration data", "pass calib=DATA.npz"
            + (" (with labels=KEY when it holds labels)" if o["criterion"] in criteria.GRADIENT else ""))
    require(not (o["labels"] and o["calib"] is None), "labels= names a key of calib=", "pass calib=DATA.npz")


def _searched_depth(model, o: dict) -> Result:
    """erase="auto": one budget, both axes, the split searched. Erasing k = 0, 1, 2, ... units (by
    block influence), each with the channels planned to the same target, is measured (agreement
    with the input: on calib, else random inputs) until erasing alone meets the target or no unit
    is left; the best k is made (fewer units on a tie). Its document lists the trials (depth.auto)."""
    trials = []
    for k in itertools.count():
        trial = {**o, "erase": k, "output": None, "save_plan": None, "progress": None, "max_loss": None}
        try:
            doc = _Run(model, trial).result().to_json()
        except SpaError as exc:
            if k and "erasable units" in str(exc):
                break
            raise
        fit = doc.get("agreement") or {}
        trials.append({"erase": k, "agreement": fit.get("agreement"), "macs": doc["after"]["macs"],
                       "params": doc["after"]["params"]})
        if doc["depth"].get("channel_target") == 1.0:
            break
    best = max(trials, key=lambda t: (-1.0 if t["agreement"] is None else t["agreement"], -t["erase"]))
    result = _Run(model, {**o, "erase": best["erase"]}).result()
    result.doc["depth"]["auto"] = trials
    return result


# the command options and their defaults, read from prune's signature (an Analysis and a plan take none of them)
DEFAULTS = {name: p.default for name, p in inspect.signature(prune).parameters.items()
            if name not in ("model", "plan", "check", "compensate")}


prune_model = prune  # the command's name where `prune` alone would read as the single step


class _Run:
    """One `spa prune`: the steps in order, each a small method over the options `o`."""

    def __init__(self, source, o: dict):
        self.source, self.o, self.step = source, o, stepper(o["progress"])
        self.name = model_name(source)
        reads = (o["calib"], o["plan"], o["sensitivity"])
        self.out = output_target(o["output"], source, *reads)
        if o["save_plan"] is not None:
            check_writable(o["save_plan"], self.name, reads=reads)
            require(self.out is None or Path(o["save_plan"]).resolve() != self.out.resolve(),
                    f"save_plan= and output= both name '{self.out}'", "write the plan to another file")
        self.plan, self.erased = _read_plan(o["plan"]) if o["plan"] is not None else (None, [])
        self.calib = arrays(o["calib"])
        self.sens = sensitivity.read(o["sensitivity"]) if isinstance(o["sensitivity"], (str, Path)) \
            else o["sensitivity"]
        self.erase_compensate = bool(o["compensate"])  # compensate=True with calib=: an erased branch becomes its mean
        if o["compensate"] is None:
            o["compensate"] = self.plan is None and not o["zeros"] and o["criterion"] == "obspa"
        self.targeted = any(o[k] is not None for k in TARGETS)
        # the widths a budget leaves: whole blocks of ORT's CPU convolutions where a group is wide enough
        self.round_to, self.round_min = (o["round_to"], 0) if o["round_to"] is not None else \
            ((SIMD_WIDTH, ROUND_MIN) if self.targeted else (1, 0))

    def result(self) -> Result:
        self._load()
        self._choose()
        values, notes = self._compensation()
        told = _Told(self, values, notes)
        notes = told.notes() + self._exclude_notes() + self._width_notes()
        with self.step("pruning"):
            rewrite = prune_pass.PrunePass(self.analysis, self.plan, values, self.o["check"], self.o["zeros"],
                                           self.o["seed"])
            gated = self.o["max_loss"] if self.sens is None else None  # with sensitivity=: a bound per group
            rewrite.gate = Gate(self.calib, self.o["seed"], gated) if self.o["check"] else None
            pruned, _ = rewrite.rewrite(self.model)
            if self.io_erased:  # the checks feed and compare the cache by its new names
                rewrite.ports = {**(rewrite.ports or {}), kvcache.RENAMED: self.io_erased}
        blocks = attention_blocks(self.analysis, self.plan)
        io = kvcache.io_changes(self.analysis, rewrite.ports or {})
        counts = (len(self.analysis.groups), sum(g.prunable for g in self.analysis.groups),
                  cost.overlaps(self.analysis, self.plan), cost.estimate(self.analysis, self.plan))
        rewrite.analysis = self.analysis = None  # it holds the input's weights; the checks read its file
        if self.model.path is not None:
            self.model.drop_weights()
        with self.step("saving + checking" if self.o["check"] or self.o["zeros"] else "saving + ONNX checker"):
            # a result over 2 GB written to a file keeps no copy of its weights (result.model is None)
            lazy = bool(self.model.weights_at)  # its untouched weights are still the input file's
            big = self.out is not None and (weight_bytes(pruned) >= TWO_GB or lazy)
            if self.out is None and lazy:
                materialize_proto(pruned, Path(self.model.path).parent)
            try:
                done = rewrite.verify(self.model, pruned, stats={}, output=self.out, keep_weights=not big)
            finally:
                rewrite.close()
        if self.o["save_plan"] is not None:
            write_text_atomic(self.o["save_plan"], json.dumps(planner.to_json(self.plan, self.erased), indent=1))
        doc = self._doc(counts, pruned, done.check, blocks)
        doc["io_changed"] = io
        if self.depth is not None:
            doc["depth"] = self.depth
        doc["configs"] = self._configs(pruned, self.out)
        fit = (done.check or {}).get("agreement")
        doc.update(told.doc(), statistics=self._stats_doc(), agreement=fit,
                   notes=list(dict.fromkeys(notes + check_notes(done.check))),
                   warnings=agreement_warning(fit) or self._blind_warning(fit),
                   **shapes.record(self.model))
        return Result(doc, None if big else pruned, saver(rewrite, self.model, done), self.model.path,
                      after_save=lambda path: self._configs(pruned, path))

    def _configs(self, pruned, out) -> dict | None:
        """The runtime's config files beside `out`, and the GenAI generator run (spa.api.companions)."""
        if out is None or self.model.path is None:
            return None
        with self.step("configs + generator" if self.o["check"] else "configs"):
            doc = companions.write(self.model.path, out, pruned, before=self.llm_sizes)
            if doc and doc.get("written") and self.o["check"]:  # GenAI's generator runs a GenAI folder
                ran = companions.generator_check(self.model.path, out)
                if ran is not None:
                    doc["generator"] = ran
                else:
                    doc["decode"] = companions.decode_check(self.model.path, out)
        return doc

    def _load(self) -> None:
        with self.step("load + shape inference"):
            self.model = as_model(self.source, lazy=True)  # an LLM's weights stay in their file
        self.calib = conform(self.calib, self.model.proto, "calib=")
        shapes.bind(self.model, self.o["shape"], self.calib)
        self.model.refuse_overwrite(self.out, self.o["save_plan"])
        refuse_quantized(self.model)
        self.before = cost.summary(self.model)  # of the input, whatever the pre-pass does
        self.llm_sizes = companions.sizes(self.model.proto)
        loaded = self.model
        self.model, self.simplified = simplify_model(self.model, self.o["simplify"], self.step)
        if self.model is not loaded:
            shapes.copy_binding(loaded, self.model)
        self._erasure()
        with self.step("analysis"):  # of the erased model when units go: channels are pruned in what is left
            self.analysis = analyze(self._erased() if self.erased else self.model, exclude=list(self.o["exclude"]),
                                    freeze_io=self.o["freeze_io"])

    def _choose(self) -> None:
        """The plan: given, all-zero channels, or scored and planned."""
        self.stats = self.budget = None
        if self.o["zeros"]:
            self.plan = zero_plan(self.analysis)
        if self.plan is not None:
            return
        if all(self.o[k] is None for k in ("ratio", *TARGETS)) or (self.erased and 1.0 in (
                self.o["target_macs"], self.o["target_params"], self.o["target_latency"])):  # depth alone, or erasing met the budget
            self.plan = {}
            return
        if not any(g.prunable for g in self.analysis.groups) and (self.o["ratio"] is None or self.o["ratio"] > 0):
            raise SpaError(f"nothing to prune in '{self.name or '(in memory)'}': {why_nothing(self.analysis)}")
        self.stats = self._statistics()
        self.blind = obspa.unscored(self.analysis, self.stats) \
            if self.o["criterion"] == "obspa" and self.stats is not None and self.calib is None else {}
        scored = [g for g in self.analysis.groups if g.prunable]
        blind = f"; {len(self.blind)} of {len(scored)} groups without data-free statistics: l1" if self.blind else ""
        with self.step(f"scoring ({self.o['criterion']}{blind}) + planning"):
            self.plan = self._plan()

    def _erasure(self) -> None:
        """The units to erase (spa.planning.depth): a plan file's, or scored from erase/erase_ratio."""
        self.depth, self.units = plan_erasure(self.model, count=self.o["erase"], ratio=self.o["erase_ratio"],
                                              ids=self.erased, calib=self.calib, seed=self.o["seed"],
                                              freeze_io=self.o["freeze_io"], by=self.o["erase_by"], step=self.step)
        self.io_erased = {}
        self.erased = [u["id"] for u in self.depth["erased"]] if self.depth else []
        if self.erased and self.model.weights_at:
            raise SpaError("erasing units of a model whose weights stay in their file (over 1 GiB) is not supported "
                           "yet")

    def _erased(self) -> Model:
        """The model without the erased units (a copy; the input stays the reference of every check).
        A params/MACs target then bounds the final model: the channels' share is rescaled to what
        erasing left (one budget, both axes)."""
        proto = type(self.model.proto)()
        proto.CopyFrom(self.model.proto)
        means = None
        if self.calib is not None and self.erase_compensate:
            with self.step("branch means (calibration)"):
                means = branch_means(self.model, self.units, self.calib)
            adds = {n.output[0] for n in self.model.graph.node if n.op_type == "Add" and n.output}
            self.depth["compensated"] = sorted(u for u in means if u in adds)
        with self.step("erasing"):
            proto, self.io_erased = erase_with_io(proto, self.erased, means)
            erased = shapes.copy_binding(self.model, reinfer(proto))
        if self.io_erased:
            self.depth["cache"] = {"removed": sorted(k for k, v in self.io_erased.items() if v is None),
                                   "renamed": {k: v for k, v in self.io_erased.items() if v is not None}}
        left = cost.summary(erased)
        for kind in ("params", "macs"):
            key = f"target_{kind}"
            if self.o[key] is not None:
                self.depth["channel_target"] = min(1.0, self.o[key] * self.before[kind] / max(left[kind], 1))
                self.o[key] = self.depth["channel_target"]
        if self.o["target_latency"] is not None:  # measured: the erased model's latency over the input's
            feeds = {k: v[:1] for k, v in self.calib.items() if k in self.model.input_names} if self.calib else None
            with self.step("timing the erased model in ONNX Runtime (CPU, batch 1)"):
                self.depth["latency_ratio"] = latency.ratio(self.model.proto, erased.proto, feeds)
            self.depth["channel_target"] = min(1.0, self.o["target_latency"] / self.depth["latency_ratio"])
            self.o["target_latency"] = self.depth["channel_target"]
        return erased

    def _blind_warning(self, fit: dict | None) -> list[str]:
        """Without calib=, a result that agrees on random inputs is not known to do its job: said as
        a warning (random inputs can agree where real ones do not)."""
        if self.calib is not None or self.o["zeros"] or not any(self.plan.values()) or not fit \
                or fit.get("status") != "ok" or fit.get("inputs") != "random":
            return []
        line = (f"no data: the result was only compared with the input model on random inputs "
                f"({agreement_phrase(fit)}), which can agree where real inputs do not (the PP-OCR recognizer "
                f"pruned by l1 agrees 0.99 on random inputs and reads none of 200 lines); check it on real "
                f"inputs: pass calib=DATA.npz (it is then measured there), or `spa eval PRUNED --data DATA.npz "
                f"--reference MODEL`")
        return [line]

    def _width_notes(self) -> list[str]:
        odd = odd_widths(self.analysis, self.plan or {}, self.round_to)
        if not odd:
            return []
        line = (f"{odd} pruned convolution groups keep channel counts that are not multiples of {SIMD_WIDTH}; ONNX "
                f"Runtime's CPU convolutions can run such layers slower than the dense model's (PP-OCR direction "
                f"classifier: 1.5x slower at 0.8 of its MACs, 1.1x faster with round_to={SIMD_WIDTH}); pass "
                f"round_to={SIMD_WIDTH} when latency on CPU matters")
        return [line]

    def _exclude_notes(self) -> list[str]:
        return [f"exclude pattern '{pat}' matches no node or weight name: nothing was protected by it"
                for pat in unmatched(self.model, self.o["exclude"])]

    def _statistics(self):
        """Activation statistics when the criterion needs them, else None (compensation measures its
        own group by group with calib=, or derives them from the graph without)."""
        o, need = self.o, criteria.NEEDS.get(self.o["criterion"])
        if not need:
            return None
        if need == "gradients":
            return self._saliency()
        what = f"calibration, {samples_used(self.calib, o['calib_samples'])} samples" if self.calib is not None \
            else "data-free"
        with self.step(f"activation statistics ({what})"):
            return statistics(self.analysis, self.calib, max_samples=o["calib_samples"])

    def _saliency(self):
        o = self.o
        require_torch()
        feeds, labels = split_labels(self.calib, self.analysis.model.input_names, o["labels"])
        n = min(o["calib_samples"], len(next(iter(feeds.values()))))
        with self.step(f"gradients ({o['criterion']}, {n} samples)"):
            return saliency(self.analysis, o["criterion"], feeds, labels=labels, max_samples=o["calib_samples"])

    def _plan(self) -> dict:
        o, a = self.o, self.analysis
        if self.targeted:
            return self._budget()
        if self.sens is not None:
            limit = SENSITIVITY_LOSS if o["max_loss"] is None else o["max_loss"]
            ratios = sensitivity.protect(self.sens, o["ratio"], limit)
            return sensitivity.plan_with_ratios(a, scores(a, o["criterion"], o["seed"], stats=self.stats), ratios,
                                                round_to=self.round_to)
        return make_plan(a, o["ratio"], global_rank=o["global_rank"], **self._planning())

    def _planning(self) -> dict:
        """The options every planner takes (criterion, rounding, caps, seed, hidden, statistics)."""
        o = self.o
        return {"criterion": o["criterion"], "round_to": self.round_to, "max_group_ratio": o["max_group_ratio"],
                "seed": o["seed"], "prune_hidden": o["prune_hidden"], "stats": self.stats}

    def _budget(self) -> dict:
        """The plan for a params/MACs/latency target (spa.planning.budget), its explanation kept."""
        o, a = self.o, self.analysis
        sens = self.sens if self.sens is not None else self._sensitivity()
        shared = {**self._planning(), "sens": sens, "round_min": self.round_min}
        if o["target_latency"] is None:
            kind = "params" if o["target_params"] is not None else "macs"
            plan, self.budget = allocate(a, kind, o[f"target_{kind}"], **shared)
            return plan
        feeds = {k: v[:1] for k, v in self.calib.items() if k in a.model.input_names} if self.calib else None
        with self.step("timing in ONNX Runtime (CPU, batch 1)"):
            plan, self.budget = latency.plan_for_latency(a, o["target_latency"],
                                                         lambda t: allocate(a, "macs", t, **shared), feeds=feeds)
        return plan

    def _sensitivity(self):
        """Each candidate group pruned alone at budget.PROBE_RATIO (one trial each), on calib=, else
        on RANDOM_SENSITIVITY random inputs at the model's shape (a proxy, said in the document: on
        trained models it allocates far better than no measurement, docs/budget.md)."""
        o = self.o
        data = self.calib if self.calib is not None else random_inputs(self.model, RANDOM_SENSITIVITY, o["seed"],
                                                                        values=RANDOM_VALUES)
        groups = [g for g in self.analysis.groups if g.prunable and (o["prune_hidden"] or not g.hidden)]
        n = min(o["calib_samples"], sensitivity_samples(len(groups), self.before.get("macs")))
        what = f"{samples_used(data, n)} {'samples' if self.calib is not None else 'random inputs'}"
        with self.step(f"sensitivity (each group alone at ratio {budget.PROBE_RATIO:g}, {what})") as tick:
            try:
                sens = sensitivity.sensitivity(self.analysis, data, (budget.PROBE_RATIO,), criterion=o["criterion"],
                                               groups=groups, seed=o["seed"], max_samples=n, stats=self.stats,
                                               executor=o["executor"],
                                               batch_size=bounded_batch(data, SENSITIVITY_BATCH),
                                               progress=counter(tick, "groups"))
            except SpaError:
                if self.calib is not None:
                    raise
                return None  # random inputs the model cannot take (or NaN on them): estimated instead
        return sens if self.calib is not None else {**sens, "inputs": "random"}

    def _compensation(self):
        if not self.o["compensate"] or not self.plan:
            return None, []
        how = ", group by group)" if self.calib is not None else ", data-free)"
        with self.step("compensating the consumers (OBS" + how) as tick:
            return compensation(self.analysis, self.plan, self.calib, stats=self.stats,
                                max_samples=self.o["calib_samples"], progress=counter(tick, "groups"),
                                macs=self.before.get("macs"))

    def _stats_doc(self):
        if self.stats is None:
            return None
        doc = {"source": self.stats.source, "samples": self.stats.samples}
        if self.stats.source == "gradients":
            doc["labels"] = "data" if self.stats.labels else "own predictions"
        return doc

    def _doc(self, counts: tuple, pruned, check, blocks) -> dict:
        o, plan = self.o, self.plan
        before = {**self.before, "bytes": file_bytes(self.name) if self.name else self.model.proto.ByteSize()}
        # params and MACs from the analysed shapes cut by the plan: no second shape inference (on a
        # GenAI 1 B model that was a third of the run)
        after = {**counts[3], "bytes": file_bytes(self.out) if self.out is not None else pruned.ByteSize()}
        return {
            "schema_version": SCHEMA, "input": self.name, "output": None if self.out is None else str(self.out),
            "ratio": o["ratio"],
            "target": {k[len("target_"):]: o[k] for k in TARGETS if o[k] is not None} or None,
            "budget": self.budget,
            "plan_file": str(o["plan"]) if isinstance(o["plan"], (str, Path)) else None,
            "criterion": None if o["plan"] is not None or o["zeros"] else o["criterion"], "zeros": bool(o["zeros"]),
            "global": bool(o["global_rank"]), "round_to": self.round_to,
            "round_from": self.round_min or None, "groups": counts[0],
            "groups_prunable": counts[1],
            "groups_pruned": sum(1 for c in plan.values() if c), "prune_hidden": bool(o["prune_hidden"]),
            "channels_removed": int(sum(len(c) for c in plan.values())),
            "overlapping": counts[2], "before": before, "after": after,
            "check": check, "attention_blocks": [b.to_json() for b in blocks], "simplify": self.simplified,
        }


RANDOM_SENSITIVITY = 64  # random inputs a target's sensitivity is measured on without calib=, at most
RANDOM_VALUES = 2**20  # ... and about this many input values in all, at least 8 inputs (a 736x736 image: 8)
SENSITIVITY_BATCH = 16  # samples per run there (at 64, the PP-OCR detector's prune peaked at 2.5 GB, now 1.5)
SENSITIVITY_SAMPLES = 64  # calibration samples it is measured on, at most: a mean cosine over them is stable,
# and this step runs every sample through the whole model once per group (the PP-OCR recognizer: 4x faster than 256)
SENSITIVITY_MACS = 6e11  # ... and fewer on heavy models, down to SENSITIVITY_MIN: its runs stay under about this
SENSITIVITY_MIN = 16  # many MACs in all (the PP-OCR recognizer at 48x320, 27 groups: 31 samples, same allocation)


def sensitivity_samples(groups: int, macs) -> int:
    """Samples for a target's sensitivity step of `groups` trials on a model of `macs` per sample."""
    if not macs or groups < 1:
        return SENSITIVITY_SAMPLES
    return int(min(SENSITIVITY_SAMPLES, max(SENSITIVITY_MIN, SENSITIVITY_MACS // (groups * macs))))


def random_inputs(model, n: int, seed: int = 0, *, values: int | None = None) -> dict:
    """`n` random samples of every real input at the model's bound shapes (floats standard normal,
    integers 0 or 1; spa.core.runtime.random_feeds), stacked along the first axis; `values`: fewer
    samples (not under 8) where `n` of them would hold more input values than that."""
    first = random_feeds(model.proto, seed=seed, shapes=model.input_shapes)
    if values is not None:
        n = max(min(n, values // max(sum(np.size(v) for v in first.values()), 1)), min(n, 8))
    feeds = [first] + [random_feeds(model.proto, seed=seed + k, shapes=model.input_shapes) for k in range(1, n)]
    return {name: np.concatenate([f[name] for f in feeds]) if np.ndim(feeds[0][name]) else feeds[0][name]
            for name in feeds[0]}


SIMD_WIDTH = 8  # channel counts ONNX Runtime's blocked CPU convolutions want (NCHWc blocks of 8 on AVX2)
ROUND_MIN = 4 * SIMD_WIDTH  # a target's default rounding applies to groups this wide (narrower: too coarse a step)


def odd_widths(analysis, plan: dict, round_to: int) -> int:
    """How many pruned groups feeding a Conv keep a channel count that is not a multiple of
    SIMD_WIDTH (0 when round_to already is one)."""
    if round_to % SIMD_WIDTH == 0:
        return 0
    return sum(1 for gid, drop in plan.items() if drop and (analysis.group(gid).size - len(drop)) % SIMD_WIDTH
               and any(c.op_type == "Conv" for m in analysis.group(gid).members
                       for c in analysis.index.consumers.get(m.tensor, ())))


class _Told:
    """What a run says about how it scored and compensated: the per-group fallbacks of its
    criterion (groups it had no statistics for, scored by l1) and its compensation, summed up in
    one line instead of one note per group; and, for a criterion that reads only the weights,
    one note that it knows nothing of the data."""

    def __init__(self, run: _Run, values: dict | None, notes: list):
        self.o, self.plan = run.o, run.plan
        pruned = [gid for gid, c in self.plan.items() if c]
        self.scored = [g.id for g in run.analysis.groups if g.prunable] if run.stats is not None else []
        self.fell_back = [gid for gid in getattr(run.stats, "fell_back", []) if gid in self.scored]
        readers = {gid: {m.tensor for m in run.analysis.group(gid).members if m.role == "in"} for gid in pruned}
        self.compensated = [gid for gid in pruned if values is not None and readers[gid] & set(values)]
        self.pruned = pruned
        self.other = [n for n in (run.stats.notes if run.stats else []) + notes
                      if n not in getattr(run.stats, "fallback_notes", ()) and not n.endswith(NOT_COMPENSATED)]
        self.values = values
        self.blind = getattr(run, "blind", {})

    def notes(self) -> list[str]:
        o, lines = self.o, []
        if self.plan and o["plan"] is None and not o["zeros"] and o["criterion"] in WEIGHTS_ONLY:
            lines.append(f"criterion '{o['criterion']}' sees only the weights, not what the model does on data: on a "
                         "real trained model, check the result on data (calib=), or use criterion=obspa with "
                         "calib=DATA.npz")
        if self.fell_back or (self.values is not None and len(self.compensated) < len(self.pruned)):
            data = "with" if self.o["calib"] is not None else "without"
            line = (f"{o['criterion']} {data} calibration data: {len(self.fell_back)} of {len(self.scored)} groups had "
                    "no statistics to use and were scored by l1")
            if self.blind:
                ops = Counter(op for gid in self.fell_back for op in self.blind.get(gid, ()))
                line += (" (their consumers read outputs of " + ", ".join(f"{op} x{n}" for op, n in ops.most_common())
                         + ", which the graph alone gives no statistics for)")
            if self.values is not None:
                line += f"; {len(self.compensated)} of {len(self.pruned)} pruned groups compensated"
            if self.blind:
                line += "; with calib=DATA.npz their statistics are measured, and every group is scored and compensated"
            lines.append(line)
        return lines + self.other

    def doc(self) -> dict:
        return {"compensated": bool(self.compensated), "compensated_groups": len(self.compensated),
                "fell_back": self.fell_back}


def _read_plan(plan) -> tuple[dict, list]:
    """(plan dict {group id: channels}, unit ids to erase) of a plan dict, a plan document, or a
    plan file's path."""
    if isinstance(plan, (str, Path)):
        doc = read_json(plan, "plan")
        return planner.from_json(doc), planner.erase_from(doc)
    if isinstance(plan, dict) and "schema_version" in plan:
        return planner.from_json(plan), planner.erase_from(plan)
    if isinstance(plan, dict):
        return {str(k): [int(c) for c in v] for k, v in plan.items()}, []
    raise UsageError(f"invalid plan={type(plan).__name__}: expected a plan dict, a plan document or a file path")
