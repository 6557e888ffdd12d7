"""The pipeline as Python functions: each command of the CLI is one call here.

    load -> analyze -> plan -> prune -> sparsify -> quantize -> evaluate / compare / bench -> report
"""

from spa.api.prune import prune, refuse_quantized
from spa.core.model import reinfer
from spa.core.checks import check_against, checker_message
from spa.core.values import with_values, zeroed, zeroed_values
from spa.planning.plan import make_plan, plan_for_target
from spa.scoring.measure import compensation, saliency, statistics

__all__ = ["check_against", "checker_message", "compensation", "make_plan", "plan_for_target", "prune",
           "refuse_quantized", "reinfer", "saliency", "statistics", "with_values", "zeroed", "zeroed_values"]
