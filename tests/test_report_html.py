"""`spa report`: the data behind the page, bad inputs, and the page as a browser draws it.

    tiny_resnet ─spa prune 0.3/0.5/0.7─▶ r3, r5, r7 ─collect─▶ doc ─render─▶ report.html
                                                                    └─headless Chromium─▶ PNG (not blank)

The data is checked against what spa prune wrote (weight shapes in the files), cost.summary
(the per-op-type breakdown sums to its totals) and the identity (DENSE vs itself: cosine 1).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from spa import load
from spa.cli import app as cli
from spa.core import cost
from spa.reporting import html as html_report

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_resnet.onnx"
RATIOS = (0.3, 0.5, 0.7)
CORPUS_RESNET = ROOT.parent / "shared" / "corpus" / "real" / "onnx-light" / "light_resnet50.onnx"


def spa(capsys, *args):
    """(exit code, stdout, stderr) of the CLI run in-process."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A folder with dense.onnx and r3/r5/r7.onnx written by `spa prune`, and a bench fixture."""
    folder = tmp_path_factory.mktemp("report")
    shutil.copy(EXAMPLE, folder / "dense.onnx")
    for ratio in RATIOS:
        with contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main(["prune", str(folder / "dense.onnx"), "--ratio", str(ratio), "-o",
                           str(folder / _name(ratio)), "--json"])
        assert rc == 0
    (folder / "bench.json").write_text(json.dumps(bench_doc(["dense.onnx", *map(_name, RATIOS)])))
    return folder


def _name(ratio: float) -> str:
    return f"r{int(ratio * 10)}.onnx"


def bench_doc(models: list, batches=(1, 8)) -> dict:
    """A `spa bench --json` document (schema_version 1); paths relative to its folder, one model
    the report does not have, one run skipped."""
    results = []
    for batch in batches:
        for k, model in enumerate(models + ["elsewhere.onnx"]):
            p50 = batch * (1.0 - 0.2 * k)
            lat = {"min": p50 * .9, "mean": p50 * 1.1, "p50": p50, "p90": p50 * 1.2, "p95": p50 * 1.3,
                   "p99": p50 * 1.5, "max": p50 * 2}
            skipped = "too big" if model == "elsewhere.onnx" else None
            results.append({"model": model, "batch": batch, "clock": "host", "iterations": 200, "skipped": skipped,
                            "latency_ms": None if skipped else lat, "throughput": None if skipped else batch * 1e3 / p50,
                            "speedup": None if skipped else 1 / (1.0 - 0.2 * k)})
    return {"schema_version": 1, "backend": "ort",
            "environment": {"spa": "0.1.0", "python": "3.11", "platform": "Linux", "cpu": "test cpu",
                            "onnxruntime": "1.31.1"},
            "models": [{"path": m, "label": m, "params": 1, "macs": 1, "session": {}} for m in models + ["elsewhere.onnx"]],
            "results": results}


@pytest.fixture(scope="module")
def doc(run) -> dict:
    return html_report.collect(run / "dense.onnx", [run / _name(r) for r in RATIOS], bench=run / "bench.json",
                               command="spa report dense.onnx r3.onnx r5.onnx r7.onnx")


# ---------------------------------------------------------------- the data


def test_channels_are_what_prune_wrote(run, doc):
    rows = doc["layers"]["rows"]
    assert [r["op"] for r in rows] == ["Conv"] * 7 + ["Gemm"]
    for k, ratio in enumerate(RATIOS, 1):
        weights = {t.name: t.dims[0] for t in onnx.load(str(run / _name(ratio))).graph.initializer}
        for r in rows:
            assert r["channels"][k] == weights[r["weight"]], (ratio, r)
    for r in rows:
        before, r3, r5, r7 = r["channels"]
        if r["op"] == "Conv":
            assert r5 == before // 2 and before > r3 > r5 > r7 > 0
        else:
            assert before == r3 == r5 == r7 == 10  # the classes stay
    assert doc["layers"]["unmatched"] == [0, 0, 0, 0]
    removed = doc["layers"]["removed"]
    assert removed[0] == 0 and removed[1] < removed[2] < removed[3]
    assert removed[2] == pytest.approx(sum(r["channels"][0] // 2 for r in rows[:7]) / sum(r["channels"][0] for r in rows))


def test_weights_behind_transpose_and_dequantize(tmp_path):
    """Output channels of weights that reach their layer through other nodes:

        x [1,8] ─MatMul(·, Transpose(W1 [4,8]))─▶ [1,4] ─Gemm(·, DequantizeLinear(W2 int8 [4,6]))─▶ [1,6]
        y [1,4,5,5] ─ConvTranspose(W3 [4,3,3,3], group 2)─▶ [1,6,7,7]
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.integers(-8, 8, (4, 6)).astype(np.int8), "W2"),
             numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.int8(0), "z"),
             numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W3")]
    nodes = [helper.make_node("Transpose", ["W1"], ["W1t"], name="t"),
             helper.make_node("MatMul", ["x", "W1t"], ["h"], name="mm"),
             helper.make_node("DequantizeLinear", ["W2", "s", "z"], ["W2f"], name="dq"),
             helper.make_node("Gemm", ["h", "W2f"], ["out"], name="fc"),
             helper.make_node("ConvTranspose", ["y", "W3"], ["up"], name="up", group=2)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                                           helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 6]),
                               helper.make_tensor_value_info("up", TensorProto.FLOAT, [1, 6, 7, 7])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    facts = html_report.model_facts(tmp_path / "m.onnx")
    assert [(r["name"], r["weight"], r["channels"]) for r in facts["layers"]] == \
        [("mm", "W1", 4), ("fc", "W2", 6), ("up", "W3", 6)]
    assert facts["by_op"]["MatMul"]["params"] == 32 and facts["by_op"]["ConvTranspose"]["params"] == 108


def test_layers_match_by_weight_when_names_differ(run, tmp_path):
    """Node names gone: matched by weight name; weight renamed too: not matched, and the page says so."""
    proto = onnx.load(str(run / "r5.onnx"))
    for node in proto.graph.node:
        node.name = ""
    onnx.save(proto, tmp_path / "anon.onnx")
    target = next(t for t in proto.graph.initializer if t.name == "onnx::Conv_89")
    target.name = "renamed"
    for node in proto.graph.node:
        node.input[:] = ["renamed" if i == "onnx::Conv_89" else i for i in node.input]
    onnx.save(proto, tmp_path / "renamed.onnx")
    facts = [html_report.model_facts(p) for p in (run / "dense.onnx", tmp_path / "anon.onnx", tmp_path / "renamed.onnx")]
    table = html_report.layer_table(facts)
    assert [r["channels"][1] for r in table["rows"]] == [r["channels"][2] for r in table["rows"]][:6] + [32, 10]
    assert table["unmatched"] == [0, 0, 1]
    assert [r["channels"][2] for r in table["rows"]][6] is None
    page = html_report.render({**html_report.collect(run / "dense.onnx", [tmp_path / "renamed.onnx"]), "title": "t"})
    assert "not matched" in page and "renamed.onnx: 1" in page


@pytest.mark.parametrize("which", ["dense.onnx", "r5.onnx", "corpus"])
def test_breakdown_sums_to_totals(run, which):
    path = run / which if which != "corpus" else CORPUS_RESNET
    if not path.is_file():
        pytest.skip(f"corpus not found at {path}")
    facts = html_report.model_facts(path)
    totals = cost.summary(load(path))
    assert sum(v["params"] for v in facts["by_op"].values()) == totals["params"] == facts["params"]
    assert sum(v["macs"] for v in facts["by_op"].values()) == totals["macs"] == facts["macs"]
    if which != "corpus":
        assert set(facts["by_op"]) == {"Conv", "Gemm"}


def test_summary_against_dense(doc):
    rows = doc["summary"]
    assert rows[0]["params_x"] == rows[0]["macs_x"] == 1.0
    assert 1.0 > rows[1]["params_x"] > rows[2]["params_x"] > rows[3]["params_x"] > 0
    assert rows[2]["channels_removed"] == doc["layers"]["removed"][2]
    assert doc["models"] == ["dense.onnx (dense)", "r3.onnx", "r5.onnx", "r7.onnx"]
    assert [r["units"] for r in rows] == [1, 1, 1, 1]  # channel pruning keeps the residual units


def test_erased_units_are_counted(capsys, run, tmp_path):
    out = tmp_path / "erased.onnx"
    assert spa(capsys, "prune", run / "dense.onnx", "--erase", "1", "-o", out)[0] == 0
    assert html_report.model_facts(out)["units"] == 0 and html_report.model_facts(run / "dense.onnx")["units"] == 1


def test_fidelity_of_dense_to_itself_is_one(run):
    dense = run / "dense.onnx"
    x = np.random.default_rng(0).standard_normal((10, 3, 32, 32)).astype(np.float32)
    for arrays in (None, {"input": x}):
        fid = html_report.fidelity(dense, [dense, run / "r7.onnx"], arrays, samples=4)
        same, pruned = fid["models"]
        assert same["cosine"] == pytest.approx(1.0, abs=1e-9) and same["rel_err"] == 0.0
        assert same["samples"] == 4 and set(same["outputs"]) == {"output"}
        assert pruned["cosine"] < 0.999
    assert "random" in html_report.fidelity(dense, [dense])["inputs"]


def test_latency_matched_by_resolved_path(run, doc):
    lat = doc["latency"]
    assert lat["bench"] == str(run / "bench.json")
    assert {(r["index"], r["batch"]) for r in lat["rows"]} == {(k, b) for k in range(4) for b in (1, 8)}
    assert lat["unmatched"] == ["elsewhere.onnx"] and lat["missing"] == []
    r5 = next(r for r in lat["rows"] if r["index"] == 2 and r["batch"] == 8)
    assert r5["p50"] == pytest.approx(8 * 0.6) and r5["channels_removed"] == doc["layers"]["removed"][2]


def test_without_bench_the_page_says_how(run):
    doc = html_report.collect(run / "dense.onnx", [run / "r5.onnx"])
    assert doc["latency"]["bench"] is None
    assert "spa bench" in html_report.render(doc) and "--json &gt; bench.json" in html_report.render(doc)


@pytest.mark.parametrize("bad", [[], {"schema_version": 2, "models": [], "results": []},
                                 {"schema_version": 1, "models": []},
                                 {"schema_version": 1, "models": [{"label": "x"}], "results": []},
                                 {"schema_version": 1, "models": [], "results": [{"model": "m", "batch": 1,
                                                                                  "latency_ms": 3}]}])
def test_not_a_bench_file(tmp_path, bad):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(html_report.SpaError, match="not a spa bench file"):
        html_report.read_bench(path)


def test_page_is_one_escaped_file(doc):
    page = html_report.render({**doc, "title": "<script>alert(1)</script> & co"})
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
    assert page.count('<img alt="') == 5 and page.count("data:image/png;base64,") == 5
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert "spa report dense.onnx r3.onnx r5.onnx r7.onnx" in page


# ---------------------------------------------------------------- the command


def test_cli_writes_the_page_and_json(capsys, run, tmp_path):
    out = tmp_path / "report.html"
    rc, stdout, _ = spa(capsys, "report", run / "dense.onnx", run / "r5.onnx", "--bench", run / "bench.json",
                        "--title", "tiny", "-o", out, "--json")
    assert rc == 0 and out.is_file()
    got = json.loads(stdout)
    assert got["output"] == str(out) and got["title"] == "tiny" and got["schema_version"] == 1
    assert got["environment"]["command"].startswith("spa report ") and "--bench" in got["environment"]["command"]
    assert "<title>tiny</title>" in out.read_text()


def _untimed(doc: dict) -> dict:
    """The document without the time it was made."""
    return {**doc, "environment": {k: v for k, v in doc["environment"].items() if k != "date"}}


def test_api_document_is_the_commands(capsys, run, tmp_path):
    """spa.api.report.report without the CLI: the document `spa report --json` prints (the date
    aside) and the same page; in memory (no output=) the page is only in result.html."""
    from spa.api.report import report

    out = tmp_path / "report.html"
    rc, stdout, _ = spa(capsys, "report", run / "dense.onnx", run / "r5.onnx", "--bench", run / "bench.json",
                        "-o", out, "--json")
    assert rc == 0
    cli_doc = json.loads(stdout)
    page = out.read_text()
    result = report(str(run / "dense.onnx"), [str(run / "r5.onnx")], bench=str(run / "bench.json"),
                    command=cli_doc["environment"]["command"], output=out)
    assert _untimed(result.to_json()) == _untimed(cli_doc) and result.model is None
    assert result.html.replace(result["environment"]["date"], "") == page.replace(cli_doc["environment"]["date"], "")
    arrays = {"input": np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)}
    memory = report(run / "dense.onnx", run / "r5.onnx", data=arrays)
    assert memory["output"] is None and memory["fidelity"]["models"][0]["samples"] == 4
    assert memory.save(tmp_path / "again.html").read_text() == memory.html


def test_bad_samples_is_a_usage_error(capsys, run, tmp_path):
    from spa.api.report import report
    from spa.core.errors import UsageError

    with pytest.raises(UsageError, match="invalid samples=0"):
        report(run / "dense.onnx", run / "r5.onnx", samples=0)
    rc, stdout, stderr = spa(capsys, "report", run / "dense.onnx", run / "r5.onnx", "--samples", "0",
                             "-o", tmp_path / "r.html")
    assert rc == 2 and stdout == "" and "invalid --samples 0" in stderr and not (tmp_path / "r.html").exists()


def _bad_cases(run: Path, tmp: Path) -> dict:
    (tmp / "not.onnx").write_text("not a model")
    (tmp / "bench.json").write_text(json.dumps({"schema_version": 1, "rows": []}))
    np.savez(tmp / "data.npz", x=np.zeros((2, 3, 32, 32), np.float32))
    dense, r5 = run / "dense.onnx", run / "r5.onnx"
    return {"missing": ([dense, tmp / "nope.onnx"], "no such file"),
            "not-onnx": ([dense, tmp / "not.onnx"], "not a valid ONNX file"),
            "data-keys": ([dense, r5, "--data", tmp / "data.npz"], "no array for model input(s) ['input']"),
            "bench": ([dense, r5, "--bench", tmp / "bench.json"], "not a spa bench file"),
            "output-is-input": ([dense, r5, "-o", r5], "it is an input of the report")}


@pytest.mark.parametrize("case", ["missing", "not-onnx", "data-keys", "bench", "output-is-input"])
def test_bad_input_exits_1_with_one_line(capsys, run, tmp_path, case):
    args, why = _bad_cases(run, tmp_path)[case]
    out = tmp_path / "report.html"
    rc, stdout, stderr = spa(capsys, "report", *args, *(["-o", out] if "-o" not in args else []))
    assert rc == 1 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ") and why in stderr
    assert not out.exists() and not list(tmp_path.glob(".spa-tmp-*"))


def test_missing_matplotlib_names_the_extra(capsys, run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc, _, stderr = spa(capsys, "report", run / "dense.onnx", run / "r5.onnx", "-o", tmp_path / "r.html")
    assert rc == 1 and "pip install 'spa[plot]'" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()


# ---------------------------------------------------------------- the page in a browser

WIDTH, HEIGHT = 1200, 4000


def _browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def plot_bands(png: Path) -> list[tuple[int, int]]:
    """(top, bottom) rows of the screenshot's colour bands: the plots (the page's text and tables
    are grey and black; bars and lines are coloured)."""
    import matplotlib.image

    rgb = matplotlib.image.imread(str(png))[..., :3]
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.25
    bands: list = []
    for row in np.flatnonzero(coloured.sum(axis=1) > 3):
        if bands and row - bands[-1][1] <= 80:  # legend and bars of one plot
            bands[-1][1] = row
        else:
            bands.append([row, row])
    return [(int(a), int(b)) for a, b in bands]


@pytest.mark.skipif(_browser() is None and not os.environ.get("SPA_REQUIRE_CHROMIUM"),
                    reason="no chromium or chromium-browser on PATH")
def test_page_in_headless_chromium(capsys, run, tmp_path):
    assert _browser(), "SPA_REQUIRE_CHROMIUM is set (as .ci/run does) but no chromium is on PATH"
    page, png = tmp_path / "report.html", tmp_path / "report.png"
    rc, _, _ = spa(capsys, "report", *(run / n for n in ("dense.onnx", "r3.onnx", "r5.onnx", "r7.onnx")),
                   "--bench", run / "bench.json", "-o", page)
    assert rc == 0
    subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars",
                    f"--screenshot={png}", f"--window-size={WIDTH},{HEIGHT}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    import matplotlib.image

    rgb = matplotlib.image.imread(str(png))[..., :3]
    assert rgb.shape == (HEIGHT, WIDTH, 3)
    assert rgb.std() > 0.05 and (rgb < 0.5).any()  # not a blank page
    bands = plot_bands(png)
    assert len(bands) == 5, bands  # summary, channels, breakdown, fidelity, latency: each drawn
    assert all(b - a > 150 for a, b in bands), bands  # each a whole plot, not a stray coloured line
    assert bands[-1][1] < HEIGHT - 200  # the page ends on the screen: the environment is below the last plot
