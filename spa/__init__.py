"""spa: structured pruning of ONNX models, exact and verified.

The Python API is the product; the `spa` command line is a thin shell over it. Every command
has one function here that does all the command does (its checks included) and returns a
Result: `.to_json()` is what the command prints with --json, `.model` the produced
onnx.ModelProto, `.save(path)` the checked atomic save. `model` arguments take a path, an
onnx.ModelProto or a spa.Model; options after the first one or two parameters are keywords::

    pruned = spa.prune("model.onnx", ratio=0.3, criterion="obspa", calib="calib.npz")
    sparse = spa.sparsify(pruned.model, pattern="2:4", method="obs", calib="calib.npz")
    int8 = spa.quantize(sparse.model, calib="calib.npz")
    int8.save("model.small.onnx")
    spa.evaluate("model.small.onnx", "test.npz", "labels", reference="model.onnx").to_json()
    spa.compress("model.onnx", ratio=0.3, sparsify="2:4", int8=True, calib="calib.npz", output="small.onnx")

The steps are public too: spa.analyze -> spa.statistics / spa.saliency -> spa.make_plan ->
spa.compensation -> spa.prune(analysis, plan) (the single step: a ModelProto back).

Sweeps (spa.sweep, spa.sensitivity, the measured budget of spa.prune's targets, spa.bench over
many models) run their independent tasks through spa.executor("in-process" | "processes" |
"ray", workers=, address=): the same results on each (docs/sweeps.md).
"""

from spa.api import (
                     Result,
                     analyze,
                     bench,
                     build,
                     compare,
                     compensation,
                     compress,
                     evaluate,
                     finetune,
                     make_plan,
                     plan_for_target,
                     prune,
                     quantize,
                     report,
                     saliency,
                     sensitivity,
                     sparsify,
                     statistics,
                     sweep,
                     train_sparse,
)
from spa.core import cost
from spa.core.analysis import Analysis, Group, Member
from spa.core.data import load_npz
from spa.core.errors import SpaError, UsageError, VerificationError
from spa.core.executor import get as executor
from spa.core.model import Model, load, save
from spa.training.train import FitConfig, HessoSchedule, fit, zero_plan

__all__ = ["Analysis", "FitConfig", "Group", "HessoSchedule", "Member", "Model", "Result", "SpaError", "UsageError",
           "VerificationError", "analyze", "bench", "build", "compare", "compensation", "compress", "cost", "evaluate",
           "executor", "finetune", "fit", "load", "load_npz", "make_plan", "plan_for_target", "prune", "quantize", "report",
           "saliency", "save", "sensitivity", "sparsify", "statistics", "sweep", "train_sparse", "zero_plan"]
from spa.core import __version__  # noqa: F401 - one version, kept in the core
