"""The pipeline as Python functions: each command of the CLI is one call here, returning a
Result (`.to_json()` is the command's --json document; `.model` and `.save(path)` where a model
is produced). The CLI (spa.cli) only parses arguments and prints these results.

    load -> analyze -> plan -> prune -> sparsify -> quantize -> evaluate / compare / bench -> report
"""

from spa.api.analyze import analyze
from spa.api.bench import bench, compare
from spa.api.build import build
from spa.api.compress import compress
from spa.api.measure import evaluate, sensitivity
from spa.api.prune import prune, prune_model, refuse_quantized
from spa.api.quantize import quantize
from spa.api.report import report
from spa.api.result import Result
from spa.api.sparsify import sparsify
from spa.api.sweep import sweep
from spa.api.train import finetune, train_sparse
from spa.core.checks import check_against, checker_message
from spa.core.model import reinfer
from spa.core.values import with_values, zeroed, zeroed_values
from spa.planning.plan import make_plan, plan_for_target
from spa.scoring.measure import compensation, saliency, statistics

__all__ = ["Result", "analyze", "bench", "build", "check_against", "checker_message", "compare", "compensation",
           "compress", "evaluate", "finetune", "make_plan", "plan_for_target", "prune", "prune_model", "quantize",
           "refuse_quantized", "reinfer", "report", "saliency", "sensitivity", "sparsify", "statistics",
           "sweep", "train_sparse", "with_values", "zeroed", "zeroed_values"]
