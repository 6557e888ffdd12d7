"""spa.analyze: the channel groups of a model, and what a plan would do to its attention blocks.

    model ─load─▶ (simplify) ─analyze─▶ Analysis (groups, barriers) + params, MACs, N:M and QDQ
    coverage, attention blocks (before -> after a previewed ratio or plan)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from spa.api.result import as_model, stepper
from spa.core import cost, depth, shapes
from spa.core.analysis import Analysis
from spa.core.analysis import analyze as group_channels
from spa.core.blocks import attention_blocks
from spa.core.data import conform, load_npz
from spa.core.model import read_json
from spa.passes import quantize, sparsify
from spa.passes.prune import check_plan
from spa.passes.simplify import simplify_model
from spa.planning import planner
from spa.planning.plan import make_plan
from spa.scoring import criteria
from spa.scoring.measure import statistics

SCHEMA = 1


@dataclass
class AnalysisResult(Analysis):
    """An Analysis (use it wherever one is expected) whose `.to_json()` is `spa analyze --json`'s
    document, built when asked for: params, MACs, groups, barriers, attention blocks (before ->
    after the previewed plan), N:M sparsity and quantization coverage, simplify stats, preview."""

    simplified: dict | None = None
    plan: dict | None = None
    preview: dict | None = None
    freeze_io: bool = False  # as analyze(freeze_io=): a decoder's attention then erases no KV cache

    @property
    def blocks(self) -> list:
        return attention_blocks(self, self.plan)

    @property
    def units(self) -> tuple[list, list]:
        """(erasable units, rejected candidates) of the model (spa.core.depth.find), found once."""
        if getattr(self, "_units", None) is None:
            self._units = depth.find(self.model, freeze_io=self.freeze_io)
        return self._units

    def to_json(self) -> dict:
        c = cost.summary(self.model)
        doc = {"schema_version": SCHEMA, "model": str(self.model.path) if self.model.path else None,
               "params": c["params"], "macs": c["macs"], **shapes.record(self.model), **super().to_json(),
               "attention_blocks": [b.to_json() for b in self.blocks], "simplify": self.simplified,
               "erasable": [u.to_json() for u in self.units[0]], "not_erasable": self.units[1],
               "sparsity": sparsify.report(self.model.proto, base=self._weights_folder()),
               "quantization": quantize.coverage(self.model.proto)}
        if self.preview is not None:
            doc["preview"] = self.preview
        return doc

    def _weights_folder(self) -> str:
        """Where a lazily loaded model's weights are read from (its file's folder), else ""."""
        return str(Path(self.model.path).parent) if self.model.weights_at else ""


def analyze(model, exclude=None, *, simplify: bool = False, ratio=None, plan=None, criterion: str = "l1",
            prune_hidden: bool = False, freeze_io: bool = False, calib=None, seed: int = 0, shape=None,
            progress=None) -> AnalysisResult:
    """The Analysis of `model` (a path, ModelProto or spa.Model; `exclude`: name globs to protect).
    Its `.to_json()` is what `spa analyze --json` prints. `ratio` (planned with `criterion`,
    `prune_hidden`, `calib`, `seed`) or `plan` (dict or plan file) preview a plan: the attention
    blocks' sizes before -> after. `simplify`: fold static shape arithmetic first (onnxslim).
    `shape`: the input shapes MACs are counted at ({"x": (1, 3, 736, 736)} or "x:1x3x736x736");
    default: the first sample of `calib`, else dynamic dims as 1. `freeze_io`: a decoder's KV cache
    keeps its shape (as `spa prune --freeze-io`), which locks its KV heads and head size."""
    step = stepper(progress)
    if ratio is not None:
        planner.check_ratio(ratio)
    shapes.parse(shape)
    with step("load + shape inference"):
        loaded = as_model(model, copy=False, lazy=True)
        data = load_npz(calib) if isinstance(calib, (str, Path)) else calib
        shapes.bind(loaded, shape, conform(data, loaded.proto, "calib="))
    bound = loaded
    loaded, simplified = simplify_model(loaded, simplify, step)
    if loaded is not bound:
        shapes.copy_binding(bound, loaded)
    if isinstance(plan, (str, Path)):
        plan_file, plan = str(plan), planner.from_json(read_json(plan, "plan"))
    else:
        plan_file = None
    with step("analysis"):
        analysis = group_channels(loaded, exclude=list(exclude or []), freeze_io=freeze_io)
    if ratio is not None:
        plan = _preview(analysis, ratio, criterion, prune_hidden, data, seed, step)
    elif plan is not None:
        check_plan(analysis, plan)  # the plan prune would refuse is refused here too
    preview = None if plan is None else {"ratio": ratio, "plan_file": plan_file,
                                         "channels_removed": int(sum(len(c) for c in plan.values()))}
    return AnalysisResult(**{f.name: getattr(analysis, f.name) for f in fields(Analysis)}, simplified=simplified,
                          plan=plan, preview=preview, freeze_io=freeze_io)


def _preview(analysis, ratio, criterion, prune_hidden, calib, seed, step) -> dict:
    stats = None
    if calib is not None and criteria.NEEDS.get(criterion):
        with step("activation statistics (calibration)"):
            stats = statistics(analysis, calib)
    with step(f"scoring ({criterion}) + planning"):
        return make_plan(analysis, ratio, criterion, seed=seed, prune_hidden=prune_hidden, stats=stats)
