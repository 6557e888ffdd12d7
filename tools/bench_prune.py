#!/usr/bin/env python3
"""Time and peak memory of `spa prune` versus a plain onnx.load + onnx.save.

    spa prune MODEL --ratio R -o OUT              (default output check in ONNX Runtime)
    spa prune MODEL --ratio R -o OUT --no-check
    python -c 'onnx.save(onnx.load(MODEL), OUT)'  (the floor: read + write the same model)

Every measured operation runs in a fresh subprocess; wall time is taken around the
process (interpreter start and imports included) and peak memory is that process's
RSS high-water mark (`ru_maxrss` from `os.wait4` on exactly that child, so runs never
mix). The three commands are interleaved within each repeat to cancel drift; the
tables report the median of the repeats and the ratios prune / load+save (target
<= 2x). `spa prune` prints each step's seconds on stderr; those are parsed into a
per-step breakdown ("outside steps" = interpreter start, imports, the final report).

Models: the Caffe2 ResNet-50 rebuilt from the corpus "light" file (cached in
--cache-dir), the rehydrated DenseNet-121 and Inception-v1 from the corpus, and with
--big a synthetic VGG-like stack of wide 3x3 Convs with just over 2 GB of weights,
stored as external data, so the >2 GB load/save path is exercised.

usage:
    python tools/bench_prune.py --cache-dir /tmp/spa-bench-cache --out-dir /tmp/spa-bench-out
    python tools/bench_prune.py ... --big          # adds the >2 GB model (~2.3 GB disk x2, ~10 GB RAM)

Markdown tables go to stdout, progress to stderr, raw numbers to OUT_DIR/bench_prune.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import busy_cpu_s, loadavg, own_cpu_s

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO.parent / "shared" / "corpus"
TWO_GB = 2**31 - 1
STEP_LINE = re.compile(r"^(?P<step>[^:\n]+): (?P<secs>[0-9]+\.[0-9]+) s$")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

LOAD_SAVE = r"""
import os, sys, time, json
t0 = time.perf_counter()
import onnx
t1 = time.perf_counter()
model = onnx.load(sys.argv[1])
t2 = time.perf_counter()
out = sys.argv[2]
big = sum(len(t.raw_data) for t in model.graph.initializer) >= 2**31 - 1
if big:
    onnx.save(model, out, save_as_external_data=True, all_tensors_to_one_file=True,
              location=os.path.basename(out) + ".data", size_threshold=1024)
else:
    onnx.save(model, out)
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "save": t3 - t2}))
"""


class BenchError(Exception):
    """A missing input or a failed command: one line for the user, exit 1."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- measuring


def vm_rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def trace_rss(pid: int, err_path: Path, samples: list, stop: threading.Event, every: float = 0.05) -> None:
    """Sample the child's VmRSS with the number of step lines it has printed so far, so
    each sample can be charged to the step running at that moment (a step's line is
    printed when it ends)."""
    while not stop.is_set():
        rss = vm_rss_mib(pid)
        if rss is not None:
            try:
                done = sum(1 for ln in ANSI.sub("", err_path.read_text()).splitlines() if STEP_LINE.match(ln.strip()))
            except OSError:
                done = 0
            samples.append((done, rss))
        stop.wait(every)


def measure(cmd: list[str], log_path: Path, timeout: float, trace: bool = False) -> dict:
    """Run `cmd` in a fresh process; wall seconds, peak RSS (MiB), stdout, stderr.

    The peak is `ru_maxrss` of exactly this child (os.wait4). With `trace`, VmRSS is also
    sampled every 50 ms and charged to the step running at the time (see `trace_rss`).
    """
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1", TERM="dumb", PYTHONUNBUFFERED="1",
               SPA_PROGRESS="live")  # step lines as they happen: the RSS samples are charged to them
    samples: list = []
    err_path = log_path.with_suffix(".err")
    with open(log_path.with_suffix(".out"), "w") as out, open(err_path, "w") as err:
        busy0, own0 = busy_cpu_s(), own_cpu_s()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO)
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        stop = threading.Event()
        sampler = threading.Thread(target=trace_rss, args=(proc.pid, err_path, samples, stop), daemon=True)
        if trace:
            sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        child_cpu = usage.ru_utime + usage.ru_stime
        other = max(busy_cpu_s() - busy0 - child_cpu - (own_cpu_s() - own0), 0.0) / wall
        killer.cancel()
        stop.set()
        if trace:
            sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = log_path.with_suffix(".out").read_text()
    stderr = ANSI.sub("", log_path.with_suffix(".err").read_text())
    if proc.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        why = f"killed after {timeout:.0f} s" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise BenchError(f"command failed ({why}): {' '.join(cmd)}\n{tail}")
    return {"wall_s": wall, "cpu_s": child_cpu, "other_cores": other, "rss_mib": usage.ru_maxrss / 1024,
            "stdout": stdout, "stderr": stderr,
            "rss_samples": samples}


def peak_by_step(samples: list, steps: list[str]) -> dict[str, float]:
    """Highest sampled VmRSS while each step ran; 'after the last step' = the final report."""
    names = steps + ["after the last step"]
    peaks: dict[str, float] = {}
    for done, rss in samples:
        name = names[min(done, len(names) - 1)]
        peaks[name] = max(peaks.get(name, 0.0), rss)
    return peaks


def spa_steps(stderr: str) -> dict[str, float]:
    steps = {}
    for line in stderr.splitlines():
        m = STEP_LINE.match(line.strip())
        if m:
            steps[m["step"]] = float(m["secs"])
    return steps


def remove_output(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)


def spa_command() -> list[str]:
    exe = shutil.which("spa")
    return [exe] if exe else [sys.executable, "-m", "spa.cli"]


def bench_model(name: str, path: Path, args, out_dir: Path) -> dict:
    """Interleave load+save, prune, prune --no-check; `repeats` times each."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.split(" ")[0])
    out = out_dir / f"{slug}.out.onnx"
    spa = spa_command()
    commands = {
        "load+save": [sys.executable, "-c", LOAD_SAVE, str(path), str(out)],
        "prune": spa + ["prune", str(path), "--ratio", str(args.ratio), "-o", str(out)],
        "prune --no-check": spa + ["prune", str(path), "--ratio", str(args.ratio), "-o", str(out), "--no-check"],
    }
    runs: dict[str, list[dict]] = {k: [] for k in commands}
    for rep in range(args.repeats):
        for kind, cmd in commands.items():
            log(f"  [{name}] {kind}, run {rep + 1}/{args.repeats} ...")
            tag = kind.replace(" ", "").replace("+", "_").replace("--", "_")
            r = measure(cmd, out_dir / f"{slug}.{tag}.{rep}", args.timeout, trace=kind != "load+save")
            r["out_bytes"] = out.stat().st_size + (out.with_name(out.name + ".data").stat().st_size
                                                   if out.with_name(out.name + ".data").exists() else 0)
            r["steps"] = json.loads(r["stdout"]) if kind == "load+save" else spa_steps(r["stderr"])
            r["report"] = [ln for ln in r["stderr"].splitlines() if ln.startswith("output check")] + \
                          [ln for ln in r["stdout"].splitlines() if ln.startswith(("output check", "pruned "))]
            if kind != "load+save":
                r["rss_by_step"] = peak_by_step(r.pop("rss_samples"), list(r["steps"]))
            r.pop("rss_samples", None)
            runs[kind].append(r)
            log(f"    {r['wall_s']:.2f} s, peak RSS {r['rss_mib']:.0f} MiB, other processes {r['other_cores']:.2f} cores")
            remove_output(out)
    return {"model": name, "path": str(path), "bytes": model_bytes(path), "runs": runs}


def model_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def startup_overhead(args, out_dir: Path) -> dict:
    """Interpreter start + imports alone: `spa --version` and `python -c 'import onnx'`."""
    res = {}
    for kind, cmd in (("spa --version", spa_command() + ["--version"]),
                      ("import spa.cli", [sys.executable, "-c", "import spa.cli"]),
                      ("import onnx", [sys.executable, "-c", "import onnx"])):
        walls, rss = [], []
        for rep in range(args.repeats):
            r = measure(cmd, out_dir / f"startup.{kind.replace(' ', '_')}.{rep}", args.timeout)
            walls.append(r["wall_s"])
            rss.append(r["rss_mib"])
        res[kind] = {"wall_s": statistics.median(walls), "rss_mib": statistics.median(rss)}
        log(f"  startup {kind}: {res[kind]['wall_s']:.2f} s, {res[kind]['rss_mib']:.0f} MiB")
    return res




# ---------------------------------------------------------------- models


def corpus_models(corpus: Path, cache: Path) -> list[tuple[str, Path]]:
    tool = corpus / "tools" / "rehydrate_light.py"
    light = corpus / "real" / "onnx-light" / "light_resnet50.onnx"
    rehydrated = corpus / "real" / "onnx-light-rehydrated"
    needed = [tool, light, rehydrated / "densenet121_rehydrated.onnx", rehydrated / "inception_v1_rehydrated.onnx"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise BenchError(f"missing corpus file(s): {', '.join(missing)}. Hint: pass --corpus DIR "
                         "(the folder holding real/ and tools/)")
    resnet = cache / "resnet50_rehydrated.onnx"
    if not resnet.exists():
        log(f"building {resnet} from {light} (corpus tool, seed 0) ...")
        tmp = resnet.with_name(resnet.name + ".tmp")
        proc = subprocess.run([sys.executable, str(tool), str(light), str(tmp), "--seed", "0"],
                              check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BenchError(f"rehydrate_light.py failed for {light}: {proc.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, resnet)
    return [("resnet50 (Caffe2, rehydrated)", resnet),
            ("densenet121 (rehydrated)", rehydrated / "densenet121_rehydrated.onnx"),
            ("inception_v1 (rehydrated)", rehydrated / "inception_v1_rehydrated.onnx")]


def big_model(cache: Path, width: int, layers: int, hw: int) -> Path:
    """A VGG-like stack of width x width 3x3 Convs, weights as external data (built once)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    path = cache / f"vgg_big_w{width}_l{layers}.onnx"
    data = path.with_name(path.name + ".data")
    if path.exists() and data.exists():
        return path
    need = (layers * width * width * 9 + 3 * width * 9 + width * 1000) * 4
    if shutil.disk_usage(cache).free < need * 3.5:
        raise BenchError(f"not enough disk in {cache} for the --big model: need ~{need * 3.5 / 2**30:.1f} GiB "
                         "(model + two outputs at a time)")
    log(f"building {path} ({need / 1e9:.2f} GB of float32 weights, external data) ...")
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    offset = 0
    tmp_data = data.with_name(data.name + ".tmp")

    def weight(f, name: str, shape: list[int], std: float) -> None:
        nonlocal offset
        arr = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)) if std else np.zeros(shape, np.float32)
        raw = arr.tobytes()
        f.write(raw)
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        inits.append(t)
        offset += len(raw)

    with open(tmp_data, "wb") as f:
        x, cin = "input", 3
        for i in range(layers + 1):
            cout = width
            weight(f, f"conv{i}.weight", [cout, cin, 3, 3], (2.0 / (cin * 9)) ** 0.5)
            weight(f, f"conv{i}.bias", [cout], 0.0)
            nodes.append(helper.make_node("Conv", [x, f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}"],
                                          name=f"Conv_{i}", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
            nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"Relu_{i}"))
            x, cin = f"relu{i}", cout
            log(f"  layer {i + 1}/{layers + 1} written ({offset / 1e9:.2f} GB)")
        weight(f, "fc.weight", [1000, width], (1.0 / width) ** 0.5)
        weight(f, "fc.bias", [1000], 0.0)
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], name="GlobalAveragePool_0"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="Flatten_0", axis=1),
              helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["output"], name="Gemm_0", transB=1)]
    graph = helper.make_graph(
        nodes, "vgg_big",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, hw, hw])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="spa tools/bench_prune.py")
    os.replace(tmp_data, data)
    onnx.save_model(model, str(path))  # tensors already point at the .data file
    onnx.checker.check_model(str(path))
    log(f"  {path}: {offset / 1e9:.2f} GB in {data.name}")
    return path


# ---------------------------------------------------------------- report


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def med_step(runs: list[dict], step: str) -> float:
    return statistics.median(r["steps"].get(step, 0.0) for r in runs)


def tables(results: list[dict], startup: dict, args) -> str:
    lines = [f"### Wall time (s, median of {args.repeats}; each run a fresh process)", "",
             "| model | size MB | load+save | prune | prune --no-check | prune / load+save | no-check / load+save |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        r = res["runs"]
        ls, p, pn = med(r["load+save"], "wall_s"), med(r["prune"], "wall_s"), med(r["prune --no-check"], "wall_s")
        lines.append(f"| {res['model']} | {res['bytes'] / 1e6:.0f} | {ls:.2f} | {p:.2f} | {pn:.2f} | "
                     f"**{p / ls:.2f}x** | **{pn / ls:.2f}x** |")
    worst = max(x["other_cores"] for res in results for v in res["runs"].values() for x in v)
    mean = statistics.mean(x["other_cores"] for res in results for v in res["runs"].values() for x in v)
    lines += ["", (f"Other processes used {mean:.2f} cores on average (worst run {worst:.2f}) while the commands "
              "above ran (from /proc/stat).")]
    lines += ["", (f"### CPU time, user + sys (s, median of {args.repeats}; less sensitive than wall time to "
              "other load on the machine)"), "",
              "| model | load+save | prune | prune --no-check | prune / load+save | no-check / load+save |",
              "|---|---:|---:|---:|---:|---:|"]
    for res in results:
        r = res["runs"]
        ls, p, pn = med(r["load+save"], "cpu_s"), med(r["prune"], "cpu_s"), med(r["prune --no-check"], "cpu_s")
        lines.append(f"| {res['model']} | {ls:.2f} | {p:.2f} | {pn:.2f} | {p / ls:.2f}x | {pn / ls:.2f}x |")
    lines += ["", f"### Peak RSS (MiB, median of {args.repeats})", "",
              "| model | load+save | prune | prune --no-check | prune / load+save | no-check / load+save |",
              "|---|---:|---:|---:|---:|---:|"]
    for res in results:
        r = res["runs"]
        ls, p, pn = med(r["load+save"], "rss_mib"), med(r["prune"], "rss_mib"), med(r["prune --no-check"], "rss_mib")
        lines.append(f"| {res['model']} | {ls:.0f} | {p:.0f} | {pn:.0f} | **{p / ls:.2f}x** | **{pn / ls:.2f}x** |")
    lines += ["", "### In-process time (s, median): work inside the process, interpreter start and imports excluded",
              "", ("| model | onnx.load | onnx.save | load+save | spa steps (prune) | spa steps (--no-check) "
              "| prune / load+save | no-check / load+save |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        r = res["runs"]
        load, save = med_step(r["load+save"], "load"), med_step(r["load+save"], "save")
        ls = statistics.median(x["steps"]["load"] + x["steps"]["save"] for x in r["load+save"])
        p = statistics.median(sum(x["steps"].values()) for x in r["prune"])
        pn = statistics.median(sum(x["steps"].values()) for x in r["prune --no-check"])
        lines.append(f"| {res['model']} | {load:.2f} | {save:.2f} | {ls:.2f} | {p:.2f} | {pn:.2f} | "
                     f"{p / ls:.2f}x | {pn / ls:.2f}x |")
    steps = []
    for res in results:
        for x in res["runs"]["prune"]:
            steps += [s for s in x["steps"] if s not in steps]
    lines += ["", "### `spa prune` (with check) step breakdown (s, median; from the step lines on stderr)", "",
              "| model | " + " | ".join(steps) + " | outside steps | total wall |",
              "|---|" + "---:|" * (len(steps) + 2)]
    for res in results:
        r = res["runs"]["prune"]
        outside = statistics.median(x["wall_s"] - sum(x["steps"].values()) for x in r)
        lines.append(f"| {res['model']} | " + " | ".join(f"{med_step(r, s):.2f}" for s in steps) +
                     f" | {outside:.2f} | {med(r, 'wall_s'):.2f} |")
    lines += ["", ("### `spa prune` (with check): highest sampled RSS while each step ran (MiB, median; "
              "VmRSS every 50 ms; the first step also covers interpreter start and imports)"), "",
              "| model | " + " | ".join(steps) + " | after the last step | ru_maxrss |",
              "|---|" + "---:|" * (len(steps) + 2)]
    for res in results:
        r = res["runs"]["prune"]
        cells = [statistics.median(x["rss_by_step"].get(s, 0.0) for x in r) for s in steps + ["after the last step"]]
        lines.append(f"| {res['model']} | " + " | ".join(f"{c:.0f}" for c in cells) + f" | {med(r, 'rss_mib'):.0f} |")
    lines += ["", "### Fixed cost of a fresh process (median)", "", "| command | wall s | peak RSS MiB |",
              "|---|---:|---:|"]
    for kind, v in startup.items():
        lines.append(f"| `{kind}` | {v['wall_s']:.2f} | {v['rss_mib']:.0f} |")
    lines += ["", "Output check reported by `spa prune` (last run):", ""]
    for res in results:
        rep = res["runs"]["prune"][-1]["report"]
        lines.append(f"- {res['model']}: " + ("; ".join(rep) if rep else "(no check line)") +
                     f"; output {res['runs']['prune'][-1]['out_bytes'] / 1e6:.0f} MB")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--cache-dir", required=True, type=Path, help="where built models are kept between runs")
    p.add_argument("--out-dir", required=True, type=Path, help="where outputs, logs and bench_prune.json go")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help=f"corpus folder (default {DEFAULT_CORPUS})")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--big", action="store_true", help="add the synthetic >2 GB model (needs ~7 GB disk, ~10 GB RAM)")
    p.add_argument("--big-only", action="store_true", help="only the >2 GB model (implies --big)")
    p.add_argument("--big-width", type=int, default=2048, help="channels of the --big model's convs")
    p.add_argument("--big-layers", type=int, default=15, help="width x width convs in the --big model")
    p.add_argument("--big-hw", type=int, default=8, help="input height/width of the --big model")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a measured command is killed")
    args = p.parse_args(argv)
    try:
        for d in (args.cache_dir, args.out_dir):
            d.mkdir(parents=True, exist_ok=True)
        import onnx  # noqa: F401 - fail early with a clear message
        models = [] if args.big_only else corpus_models(args.corpus, args.cache_dir)
        if args.big or args.big_only:
            models.append(("vgg_big (synthetic, external data)",
                           big_model(args.cache_dir, args.big_width, args.big_layers, args.big_hw)))
        load_before = loadavg()
        log(f"load average {load_before}; startup overhead ...")
        startup = startup_overhead(args, args.out_dir)
        results = []
        for name, path in models:
            log(f"{name}: {path}")
            results.append(bench_model(name, path, args, args.out_dir))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:
        print(f"error: {exc}. Hint: pip install -e . (from {REPO})", file=sys.stderr)
        return 1
    (args.out_dir / "bench_prune.json").write_text(json.dumps(
        {"ratio": args.ratio, "repeats": args.repeats, "startup": startup,
         "results": [{**r, "runs": {k: [{kk: vv for kk, vv in x.items() if kk not in ("stdout", "stderr")}
                                          for x in v] for k, v in r["runs"].items()}} for r in results]}, indent=1))
    print(f"Load average before / after: {load_before} / {loadavg()}\n")
    print(tables(results, startup, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
