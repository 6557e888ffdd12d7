"""spa.report: one self-contained HTML page for a compression run (spa.reporting.html).

    dense + pruned... (+ bench= a `spa bench` JSON file, + data= arrays) ─collect─▶ doc
        ─render─▶ page (result.html) ─▶ output= (written atomically, once everything was measured)

Every argument is checked before any slow work. `result.to_json()` is the page's data plus
"output" (the page's path, None when it was not written); `result.save(path)` writes the page.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from spa.api.result import Result, stepper
from spa.core import shapes
from spa.core.errors import SpaError, positive_int
from spa.core.model import Model, check_file, check_writable, save, write_text_atomic
from spa.reporting import html as html_report


@dataclass
class Page(Result):
    """A Result whose product is an HTML page (`html`), not a model."""

    html: str = ""

    def save(self, path: str | os.PathLike) -> Path:
        """Write the page atomically to `path`."""
        path = check_writable(path)
        write_text_atomic(path, self.html)
        return path


def report(dense, pruned, *, bench=None, data=None, samples: int | None = None, title: str | None = None,
           command: str | None = None, output=None, progress=None, shape=None) -> Page:
    """The page comparing `dense` with each of `pruned` (one path or a list of model files):
    size, parameters, MACs, channels per layer, costs per op type, fidelity to `dense` on `data`
    (an .npz path or arrays keyed by input name; default random inputs), latency from `bench`,
    and the environment with `command` (the command line that made it, if any). `shape`: the
    input shapes MACs and random inputs are at ({name: dims} or "name:1x3x736x736"; default: the
    data's, else every dynamic dim 1)."""
    pruned = [pruned] if isinstance(pruned, (str, os.PathLike, onnx.ModelProto, Model)) else list(pruned)
    with tempfile.TemporaryDirectory(prefix=".spa-report-") as work:
        dense, *pruned = _as_files([dense, *pruned], Path(work))
        out = _check([dense, *pruned], bench, data, samples, output)
        shapes.parse(shape)
        step = stepper(progress)
        doc = html_report.collect(dense, pruned, bench=bench, data=data, samples=samples, title=title,
                                  command=command, step=step, shape=shape)
    with step("rendering"):
        page = html_report.render(doc)
    if out is not None:
        write_text_atomic(out, page)
    return Page({**doc, "output": None if out is None else str(out)}, html=page)


def _as_files(models: list, work: Path) -> list:
    """Paths as they are; a model in memory (ModelProto or spa.Model) written into `work` as
    model<i>.onnx, the name the page then shows for it."""
    files = []
    for i, model in enumerate(models):
        if isinstance(model, Model):
            model = model.proto
        if isinstance(model, onnx.ModelProto):
            model = save(model, work / f"model{i}.onnx")
        files.append(model)
    return files


def _check(models: list, bench, data, samples, output) -> Path | None:
    """Every bad argument fails here, before any slow work; returns the output path."""
    html_report.require_matplotlib()
    for path in models:
        check_file(path)
    if samples is not None:
        positive_int("samples", samples)
    if output is None:
        return None
    out = Path(output)
    if out.is_dir():
        raise SpaError(f"cannot write '{out}': it is a directory", "give a file name such as report.html")
    check_writable(out)
    for path in models + [bench, data]:
        if isinstance(path, (str, os.PathLike)) and Path(path).resolve() == out.resolve():
            raise SpaError(f"refusing to write '{out}': it is an input of the report", "choose another output=PATH")
    return out
