#!/usr/bin/env python3
"""Every small LLM export of models/llm_export.py pruned at --ratio 0.3: params and MACs before and
after, heads / KV heads / head size / MLP width before -> after, the output check, the KV-cache
I/O that changed, and the 16-token decode with the cache (ONNX Runtime, or GenAI's generator).

    python tools/bench_llm_exports.py --work /tmp/spa-llm-exports [--optimum-venv VENV]

optimum exports are pruned with --simplify (their Reshapes read sizes computed at run time; see
docs/llm.md). A Markdown table goes to stdout, raw rows to WORK/bench_llm_exports.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import spa
from models import llm_export


def exports(work: Path, venv: Path | None) -> list[tuple[str, str, Path]]:
    found = []
    for family in llm_export.GENAI_FAMILIES:
        hf = work / "hf" / family
        if not (hf / "config.json").exists():
            llm_export.save_hf(family, hf)
        for precision in ("fp32", "int4"):
            out = work / f"genai-{precision}" / family
            if not (out / "model.onnx").exists():
                llm_export.genai(hf, out, precision)
            found.append((f"GenAI {precision}", family, out / "model.onnx"))
    if venv is not None:
        python = llm_export.optimum_venv(venv)
        for family in llm_export.OPTIMUM_FAMILIES:
            hf = work / "hf" / family
            if not (hf / "config.json").exists():
                llm_export.save_hf(family, hf)
            out = work / "optimum" / family
            if not (out / "model.onnx").exists():
                llm_export.optimum(hf, out, python)
            found.append(("optimum", family, out / "model.onnx"))
    return found


def _axis(a: dict) -> str:
    return str(a["before"]) if a["after"] == a["before"] else f"{a['before']}->{a['after']}"


def row(tool: str, family: str, model: Path, work: Path) -> dict:
    out = work / "pruned" / tool.replace(" ", "-") / family / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = spa.prune(str(model), ratio=0.3, simplify=tool == "optimum", output=str(out)).to_json()
    block = doc["attention_blocks"][0] if doc["attention_blocks"] else None
    ran = (doc["configs"] or {}).get("generator") or (doc["configs"] or {}).get("decode") or {}
    return {"tool": tool, "family": family,
            "params": [doc["before"]["params"], doc["after"]["params"]],
            "macs": [doc["before"]["macs"], doc["after"]["macs"]],
            "heads": _axis(block["heads"]) if block else "-",
            "kv_heads": _axis(block["kv_heads"]) if block and "kv_heads" in block else
            (f"{doc['io_changed'][0]['before'][1]}->{doc['io_changed'][0]['after'][1]}" if doc["io_changed"] else "-"),
            "head_dim": _axis(block["head_dim"]) if block else "-",
            "mlp": ", ".join(_axis(a) for a in block["intermediate"][:1]) if block else "-",
            "check": doc["check"]["status"], "io_changed": len(doc["io_changed"]),
            "configs": (doc["configs"] or {}).get("written", []),
            "run": f"{ran.get('status')} ({'generator' if 'generator' in (doc['configs'] or {}) else 'ORT decode'}, "
                   f"{ran.get('tokens', 0)} tokens)"}


def table(rows: list[dict]) -> str:
    lines = [("| exporter | family | params before -> after | MACs before -> after | heads | KV heads | head size | "
              "MLP (layer 0) | check | cache I/O changed | configs | 16-token run |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, m = r["params"], r["macs"]
        lines.append(f"| {r['tool']} | {r['family']} | {p[0]:,} -> {p[1]:,} ({p[1] / p[0]:.2f}) | "
                     f"{m[0]:,} -> {m[1]:,} ({m[1] / m[0]:.2f}) | {r['heads']} | {r['kv_heads']} | {r['head_dim']} | "
                     f"{r['mlp']} | {r['check']} | {r['io_changed']} | {', '.join(r['configs']) or '-'} | {r['run']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--optimum-venv", type=Path, default=os.environ.get("SPA_OPTIMUM_VENV"))
    a = p.parse_args()
    rows = [row(tool, family, model, a.work) for tool, family, model in exports(a.work, a.optimum_venv)]
    (a.work / "bench_llm_exports.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
