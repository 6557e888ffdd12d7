"""spa build: an ONNX model -> a TensorRT engine file, and what TensorRT really picked.

    MODEL.onnx ─checks─▶ TensorRT builder (strongly typed; --sparse; --shapes profile; timing cache)
               ─▶ engine bytes ─inspector─▶ report: layer types, sparse kernels picked
               ─▶ OUT.engine (temp file + rename: never half an engine)

Every check that needs no TensorRT runs first (the model, --shapes against its inputs, the output
path), then tensorrt is imported (missing: one line naming `pip install 'spa[tensorrt]'`), then
the precision is checked against the model's types, and only then does the build start.
"""

from __future__ import annotations

import json
from pathlib import Path

from spa.cli.app import err, step
from spa.core.errors import SpaError, first_line
from spa.core.model import check_writable, load, quiet_stdout, write_atomic

SCHEMA = 1


def parser(sub) -> None:
    b = sub.add_parser("build", help="build a TensorRT engine from an ONNX model (--trt)")
    b.add_argument("model")
    b.add_argument("--trt", action="store_true", help="build a TensorRT engine (the only engine format so far)")
    b.add_argument("-o", "--output", help="engine file (default: MODEL.engine beside the input)")
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
    b.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    b.add_argument("-v", "--verbose", action="store_true", help="tracebacks and TensorRT's warnings")


def build(args) -> int:
    out, shapes = _check(args)
    from spa.backends import base
    from spa.backends import trt as backend

    trt = backend.tensorrt()
    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    options = base.Options(precision=precision, sparse=args.sparse, shapes=shapes)
    log = (lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True)) if args.verbose else None
    with step("building the TensorRT engine", args.json), quiet_stdout():
        built = backend.build(args.model, options, workspace_mb=args.workspace, timing_cache=args.timing_cache,
                              log=log)
    sparse, types = _inspect(backend, built)
    write_atomic(out, built.plan)
    doc = {"schema_version": SCHEMA, "input": args.model, "output": str(out), "bytes": len(built.plan),
           "tensorrt": trt.__version__,
           "precision": {"requested": precision, "used": built.precision, "strongly_typed": built.strongly_typed,
                         "layer_types": types},
           "sparse": {"requested": bool(args.sparse), **sparse},
           "profiles": {k: {"min": list(lo), "opt": list(opt), "max": list(hi)}
                        for k, (lo, opt, hi) in built.profiles.items()},
           "timing_cache": args.timing_cache, "build_seconds": round(built.seconds, 3), "notes": built.notes}
    if args.json:
        print(json.dumps(doc))
    else:
        _print(doc)
    return 0


def _check(args) -> tuple[Path, dict]:
    """Every check that needs no TensorRT, cheapest first; returns (output path, --shapes)."""
    from spa.backends.trt import onnx_inputs, parse_shapes, profile_shapes

    if not args.trt:
        raise SpaError("spa build needs an engine format: --trt (TensorRT) is the only one so far", "add --trt")
    model = load(args.model, infer=False)
    shapes = parse_shapes(args.shapes) if args.shapes is not None else {}
    profile_shapes(onnx_inputs(model.proto), shapes)
    if args.workspace is not None and args.workspace <= 0:
        raise SpaError(f"--workspace must be a positive number of MiB, got {args.workspace}")
    out = Path(args.output) if args.output else Path(args.model).with_suffix(".engine")
    check_writable(out, args.model)
    if out.suffix.lower() == ".onnx":
        raise SpaError(f"refusing to write a TensorRT engine to '{out}'", "name it .engine")
    if args.timing_cache:
        check_writable(args.timing_cache, args.model)
    return out, shapes


def _inspect(backend, built) -> tuple[dict, dict | None]:
    """(sparse kernels picked, layer types) from the engine inspector; a failure is reported, the
    engine is still written."""
    eligible = built.sparsity.get("eligible")
    try:
        info = backend.inspect_plan(built.plan, "the engine just built")
    except SpaError as exc:
        return {"error": str(exc), "eligible": eligible}, None
    except Exception as exc:  # noqa: BLE001 - the inspector is a report; the engine is fine
        return {"error": f"engine inspector failed: {first_line(exc, 200)}", "eligible": eligible}, None
    return backend.sparse_layers(info, eligible), backend.layer_types(info)


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
