"""Command line: a thin shell over spa's public API.

    spa analyze MODEL [--json] [--ratio R | --plan PLAN] [--criterion C] [--prune-hidden]
    spa prune MODEL --ratio R [-o OUT] [--criterion C] [--global] [--round-to N] [--prune-hidden]
                    [--simplify] [--exclude PATTERN] [--save-plan PLAN] [--json]
    spa prune MODEL --plan PLAN -o OUT
    spa prune MODEL --ratio R --criterion obspa [--calib DATA.npz] [--no-compensate]
    spa prune MODEL --target-params F | --target-macs F [--criterion C]
    spa eval MODEL --data DATA.npz [--labels KEY] [--reference REF] [--json]
    spa sweep GRID.yaml [-o results.csv] [--executor in-process|processes|ray] [--address auto|HOST:PORT]

Exit codes: 0 success, 1 a clear error (one line; traceback with -v), 2 usage error,
3 a requested verification failed. `--json` prints one document on stdout; progress
and logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from rich.console import Console

from spa import core
from spa.core import __version__, executor
from spa.core.errors import SpaError, UsageError, first_line, with_flags
from spa.reporting import report

err = Console(stderr=True)
SIMPLIFY_HELP = ("fold shape arithmetic over static sizes first (onnxslim), which frees axes that dynamic-axes "
                 "exports compute at run time; group ids then refer to the simplified graph")
CALIB_HELP = ".npz of calibration inputs keyed by input name: activation statistics for the criteria and --compensate"
EXCLUDE_HELP = "protect nodes/initializers whose name matches (glob; repeatable)"
NO_CHECK_HELP = ("do not run the result in ONNX Runtime against the input before writing it, nor an LLM's "
                 "decode check (the ONNX checker still runs); needed to go on with a model ONNX Runtime cannot run")


HELD: list[str] = []  # step lines held back while stderr is not a terminal: shown once the command succeeds


def _live() -> bool:
    """Step lines as they happen: on a terminal, or when SPA_PROGRESS=live asks for them (a log
    reader that follows the steps, as tools/bench_prune.py does). Elsewhere (CI logs, pipes) they
    are held until the command succeeds, so a failure's stderr is its one error line."""
    return err.is_terminal or os.environ.get("SPA_PROGRESS") == "live"


TICK_S = 10.0  # progress within a step, where no spinner shows it: a line at most this often


@contextlib.contextmanager
def step(what: str, quiet: bool = False):
    """A spinner on stderr while a step runs, then one line with its time. The step gets a
    `tick(text)` for its progress ("12/57 groups, ETA 40 s"): shown in the spinner on a terminal,
    else (--json, pipes, logs) as a line `what: text` on stderr at most every TICK_S seconds."""
    start = time.perf_counter()
    if quiet or not err.is_terminal:
        yield _ticker(what, start)
    else:
        with err.status(f"{what}...") as status:
            yield lambda text: status.update(f"{what}: {text}...")
    if quiet:
        return
    line = f"{what}: {time.perf_counter() - start:.2f} s"
    if _live():
        err.print(f"[dim]{line}[/dim]")
    else:
        HELD.append(line)


def _ticker(what: str, start: float):
    """tick(text) printing `what: text` on stderr once TICK_S seconds have passed since the last
    line (or the step's start), so short steps print nothing and long ones show they advance."""
    last = [start]

    def tick(text: str) -> None:
        now = time.perf_counter()
        if now - last[0] >= TICK_S:
            last[0] = now
            err.print(f"{what}: {text}", markup=False, highlight=False, soft_wrap=True)
    return tick


def _release(ok: bool) -> None:
    """Print the held step lines after a success; drop them after a failure."""
    lines, HELD[:] = list(HELD), []
    for line in lines if ok else []:
        err.print(line, markup=False, highlight=False)


def progress(args):
    """The API's `progress=`: this command's steps as spinners, silent with --json."""
    return lambda what: step(what, args.json)


def add_common(p, *, output: str | None = None, json_help: str = "print the result as JSON on stdout") -> None:
    """The options every command shares: -o/--output (when it writes a model), --json, -v."""
    if output is not None:
        p.add_argument("-o", "--output", help=output)
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument("-v", "--verbose", action="store_true", help="a traceback with every error")


def add_calib(p, *, help: str = CALIB_HELP, samples: int | None = None, required: bool = False, into=None,
              samples_help: str | None = None) -> None:
    """--calib DATA (into a mutually exclusive group when given) and, when `samples` is given (or
    `samples_help`), --calib-samples N: the calibration options, declared once for every command."""
    (into or p).add_argument("--calib", metavar="DATA", required=required, help=help)
    if samples is not None or samples_help is not None:
        p.add_argument("--calib-samples", type=int, default=samples, metavar="N",
                       help=samples_help or f"samples of --calib to use ({samples})")


SHAPE_HELP = ("input shape the model runs at, e.g. --shape x:1x3x736x736 (repeatable, one per input): MACs, "
              "--target-macs, the output check and random inputs use it; default: the first sample of the data "
              "(batch 1), else dynamic dims count as 1")


def add_executor(p) -> None:
    """--executor, --workers, --address, --retries: where a sweep's independent tasks run (spa.core.executor)."""
    p.add_argument("--executor", choices=executor.NAMES, default="in-process",
                   help="where the tasks run: in this process (default), in local worker processes, or on Ray "
                        "(pip install 'spa[ray]'); the results are the same (docs/sweeps.md)")
    p.add_argument("--workers", type=int, metavar="N", help="worker processes (processes: default the cores; "
                   "ray: CPUs of the local instance it starts)")
    p.add_argument("--address", metavar="auto|HOST:PORT", help="with --executor ray: join this running Ray cluster "
                   "('auto': the one this machine belongs to) instead of starting a local one")
    p.add_argument("--retries", type=int, default=1, metavar="N",
                   help="tries again a failed task N times before reporting it (default 1)")


def executor_of(args) -> executor.Executor:
    """The Executor the --executor options ask for (close it: `with executor_of(args) as ex`)."""
    if args.retries < 0:
        raise UsageError(f"invalid --retries {args.retries}: it must be at least 0")
    return executor.get(args.executor, workers=args.workers, address=args.address)


def add_shape(p, *, help: str = SHAPE_HELP) -> None:
    """--shape NAME:DIMS (repeatable): the input shapes, declared once for every command."""
    p.add_argument("--shape", action="append", default=None, metavar="NAME:DIMS", help=help)


MAX_LOSS_HELP = ("fail (exit 3, nothing written) when the result lost more than F of its agreement with the input "
                 "model: 1 - top-1 agreement for class scores, else 1 - cosine, worst output, measured on --calib "
                 "(else random inputs)")


def add_max_loss(p) -> None:
    p.add_argument("--max-loss", type=float, metavar="F", help=MAX_LOSS_HELP)


def show_warnings(doc: dict, flags: dict) -> None:
    """The result's warnings in the CLI's words (`flags`: {parameter: flag}), on stderr in both
    modes (a --json caller sees them too)."""
    for line in doc.get("warnings") or ():
        report.warn(with_flags(line, flags))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spa", description="Structured pruning of ONNX models.")
    p.add_argument("--version", action="version", version=f"spa {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    for module in _extensions():
        module.parser(sub)
        COMMANDS.update(module.COMMANDS)
    return p


# each command module: parser(sub) adds its subcommand, COMMANDS {name: function(args) -> exit code}
EXTENSIONS = ("analyze", "prune", "measure", "train", "sparsify", "quantize", "compress", "bench", "build", "report",
              "sweep")


def _extensions() -> list:
    return [importlib.import_module(f"spa.cli.{name}") for name in EXTENSIONS]


def show_notes(notes: list) -> None:
    """The first five notes on stderr (--json lists them all)."""
    _first_five(notes, "note: ", "note: ... and {n} more")


def _first_five(lines: list, prefix: str, more: str) -> None:
    """The first five `lines` on stderr after `prefix`; then `more` (with {n}: how many were left out)."""
    for line in lines[:5]:
        err.print(f"{prefix}{line}", markup=False, highlight=False, soft_wrap=True)
    if len(lines) > 5:
        err.print(more.format(n=len(lines) - 5) + " (--json lists them all)", markup=False, highlight=False)


def failed_tasks(lines: list[str], what: str) -> int:
    """A sweep's tasks that failed after their retries, on stderr (the first five): exit 1 when any
    (what they would have given is still printed and written), else 0."""
    _first_five(lines, f"error: {what} failed: ", "error: ... and {n} more failed " + what + "s")
    return 1 if lines else 0


def output_path(args, what: str = "pruned") -> Path:
    """-o, or MODEL.<what>.onnx beside the input."""
    if args.output:
        return Path(args.output)
    src = Path(args.model)
    return src.with_name(f"{src.stem}.{what}.onnx")


def flags_of(parser, command: str) -> dict:
    """{parameter name: flag} of a subcommand's options (its argparse dests), for error messages."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = {a.dest: max(a.option_strings, key=len) for a in sub._actions if a.option_strings}
    module = sys.modules.get(getattr(COMMANDS.get(command), "__module__", ""), None)
    return {**flags, **getattr(module, "FLAGS", {})}


COMMANDS: dict = {}


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwound like Ctrl-C, so every `finally` removes its temporaries."""


def _terminate(signum, frame):
    raise Terminated(signal.Signals(signum).name)


def entry() -> int:
    """The `spa` program (console script, python -m spa.cli): main() in a process of its own."""
    _fewer_collections()
    return main()


def _fewer_collections() -> None:
    """A command is one short process that builds hundreds of thousands of small objects (a
    64-layer decoder: shapes, couplings, JSON) and hardly any cycles: with Python's default
    thresholds, cyclic collection took 5% of `spa analyze` on such a graph (0.2 of 3.8 CPU s,
    671 passes), with these 1%. What was imported stays out of every pass (gc.freeze)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def _on_signals() -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _terminate)


GC_THRESHOLD = (50_000, 20, 100)  # first-generation allocations between cyclic collections (Python's: 700)


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _on_signals()
    HELD.clear()
    core.SHARED_ARENA = True  # the sessions share one CPU arena: this process ends with the command
    try:
        code = COMMANDS[args.command](args)
        _release(code == 0)
        return code
    except SpaError as exc:
        _release(False)
        if args.verbose:
            traceback.print_exc()
        err.print(f"error: {with_flags(str(exc), flags_of(parser, args.command))}", markup=False, highlight=False,
                  soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        _release(False)
        signal_name = f" ({exc})" if isinstance(exc, Terminated) else ""
        err.print(f"error: interrupted{signal_name}; temporary files removed", markup=False)
        return 1
    except Exception as exc:  # a bug: still one line unless -v  # noqa: BLE001
        _release(False)
        if args.verbose:
            traceback.print_exc()
        err.print(f"error: internal error ({type(exc).__name__}: {first_line(exc)}); rerun with -v for the traceback",
                  markup=False, highlight=False, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
