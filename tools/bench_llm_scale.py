#!/usr/bin/env python3
"""Billions of parameters and deep graphs: time and peak memory of `spa analyze` and `spa prune`
against a plain onnx.load + onnx.save of the same model, in one run on one machine.

    big   a ~1.1 B-parameter Llama-class decoder (TinyLlama's shape: hidden 2048, 22 layers,
          32 query heads over 4 KV heads, MLP 5632, vocabulary 32000), random float32 weights,
          exported by ONNX Runtime GenAI's model builder with its weights as external data (4.4 GB)
    deep  a 64-layer narrow Llama-class decoder exported by optimum (plain ONNX ops, ~14k nodes):
          the per-node cost of the analysis (needs --optimum-venv, see models/llm_export.py)

Every measured command runs in a fresh subprocess (tools/bench_prune.measure: wall, the child's
own CPU seconds and ru_maxrss, VmRSS sampled per spa step). Models are built once into --work.

usage:
    python tools/bench_llm_scale.py --work /tmp/spa-llm [--only big|deep] [--optimum-venv VENV]
    python tools/bench_llm_scale.py --work /tmp/spa-llm --only deep --optimum-venv VENV \
        --baseline OLD_CHECKOUT --repeat 7

A Markdown table goes to stdout, raw rows to WORK/bench_llm_scale.json. With --baseline, every
command runs --repeat times from an older checkout of spa (on PYTHONPATH) and from this one,
alternating, both byte-compiled first: medians of CPU seconds, and their ratio. That is the
comparison to trust on a shared machine whose speed drifts by tens of percent within an hour.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_prune import LOAD_SAVE, REPO, BenchError, log, measure, peak_by_step, spa_steps

BIG = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
       "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}
DEEP = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128}


def hf_model(folder: Path, shape: dict) -> Path:
    """A random-weight LlamaForCausalLM of `shape` (and the word-level tokenizer the exporters want)."""
    if (folder / "config.json").exists():
        return folder
    import torch
    import transformers as T

    from models.llm_export import save_tokenizer

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=2)).eval()
    model.save_pretrained(folder)
    del model
    save_tokenizer(folder, shape["vocab_size"])
    return folder


def build_big(work: Path) -> Path:
    from models.llm_export import genai

    out = work / "big-genai"
    if not (out / "model.onnx").exists():
        log("building the 1.1 B model (random weights, GenAI builder fp32) ...")
        hf = hf_model(work / "big-hf", BIG)
        genai(hf, out, "fp32")
        shutil.rmtree(work / "big-hf")  # 4.4 GB the measurements do not need
    return out / "model.onnx"


def build_deep(work: Path, venv: Path) -> Path:
    from models.llm_export import optimum

    out = work / "deep-optimum"
    if not (out / "model.onnx").exists():
        log("building the 64-layer model (optimum export) ...")
        optimum(hf_model(work / "deep-hf", DEEP), out, venv / "bin" / "python")
    return out / "model.onnx"


def run(cmd: list, work: Path, tag: str) -> dict:
    try:
        r = measure(cmd, work / f"{tag}.log", 7200, trace=True)
    except BenchError as exc:
        raise SystemExit(f"{tag}: {exc}") from None
    steps = spa_steps(r["stderr"])
    return {"wall_s": round(r["wall_s"], 1), "cpu_s": round(r["cpu_s"], 1), "peak_rss_mib": round(r["rss_mib"]),
            "steps_s": steps, "peak_by_step_mib": {k: round(v) for k, v in peak_by_step(r["rss_samples"],
                                                                                      list(steps)).items()}}


def bench(model: Path, work: Path, name: str) -> dict:
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    nodes = len(proto.graph.node)
    del proto
    out = work / f"{name}-pruned"
    copy = work / f"{name}-copy"
    for d in (out, copy):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    rows = {"model": name, "nodes": nodes,
            "data_gb": round(sum(f.stat().st_size for f in model.parent.iterdir() if f.is_file()) / 1e9, 2)}
    log(f"{name}: load + save ...")
    rows["load_save"] = run([sys.executable, "-c", LOAD_SAVE, str(model), str(copy / "model.onnx")], work,
                            f"{name}-loadsave")
    shutil.rmtree(copy)
    log(f"{name}: spa analyze ...")
    rows["analyze"] = run([sys.executable, "-m", "spa.cli", "analyze", str(model)], work, f"{name}-analyze")
    log(f"{name}: spa prune --ratio 0.3 ...")
    rows["prune"] = run([sys.executable, "-m", "spa.cli", "prune", str(model), "--ratio", "0.3", "-o",
                         str(out / "model.onnx")], work, f"{name}-prune")
    shutil.rmtree(out)
    out.mkdir()
    log(f"{name}: spa prune --ratio 0.3 --no-check ...")
    rows["prune_nocheck"] = run([sys.executable, "-m", "spa.cli", "prune", str(model), "--ratio", "0.3", "--no-check",
                                 "-o", str(out / "model.onnx")], work, f"{name}-prune-nocheck")
    shutil.rmtree(out)
    base = rows["load_save"]
    for k in ("analyze", "prune", "prune_nocheck"):
        rows[k]["wall_vs_load_save"] = round(rows[k]["wall_s"] / base["wall_s"], 2)
        rows[k]["cpu_vs_load_save"] = round(rows[k]["cpu_s"] / base["cpu_s"], 2)
        rows[k]["rss_vs_load_save"] = round(rows[k]["peak_rss_mib"] / base["peak_rss_mib"], 2)
    return rows


def ab(model: Path, work: Path, baseline: Path, *, repeat: int) -> str:
    """Medians of CPU seconds of each command from `baseline` (an older checkout) and from this
    tree, `repeat` runs each, alternating run by run (a Markdown table)."""
    import statistics
    import subprocess

    for pkg in ("passes", "backends"):  # the layout maps spa.passes to passes/: the same on PYTHONPATH
        link = baseline / "spa" / pkg
        if (baseline / pkg).is_dir() and not link.exists():
            link.symlink_to(Path("..") / pkg)
    for tree in (baseline, REPO):
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "spa"), str(tree / "passes"),
                        str(tree / "backends")], check=True, stdout=subprocess.DEVNULL)
    out = work / "ab-out"
    commands = {"onnx.load + onnx.save": [sys.executable, "-c", LOAD_SAVE, str(model), str(out / "copy.onnx")],
                "spa analyze": [sys.executable, "-m", "spa.cli", "analyze", str(model)],
                "spa prune --ratio 0.3 --no-check": [sys.executable, "-m", "spa.cli", "prune", str(model), "--ratio",
                                                     "0.3", "--no-check", "-o", str(out / "model.onnx")],
                "spa prune --ratio 0.3": [sys.executable, "-m", "spa.cli", "prune", str(model), "--ratio", "0.3",
                                          "-o", str(out / "model.onnx")]}
    cpu = {(what, tree): [] for what in commands for tree in ("before", "now")}
    for i in range(repeat):
        for what, cmd in commands.items():
            for tree, path in (("before", baseline), ("now", None)):  # now: spa as installed (pip install -e .)
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                log(f"{what} ({tree}, run {i + 1} of {repeat}) ...")
                # -P: the working folder (this checkout) does not come before PYTHONPATH
                env = [f"PYTHONPATH={path}"] if path else []
                r = measure(["env", *env, cmd[0], "-P", *cmd[1:]], work / "ab.log", 3600)
                cpu[(what, tree)].append(r["cpu_s"])
    shutil.rmtree(out, ignore_errors=True)
    lines = [f"| {model.parent.name} | {baseline.name} (CPU s) | this tree (CPU s) | now / before |", "|---|---|---|---|"]
    for what in commands:
        b, n = (statistics.median(cpu[(what, t)]) for t in ("before", "now"))
        lines.append(f"| {what} | {b:.2f} | {n:.2f} (best {min(cpu[(what, 'now')]):.2f}) | {n / b:.2f} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| model | nodes | data | command | wall s | CPU s | peak RSS MiB | vs load+save (wall / CPU / RSS) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for k, what in (("load_save", "onnx.load + onnx.save"), ("analyze", "spa analyze"),
                        ("prune", "spa prune --ratio 0.3"), ("prune_nocheck", "spa prune --ratio 0.3 --no-check")):
            if k not in r:
                continue
            m = r[k]
            ratio = "1" if k == "load_save" else \
                f"{m['wall_vs_load_save']} / {m['cpu_vs_load_save']} / {m['rss_vs_load_save']}"
            lines.append(f"| {r['model']} | {r['nodes']} | {r['data_gb']} GB | {what} | {m['wall_s']} | {m['cpu_s']} | "
                         f"{m['peak_rss_mib']} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--only", choices=("big", "deep"), default=None)
    p.add_argument("--optimum-venv", type=Path, default=os.environ.get("SPA_OPTIMUM_VENV"))
    p.add_argument("--baseline", type=Path, help="an older checkout of spa: A/B of CPU seconds on the deep model")
    p.add_argument("--repeat", type=int, default=7, help="with --baseline: runs of each command from each tree")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.baseline is not None:
        if a.optimum_venv is None:
            p.error("--baseline measures the deep model: it needs --optimum-venv")
        print(ab(build_deep(a.work, a.optimum_venv), a.work, a.baseline.resolve(), repeat=a.repeat))
        return 0
    rows = []
    if a.only in (None, "deep"):
        if a.optimum_venv is None:
            log("deep: skipped (no --optimum-venv)")
        else:
            rows.append(bench(build_deep(a.work, a.optimum_venv), a.work, "deep-64-layers"))
    if a.only in (None, "big"):
        rows.append(bench(build_big(a.work), a.work, "llama-1.1B"))
    (a.work / "bench_llm_scale.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
