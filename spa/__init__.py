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
"""

from . import cost
from .analysis import Analysis, Group, Member, analyze
from .api import compare, compensation, make_plan, plan_for_target, prune, statistics
from .data import load_npz
from .errors import SpaError, VerificationError
from .evaluate import evaluate
from .model import Model, load, save

__all__ = ["Analysis", "Group", "Member", "Model", "SpaError", "VerificationError", "analyze", "compare",
           "compensation", "cost", "evaluate", "load", "load_npz", "make_plan", "plan_for_target", "prune", "save",
           "statistics"]
__version__ = "0.1.0"
