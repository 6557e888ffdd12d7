"""spa.prune: a plan applied to the model, every member of every planned group shrunk.

    analysis + plan (+ compensated consumers) ─prune pass─▶ smaller model, checked"""

from __future__ import annotations

import onnx

from spa.core.analysis import Analysis
from spa.core.checks import check_against
from spa.core.errors import SpaError
from spa.core.model import TWO_GB, Model, infer_shapes, weight_bytes
from spa.passes import prune as prune_pass
from spa.scoring.measure import compensation

QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
             "MatMulInteger", "DynamicQuantizeLinear", "QGemm", "QLinearAdd"}


def refuse_quantized(model: Model, action: str = "prune") -> None:
    for node in model.graph.node:
        if node.op_type in QUANT_OPS:
            if action == "quantize":
                raise SpaError(f"cannot quantize an already quantized model: found {node.op_type} "
                               f"'{node.name or '#'}'", "quantize the float model")
            raise SpaError(
                f"cannot prune quantized model: found {node.op_type} '{node.name or '#'}' "
                "(pruning QDQ graphs is not supported yet)",
                "prune the float model first, then quantize it",
            )


def prune(analysis: Analysis, plan: dict, check: bool = True, compensate=None) -> onnx.ModelProto:
    """Apply `plan`; with `check`, the result passes onnx.checker with full_check (else
    VerificationError). Over 2 GB a model can only be checked from its file: save it, then
    `check_against(path, original)` (the CLI does this on the temp file before renaming).
    `compensate`: updated weights from `compensation` (or Stats, compensated in one shot), so
    the remaining channels take over what the removed ones carried."""
    if compensate is not None and not isinstance(compensate, dict):
        compensate = compensation(analysis, plan, stats=compensate)[0]
    proto = prune_pass.apply(analysis, plan, compensate)
    if check and weight_bytes(proto) < TWO_GB:
        check_against(proto, analysis.model.proto)
    return proto


def reinfer(proto: onnx.ModelProto) -> Model:
    model = Model(proto)
    infer_shapes(model)
    return model
