"""Rendering of `spa report`'s page from the collected doc (spa/reporting/html.py): inline CSS,
matplotlib figures as base64 PNG, every text escaped; nothing but the doc is read.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

MANY_LAYERS = 60  # above this the per-layer chart drops per-bar labels
TOP_OPS = 8  # op types with their own colour in the breakdown chart


CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1d1d1d; max-width: 1100px; margin: 0 auto; padding: 1em 1.5em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; margin-top: 1.6em; }
a { color: #1d1d1d; } nav a { margin-right: 1em; } p.note { color: #555; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #d4d4d4; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
img { max-width: 100%; height: auto; display: block; margin: .4em 0; }
pre { background: #f4f4f4; padding: .6em; white-space: pre-wrap; word-break: break-all; }
code { background: #f4f4f4; padding: 0 .2em; } div.wide { overflow-x: auto; }
"""
SECTIONS = (("summary", "Summary"), ("layers", "Channels per layer"), ("breakdown", "Parameters and MACs per op type"),
            ("fidelity", "Fidelity vs the dense model"), ("latency", "Latency"), ("environment", "Environment"))


def render(doc: dict) -> str:
    """The page: one HTML document, every plot inline."""
    parts = [_summary_html(doc), _layers_html(doc), _breakdown_html(doc), _fidelity_html(doc), _latency_html(doc),
             _environment_html(doc)]
    nav = " ".join(f'<a href="#{key}">{esc(name)}</a>' for key, name in SECTIONS)
    lead = (f"{esc(doc['dense'])} (dense) and {len(doc['models']) - 1} compressed model(s); "
            f"made {esc(doc['environment']['date'])} by spa {esc(doc['environment']['spa'])}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(doc['title'])}</title><style>{CSS}</style></head>\n<body>\n<h1>{esc(doc['title'])}</h1>\n"
            f"<p class=\"note\">{lead}</p><nav>{nav}</nav>\n" + "\n".join(parts) + "\n</body></html>\n")


def esc(value) -> str:
    return html.escape(str(value))


def _section(key: str, intro: str, *body: str) -> str:
    title = dict(SECTIONS)[key]
    return f'<section id="{key}"><h2>{esc(title)}</h2><p class="note">{intro}</p>' + "".join(body) + "</section>"


def _table(header: list | None, rows: list, numeric: set = frozenset()) -> str:
    """`numeric`: indices of right-aligned columns; every cell escaped."""
    head = "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{esc(c)}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f'<div class="wide"><table>{head}<tbody>{body}</tbody></table></div>'


def _num(v, fmt: str = ",") -> str:
    return "-" if v is None else format(v, fmt)


def _si(n) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _img(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _figure(width: float = 10.5, height: float = 4.2, cols: int = 1):
    from matplotlib.figure import Figure  # no pyplot: no global backend state, headless (Agg)

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, [fig.add_subplot(1, cols, i + 1) for i in range(cols)]


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _at_shapes(doc: dict) -> str:
    """Where MACs are counted: "x 1x3x736x736 (--shape)", or every dynamic dim 1."""
    found = doc.get("input_shapes") or {}
    if doc.get("input_shapes_from") in (None, "model"):
        return "the model's declared input shapes, every dynamic dim counted as 1"
    dims = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in found.items() if v)
    return f"{dims} (from {'--shape' if doc['input_shapes_from'] == 'shape' else 'the data'})"


def _summary_html(doc: dict) -> str:
    rows = doc["summary"]
    labels = doc["models"]
    fig, (ax,) = _figure(height=3.2)
    metrics = (("file size", "bytes_x"), ("parameters", "params_x"), ("MACs", "macs_x"))
    width = 0.8 / len(rows)
    for k, (row, color) in enumerate(zip(rows, _colors(len(rows)))):
        values = [100 * (row[key] or 0) for _, key in metrics]
        bars = ax.bar(np.arange(len(metrics)) + (k - (len(rows) - 1) / 2) * width, values, width, color=color,
                      label=_short(labels[k], 32))
        ax.bar_label(bars, fmt="%.0f%%", fontsize=8, padding=1)
    ax.set_xticks(range(len(metrics)), [m for m, _ in metrics])
    ax.set(ylabel="% of the dense model", ylim=(0, 135), title="size, parameters and MACs relative to the dense model")
    ax.legend(fontsize="small", ncols=min(len(rows), 4), loc="upper center")
    table = _table(["model", "file bytes", "parameters", "MACs", "size x dense", "params x dense", "MACs x dense",
                    "channels removed", "residual units"],
                   [[labels[k], _num(r["bytes"]), _num(r["params"]), _num(r["macs"]), _num(r["bytes_x"], ".3f"),
                     _num(r["params_x"], ".3f"), _num(r["macs_x"], ".3f"), _num(r["channels_removed"], ".1%"),
                     _num(r.get("units"))] for k, r in enumerate(rows)], numeric=set(range(1, 9)))
    intro = ("Size on disk (with external data), parameters (floating-point weights, as spa.cost counts them: the "
             "integer weights of an INT8 model are not included) and multiply-accumulates of each model at "
             f"{esc(_at_shapes(doc))}; "
             "\"channels removed\" is the share of the output channels of DENSE's Conv/ConvTranspose/Gemm/MatMul "
             "layers that each model no longer has; \"residual units\" counts the erasable residual branches "
             "(docs/depth.md: fewer after spa prune --erase).")
    return _section("summary", intro, _img(fig, "summary chart"), table)


def _short(name: str, limit: int = 30) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def _layers_html(doc: dict) -> str:
    rows, labels = doc["layers"]["rows"], doc["models"]
    if not rows:
        return _section("layers", "DENSE has no Conv/ConvTranspose/Gemm/MatMul layer with a constant weight.")
    many = len(rows) > MANY_LAYERS
    fig, (ax,) = _figure(height=3.6 if many or len(rows) <= 12 else 4.4)
    width = (0.9 if many else 0.8) / len(labels)
    x = np.arange(len(rows))
    for k, color in enumerate(_colors(len(labels))):
        values = [r["channels"][k] or 0 for r in rows]
        ax.bar(x + (k - (len(labels) - 1) / 2) * width, values, width, color=color, label=_short(labels[k], 32),
               linewidth=0)
    if many:
        ax.set(xlabel=f"layer ({len(rows)}, in graph order)", xlim=(-1, len(rows)))
    else:
        few = len(rows) <= 12
        ax.set_xticks(x, [_short(r["name"]) for r in rows], rotation=25 if few else 90, fontsize=7 if few else 6,
                      ha="right" if few else "center")
    top = max((c or 0 for r in rows for c in r["channels"]), default=1)
    ax.set(ylabel="output channels", title="output channels per layer", ylim=(0, 1.25 * top))
    ax.legend(fontsize="small", ncols=min(len(labels), 4), loc="upper left")
    table = _table(["layer", "op", "weight", *labels],
                   [[r["name"], r["op"], r["weight"], *("not matched" if c is None else c for c in r["channels"])]
                    for r in rows], numeric=set(range(3, 3 + len(labels))))
    unmatched = [f"{labels[k]}: {n}" for k, n in enumerate(doc["layers"]["unmatched"]) if n]
    intro = ("Output channels of every Conv/ConvTranspose/Gemm/MatMul of DENSE with a constant weight (initializer "
             "or Constant), and of the same layer in each model (matched by node name, else by weight name).")
    if unmatched:
        intro += " Layers not found in a model (\"not matched\"): " + esc(", ".join(unmatched)) + "."
    body = f"<details><summary>table of {len(rows)} layers</summary>{table}</details>" if many else table
    return _section("layers", intro, _img(fig, "channels per layer chart"), body)


def _breakdown_html(doc: dict) -> str:
    ops, per_model, labels = doc["breakdown"]["ops"], doc["breakdown"]["models"], doc["models"]
    fig, axes = _figure(height=3.4, cols=2)
    shown = ops[:TOP_OPS]
    for ax, key in zip(axes, ("params", "macs")):
        bottom = np.zeros(len(labels))
        for op, color in zip([*shown, "other"], _colors(len(shown) + 1)):
            values = np.array([_op_sum(m, [op] if op != "other" else ops[TOP_OPS:], key) for m in per_model], float)
            if values.any():
                ax.bar(range(len(labels)), values, 0.6, bottom=bottom, color=color, label=op)
            bottom += values
        ax.set_xticks(range(len(labels)), [_short(n, 24) for n in labels], rotation=20, ha="right", fontsize=8)
        ax.yaxis.set_major_formatter(lambda v, _: _si(v))
        ax.set(title="parameters" if key == "params" else "MACs per sample")
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}  # one legend, both panels
    axes[1].legend(handles.values(), handles.keys(), fontsize="small", title="op type", loc="upper left",
                   bbox_to_anchor=(1.02, 1))
    header = ["op type", *(f"{label} {what}" for label in labels for what in ("params", "MACs"))]
    rows = [[op, *(_num(m.get(op, {}).get(key, 0)) for m in per_model for key in ("params", "macs"))] for op in ops]
    rows.append(["total", *(_num(_op_sum(m, ops, key)) for m in per_model for key in ("params", "macs"))])
    intro = ("Parameters are counted at the layer that uses them (through Q/DQ, Cast, Identity, Transpose); MACs "
             "per node, dynamic dims as 1. The totals are the summary's.")
    return _section("breakdown", intro, _img(fig, "breakdown chart"), _table(header, rows, set(range(1, len(header)))))


def _op_sum(costs: dict, ops: list, key: str) -> int:
    return sum(costs.get(op, {}).get(key, 0) for op in ops)


def _centred(n: int, least: int = 3) -> tuple:
    """x limits that keep fewer than `least` bars narrow and in the middle."""
    pad = max(least - n, 0) / 2
    return -0.5 - pad, n - 0.5 + pad


def _fidelity_html(doc: dict) -> str:
    fid, labels = doc["fidelity"], doc["models"][1:]
    fig, axes = _figure(height=3.0, cols=2)
    good = [(k, r) for k, r in enumerate(fid["models"]) if "error" not in r and r["cosine"] is not None]
    colors = _colors(len(labels) + 1)[1:]
    for ax, key, title in zip(axes, ("cosine", "rel_err"), ("cosine (lowest output)", "rel. error (highest output)")):
        bars = ax.bar(range(len(good)), [r[key] for _, r in good], 0.6, color=[colors[k] for k, _ in good])
        ax.bar_label(bars, fmt="%.3g", fontsize=8, padding=1)
        ax.set_xticks(range(len(good)), [_short(labels[k], 24) for k, _ in good], fontsize=8, rotation=15)
        ax.set(title=title, ylim=(0, max([1.0, *(r[key] * 1.15 for _, r in good)])), xlim=_centred(len(good)))
    rows = []
    for k, r in enumerate(fid["models"]):
        if "error" in r:
            rows.append([labels[k], "-", "-", "-", "-", f"cannot run: {r['error']}"])
        for name, o in (r.get("outputs") or {}).items():
            rows.append([labels[k], name, _num(o["cosine"], ".6f"), _num(o["rel_err"], ".4g"), _num(o["max_abs"], ".4g"),
                         r["samples"]])
    table = _table(["model", "output", "cosine", "rel. error", "max |diff|", "samples"], rows, {2, 3, 4, 5})
    intro = (f"Every float output of each model against DENSE's on the same inputs: {esc(fid['inputs'])}. "
             "Cosine of the flattened outputs (1 is identical), relative error ‖a − b‖ / ‖b‖, largest absolute "
             "difference.")
    return _section("fidelity", intro, _img(fig, "fidelity chart") if good else "", table)


def _latency_html(doc: dict) -> str:
    lat = doc["latency"]
    if lat["bench"] is None:
        return _section("latency", "No benchmark was given. Measure the models, then pass the file with "
                        "<code>--bench bench.json</code>:", f"<pre>{esc(lat['hint'])}</pre>")
    labels = doc["models"]
    runs = [r for r in lat["rows"] if r["p50"] is not None and r["channels_removed"] is not None]
    plot = _latency_plot(runs, labels, [r["macs_x"] for r in doc["summary"]]) if runs else ""
    table = _table(["model", "batch", "p50 ms", "p90 ms", "p99 ms", "throughput /s", "speed-up"],
                   [[labels[r["index"]], r["batch"], *(_num(r[p], ".3f") for p in ("p50", "p90", "p99")),
                     _num(r["throughput"], ",.1f"), _num(r["speedup"], ".2f") + ("x" if r["speedup"] else "")]
                    if not r["skipped"] else [labels[r["index"]], r["batch"], f"skipped: {r['skipped']}", "", "", "", ""]
                    for r in lat["rows"]], {1, 2, 3, 4, 5, 6})
    env = lat["environment"]
    intro = (f"From {esc(lat['bench'])} (backend {esc(lat['backend'])}; "
             + esc(", ".join(f"{k} {v}" for k, v in env.items() if not isinstance(v, (dict, list)))) + "). "
             "Speed-up is against the first model of the bench at the same batch size.")
    notes = "".join(f"<p class=\"note\">{esc(what)}: {esc(', '.join(items))}</p>" for what, items in
                    (("In the bench but not in this report", lat["unmatched"]),
                     ("In this report but not in the bench", lat["missing"])) if items)
    return _section("latency", intro, plot, table, notes)


def _latency_plot(runs: list, labels: list, macs_x: list) -> str:
    fig, (ax, right) = _figure(height=3.4, cols=2)
    batches = sorted({r["batch"] for r in runs})
    for batch, color in zip(batches, _colors(len(batches))):
        pts = sorted((r["channels_removed"], r["p50"], r["p90"], r["index"]) for r in runs if r["batch"] == batch)
        xs, p50, p90 = (np.array([p[i] for p in pts], float) for i in range(3))
        ax.errorbar(100 * xs, p50, yerr=[np.zeros_like(p50), p90 - p50], marker="o", capsize=3, color=color,
                    label=f"batch {batch}")
        speed = sorted((r["channels_removed"], r["speedup"]) for r in runs if r["batch"] == batch and r["speedup"])
        right.plot([100 * x for x, _ in speed], [v for _, v in speed], marker="o", color=color, label=f"batch {batch}")
        for x, y, _, k in pts if batch == batches[-1] else ():  # names once, on the slowest line
            ax.annotate(_short(labels[k], 24), (100 * x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel="% of output channels removed", ylabel="ms", title="p50 latency (bar up to p90)", ylim=(0, None))
    ax.legend(fontsize="small")
    ideal = sorted({(r["channels_removed"], 1 / macs_x[r["index"]]) for r in runs if macs_x[r["index"]]})
    right.plot([100 * x for x, _ in ideal], [v for _, v in ideal], "k--", lw=1, label="ideal (MACs)")
    right.set(xlabel="% of output channels removed", ylabel="x", title="speed-up vs the bench's first model",
              ylim=(0, None))
    right.legend(fontsize="small")
    return _img(fig, "latency chart")


def _environment_html(doc: dict) -> str:
    env = dict(doc["environment"])
    command = env.pop("command", None)
    body = _table(None, [[k, v] for k, v in env.items()])
    return _section("environment", "Where and when this page was made.", body,
                    f"<p>Command:</p><pre>{esc(command)}</pre>" if command else "")
