"""spa build: an ONNX model -> a TensorRT engine file, and what TensorRT really picked (spa.api.build).

    MODEL.onnx ─checks─▶ TensorRT builder (strongly typed; --sparse; --shapes profile; timing cache)
               ─▶ engine bytes ─inspector─▶ report: layer types, sparse kernels picked
               ─▶ OUT.engine (temp file + rename: never half an engine)

--trt is required (the only engine format so far; without it: a usage error); the default output
is MODEL.engine beside the input. Every check that needs no TensorRT runs first, in the API.
"""

from __future__ import annotations

import json
from pathlib import Path

from spa.api.build import build as run_build
from spa.cli.app import add_common, err, progress
from spa.core.errors import require


def parser(sub) -> None:
    b = sub.add_parser("build", help="build a TensorRT engine from an ONNX model (--trt)")
    b.add_argument("model")
    b.add_argument("--trt", action="store_true", help="build a TensorRT engine (the only engine format so far)")
    prec = b.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="float16: TensorRT's strongly typed networks take the "
                      "precision from the ONNX types, so the model must compute in float16 (spa quantize --fp16)")
    prec.add_argument("--bf16", action="store_true", help="bfloat16: the model must compute in bfloat16")
    b.add_argument("--sparse", action="store_true", help="let TensorRT pick 2:4 sparse kernels for layers whose "
                   "weights are 2:4 sparse (spa sparsify); the report lists the layers it picked")
    b.add_argument("--shapes", metavar="SPEC", help="shape range of dynamic inputs: NAME:MINxDIMS/OPTxDIMS/MAXxDIMS"
                   "[,NAME2:...] (one shape: fixed); a dynamic batch axis alone defaults to 1")
    b.add_argument("--timing-cache", metavar="FILE", help="read and update this TensorRT timing cache (faster rebuilds)")
    b.add_argument("--workspace", type=int, metavar="MB", help="builder workspace limit in MiB (default: TensorRT's)")
    add_common(b, output="engine file (default: MODEL.engine beside the input)")


def build(args) -> int:
    require(args.trt, "spa build needs an engine format: --trt (TensorRT) is the only one so far", "add --trt")
    out = Path(args.output) if args.output else Path(args.model).with_suffix(".engine")
    log = (lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True)) if args.verbose else None
    result = run_build(args.model, fp16=args.fp16, bf16=args.bf16, sparse=args.sparse, shapes=args.shapes,
                       timing_cache=args.timing_cache, workspace=args.workspace, output=out, log=log,
                       progress=progress(args))
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        _print(result.to_json())
    return 0


def _print(doc: dict) -> None:
    def say(text: str) -> None:
        err.print(text, markup=False, highlight=False, soft_wrap=True)

    say(f"wrote {doc['output']}: {doc['bytes'] / 2**20:.2f} MiB, TensorRT {doc['tensorrt']}, "
        f"built in {doc['build_seconds']:.1f} s")
    prec = doc["precision"]
    types = ", ".join(f"{k} {v}" for k, v in (prec["layer_types"] or {}).items()) or "not reported"
    say(f"precision: {prec['used']}; layer outputs: {types}")
    for name, p in doc["profiles"].items():
        say(f"profile {name}: " + " / ".join("x".join(map(str, p[k])) for k in ("min", "opt", "max")))
    say(_sparse_line(doc["sparse"]))
    for note in doc["notes"]:
        say(f"note: {note}")


def _sparse_line(sparse: dict) -> str:
    if "error" in sparse:
        return f"sparse: {sparse['error']}"
    eligible = sparse.get("eligible")
    seen = f"; eligible per the build log: {len(eligible)}" if eligible is not None else ""
    if not sparse["requested"]:
        return f"sparse: not requested (--sparse); sparse kernels in the engine: {len(sparse['sparse'])}"
    names = ", ".join(sparse["sparse"][:8]) + (" ..." if len(sparse["sparse"]) > 8 else "")
    return (f"sparse: TensorRT picked sparse kernels for {len(sparse['sparse'])} of {sparse['layers']} layers"
            f"{': ' + names if names else ''}{seen} (eligible is not picked: a sparse kernel is used only "
            f"where TensorRT times it faster; docs/tensorrt.md)")


COMMANDS = {"build": build}
