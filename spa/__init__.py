"""spa: structured pruning of ONNX models, exact and verified.

Public API (the CLI is a thin shell over it)::

    model = spa.load("model.onnx")
    analysis = spa.analyze(model)
    plan = spa.make_plan(analysis, ratio=0.5)
    pruned = spa.prune(analysis, plan)
    spa.evaluate(pruned, spa.load_npz("test.npz"), labels=..., reference="model.onnx")
"""

from . import cost
from .analysis import Analysis, Group, Member, analyze
from .api import compare, make_plan, prune
from .data import load_npz
from .errors import SpaError, VerificationError
from .evaluate import evaluate
from .model import Model, load, save

__all__ = ["Analysis", "Group", "Member", "Model", "SpaError", "VerificationError", "analyze", "compare", "cost",
           "evaluate", "load", "load_npz", "make_plan", "prune", "save"]
__version__ = "0.1.0"
