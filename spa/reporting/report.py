"""What spa shows: analysis tables, before/after summaries, JSON documents."""

from __future__ import annotations

import json
import sys
from collections import Counter

import onnx
from rich.console import Console
from rich.table import Table

from spa.core.blocks import Axis

out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)  # pipes: no folding
err = Console(stderr=True)


def print_json(doc: dict) -> int:
    """The one JSON document of a command's --json, on stdout; returns exit code 0."""
    print(json.dumps(doc))
    return 0


def note(text: str) -> None:
    """One `note:` line on stderr."""
    err.print(f"note: {text}", markup=False, highlight=False, soft_wrap=True)


def warn(text: str) -> None:
    """One `warning:` line on stderr (a result that was written but may not be what was wanted)."""
    err.print(f"warning: {text}", markup=False, highlight=False, soft_wrap=True)


def _fmt(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def print_analysis(analysis, doc: dict) -> None:
    table = Table(title=f"channel groups of {doc['model']}", title_justify="left")
    for col in ("id", "channels", "members", "prunable", "zero-invariant"):
        table.add_column(col, overflow="fold")
    for g in analysis.groups:
        prunable = "yes" if g.prunable else f"no: {g.reason}"
        if g.prunable and g.locked:
            prunable = f"yes ({len(g.locked)} locked)"
        zi = "yes" if g.zero_invariant else f"no: {g.zi_reason}"
        if g.hidden:
            zi = f"no, hidden size (pruned with --prune-hidden): {g.zi_reason}"
        table.add_row(g.id, str(g.size), str(len(g.members)), prunable, zi)
    out.print(table)
    n_prunable = sum(g.prunable for g in analysis.groups)
    n_zi = sum(g.prunable and g.zero_invariant for g in analysis.groups)
    out.print(f"{len(analysis.groups)} groups, {n_prunable} prunable ({n_zi} zero-invariant); "
              f"params {_fmt(doc['params'])}, MACs {_fmt(doc['macs'])}")
    if analysis.barriers:
        kinds = Counter(n.op_type for n in analysis.index.graph.node if (n.name or n.op_type) in analysis.barriers)
        out.print("barriers (ops without a coupling rule): " + ", ".join(f"{k} x{v}" for k, v in kinds.most_common()))
    print_units(doc)


def print_units(doc: dict) -> None:
    """The erasable units (depth), by kind, and why the other residuals are not (once per reason)."""
    units, rejected = doc.get("erasable") or [], doc.get("not_erasable") or []
    if not units and not rejected:
        return
    kinds = Counter(u["kind"] for u in units)
    inexact = sum(not u["exact"] for u in units)
    line = f"erasable units (spa prune --erase N): {len(units)}" + (
        f" ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})" if units else "")
    out.print(line + (f", {inexact} of them not exact" if inexact else ""), markup=False, highlight=False)
    for reason, n in Counter(r["reason"] for r in rejected).most_common():
        out.print(f"  {n} residual(s) not erasable: {reason}", markup=False, highlight=False)


def _axis(a: dict) -> str:
    """One attention dimension as 'before -> after' (the `attention_blocks` JSON entries)."""
    return Axis(**a).text()


def print_coverage(doc: dict) -> None:
    """The analysis' N:M sparsity and quantization lines (stderr)."""
    sparsity = doc["sparsity"]
    err.print(f"{sparsity['pattern']} sparsity: {sparsity['holding']} of {sparsity['eligible']} eligible layers "
              f"hold the pattern ({sparsity['layers']} Conv/Gemm/MatMul layers)", markup=False, highlight=False)
    quant = doc["quantization"]
    if quant["qdq_nodes"] or quant["float16_initializers"]:
        err.print(f"quantization: {quant['quantized']} of {quant['layers']} layers read QDQ inputs "
                  f"({quant['qdq_nodes']} Q/DQ nodes); {quant['float16_initializers']} float16 initializers",
                  markup=False, highlight=False)
    if quant.get("integer_layers"):
        err.print(f"quantization: the model is already quantized: {quant['integer_layers']} integer layers "
                  "(ConvInteger/MatMulInteger/QLinear*), whose parameters and MACs are not counted above",
                  markup=False, highlight=False)


def print_blocks(blocks: list, title: str) -> None:
    """Per attention block (JSON form): heads, head_dim (Q/K and V) and MLP widths, 'before -> after'.
    Consecutive blocks alike in every size and reason share one row ("0-63"): a 64-layer decoder
    reads as one row, not 64 copies of the same reasons."""
    if not blocks:
        return
    table = Table(title=title, title_justify="left")
    kv = any("kv_heads" in b for b in blocks)
    for col in ("block", "softmax", "heads", *(["kv heads"] if kv else []), "head_dim q/k", "head_dim v",
                "intermediate"):
        table.add_column(col, overflow="fold")
    rows = []  # [first, last, softmax, cells]
    for i, b in enumerate(blocks):
        widths = ", ".join(_axis(a) for a in b["intermediate"]) or "-"
        kv_col = [_axis(b["kv_heads"]) if "kv_heads" in b else "-"] if kv else []
        cells = [_axis(b["heads"]), *kv_col, _axis(b["head_dim"]), _axis(b["v_head_dim"]), widths]
        if rows and rows[-1][3] == cells:
            rows[-1][1] = i
        else:
            rows.append([i, i, b["softmax"], cells])
    for first, last, softmax, cells in rows:
        span = str(first) if first == last else f"{first}-{last}"
        table.add_row(span, softmax if first == last else f"{softmax} (and {last - first} alike)", *cells)
    out.print(table)


SHAPE_LOCKS = ("computed shape", "read by Shape", "computed at run time", "computed as a product")


def shape_locked(analysis) -> bool:
    """Some channels are locked by run-time shape arithmetic (what --simplify may fold)."""
    reasons = [g.reason or "" for g in analysis.groups]
    return any(key in r for r in reasons for key in SHAPE_LOCKS)


def print_eval(doc: dict) -> None:
    line = f"{doc['model']}: {doc['samples']} samples"
    if "accuracy" in doc:
        line += f", top-1 accuracy {100 * doc['accuracy']:.2f}% (output '{doc['scored_output']}')"
    out.print(line, highlight=False)
    if "fidelity" in doc:
        table = Table(title=f"fidelity to {doc['reference']}", title_justify="left")
        for col in ("output", "cosine", "relative error", "max abs error"):
            table.add_column(col, justify="right")
        for name, f in doc["fidelity"].items():
            table.add_row(name, f"{f['cosine']:.6f}", f"{f['rel_err']:.3g}", f"{f['max_abs']:.3g}")
        out.print(table)


def why_nothing(analysis) -> str:
    if not analysis.groups:
        graph = analysis.index.graph
        layers = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
        sub = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        bodies = [n for n in graph.node if any(a.type in sub for a in n.attribute)]
        if not layers and bodies:
            kinds = sorted({n.op_type for n in bodies})
            return (f"its layers sit inside {'/'.join(kinds)} subgraphs, which spa does not rewrite "
                    "(control flow is a barrier)")
        return "it has no channel group with constant weights (weights computed at run time, or no Conv/Gemm/MatMul)"
    reasons = Counter(g.reason for g in analysis.groups)
    top, n = reasons.most_common(1)[0]
    return f"none of its {len(analysis.groups)} channel groups is prunable (most common reason, {n}x: {top})"


def print_prune(doc: dict) -> None:
    table = Table(title=f"{doc['input']} -> {doc['output']}", title_justify="left")
    for col in ("", "before", "after", "after/before"):
        table.add_column(col, justify="right")
    for key, label in (("params", "params"), ("macs", "MACs"), ("bytes", "file size")):
        b, a = doc["before"][key], doc["after"][key]
        table.add_row(label, _fmt(b), _fmt(a), f"{a / b:.3f}" if b else "-")
    out.print(table)
    out.print(f"pruned {doc['channels_removed']} channels in {doc['groups_pruned']} of "
              f"{doc['groups_prunable']} prunable groups ({doc['groups']} groups in all)")
    for o in doc.get("overlapping") or ():
        out.print(f"  group '{o['group']}': its channels overlap, so {o['channels']} channel(s) removed "
                  f"{o['slices']} of {o['of']} slices of '{o['tensor']}' (axis {o['axis']})")
    if doc.get("depth"):
        out.print(depth_line(doc["depth"]), markup=False, highlight=False)
    out.print(check_line(doc["check"]), markup=False, highlight=False)
    if doc.get("agreement"):
        out.print(agreement_line(doc["agreement"]), markup=False, highlight=False)


def depth_line(depth: dict) -> str:
    """Erased units, before -> after, with what chose them."""
    kinds = Counter(u["kind"] for u in depth["erased"])
    how = f", lowest block influence on {depth['scored_on']} inputs" if depth.get("scored_on") else ", from the plan"
    what = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    return (f"erased {len(depth['erased'])} of {depth['units']} erasable units ({what or 'none'}{how}): "
            f"{depth['units']} -> {depth['units_after']} residual units")


def agreement_line(fit: dict) -> str:
    """The result's measured agreement with its input, per output, in one line."""
    if fit["status"] != "ok":
        return f"agreement with the input: not measured ({fit['reason']})"
    parts = [f"'{name}' " + (f"top-1 {o['top1']:.3f}, " if "top1" in o else "") + f"cosine {o['cosine']:.4f}"
             for name, o in fit["outputs"].items()]
    return f"agreement with the input on {fit['samples']} {fit['inputs']} samples: {'; '.join(parts)}"


def check_line(check: dict | None) -> str:
    """What a command's output check verified, in one phrase: the error against the input, or that
    it was not run (--no-check) or skipped (the reason is in the document's notes)."""
    if check is None or check["status"] == "not run":
        return "output check: NOT RUN (--no-check): the result was not run in ONNX Runtime"
    if check["status"] == "skipped":
        return "output check: SKIPPED (see the note): the result was not run in ONNX Runtime"
    if check["status"] == "written back":
        return (f"output check: the trained weights written into the graph give the trained module's outputs in "
                f"ONNX Runtime (max relative error {check['max_rel_err']:.3g})")
    empty = check.get("empty_cache") or {}
    cache = "" if not empty else (f"; with an empty KV cache too, {empty['max_rel_err']:.3g}" if "max_rel_err" in empty
                                  else "; not run with an empty KV cache (the input model does not take one)")
    return (f"output check: runs in ONNX Runtime, same outputs' names/dtypes/shapes; max relative error vs the "
            f"input {check['max_rel_err']:.3g} (random inputs{', shapes ' + _shapes(check) if empty else ''}){cache}")


def _shapes(check: dict) -> str:
    return ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in (check.get("input_shapes") or {}).items())


