"""spa: structured pruning of ONNX models, exact and verified.

Public API (the CLI is a thin shell over it)::

    model = spa.load("model.onnx")
    analysis = spa.analyze(model)
    plan = spa.make_plan(analysis, ratio=0.5)
    pruned = spa.prune(analysis, plan)
    # OBSPA: calibrated (or data-free without `calib`), with compensation of the consumers
    stats = spa.statistics(analysis, calib=spa.load_npz("calib.npz"))
    plan = spa.make_plan(analysis, ratio=0.3, criterion="obspa", stats=stats)
    pruned = spa.prune(analysis, plan, compensate=spa.compensation(analysis, plan, calib=...)[0])
    spa.evaluate(pruned, spa.load_npz("test.npz"), labels=..., reference="model.onnx")
    # gradient criteria (taylor, snip, grasp, crop) and training, through spa.torch (needs torch)
    sal = spa.saliency(analysis, "snip", {"x": x}, labels=y)
    plan = spa.make_plan(analysis, ratio=0.5, criterion="snip", stats=sal)
    result = spa.fit(pruned, {"x": x}, y, teacher=dense_proto, cfg=spa.FitConfig(epochs=10))  # .proto: same graph
"""

from spa.core import cost
from spa.core.analysis import Analysis, Group, Member, analyze
from spa.api import compensation, make_plan, plan_for_target, prune, saliency, statistics
from spa.core.checks import compare_outputs as compare
from spa.core.data import load_npz
from spa.core.errors import SpaError, VerificationError
from spa.scoring.evaluate import evaluate
from spa.core.model import Model, load, save
from spa.training.train import FitConfig, HessoSchedule, fit, zero_plan

__all__ = [
           "Analysis",
           "FitConfig",
           "Group",
           "HessoSchedule",
           "Member",
           "Model",
           "SpaError",
           "VerificationError",
           "analyze",
           "compare",
           "compensation",
           "cost",
           "evaluate",
           "fit",
           "load",
           "load_npz",
           "make_plan",
           "plan_for_target",
           "prune",
           "saliency",
           "save",
           "statistics",
           "zero_plan",
]
__version__ = "0.1.0"
