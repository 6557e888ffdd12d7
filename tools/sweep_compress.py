"""`spa compress --ratio R --sparsify 2:4 --int8` over every corpus model: works or refuses.

    python tools/sweep_compress.py [--ratio 0.3] [--corpus DIR] [--markdown]

Calibration data per model: the random feeds of tests/oracles.feeds_for, four copies along
the first axis. Each model runs in this process through `spa.cli.app` (exactly the command
line); the outcome is ok (with the stages' sizes and the INT8 stage's fidelity on the
calibration samples) or the one-line error of the stage that refused. Anything else (an
internal error) is a bug. Not run in CI (minutes); the suite runs a few corpus models.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    import spa
    from spa.cli.app import main as spa_main
    from tests.conftest import CORPUS, corpus_entries
    from tests.oracles import feeds_for

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--start", type=int, default=0, metavar="K", help="skip the first K models (resume a sweep)")
    args = ap.parse_args(argv)
    rows, bugs = [], 0
    with tempfile.TemporaryDirectory(prefix="spa-sweep-") as tmp:
        for entry in corpus_entries()[args.start:]:
            start = time.perf_counter()
            src = CORPUS / entry["file"]
            feeds = feeds_for(spa.load(src), entry)
            calib = Path(tmp) / "calib.npz"
            np.savez(calib, **{k: np.concatenate([v] * 4) if v.ndim else v for k, v in feeds.items()})
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = spa_main(["compress", str(src), "--ratio", str(args.ratio), "--sparsify", "2:4", "--int8",
                                 "--calib", str(calib), "-o", str(Path(tmp) / "out.onnx"), "--json"])
            line = [x for x in err.getvalue().splitlines() if x.startswith("error:")]
            if code == 0:
                doc = json.loads(out.getvalue())
                st = doc["stages"]
                sizes = " -> ".join(f"{s['stage']} {s['bytes'] / st[0]['bytes']:.2f}x" for s in st[1:])
                fid = st[-1].get("calib") or {}
                cos = f"cosine {fid['cosine']:.4f}" if fid.get("cosine") is not None else \
                    f"fidelity not measured ({fid.get('error', 'no outputs')})"
                outcome = f"ok: {sizes}, {cos}"
            else:
                outcome = f"refused (exit {code}): {line[0][7:] if line else '?'}"
                bugs += "internal error" in outcome
            rows.append((entry["file"], outcome, time.perf_counter() - start))
            print(f"{entry['file']}: {outcome} ({rows[-1][2]:.1f} s)", file=sys.stderr, flush=True)
    ok = sum(r[1].startswith("ok") for r in rows)
    if args.markdown:
        print("| model | outcome | s |\n|---|---|---|")
        for f, o, s in rows:
            print(f"| {f} | {o.replace('|', '/')} | {s:.1f} |")
    print(f"\n{ok} of {len(rows)} compressed, {len(rows) - ok - bugs} refused with a reason, {bugs} internal errors")
    return 1 if bugs else 0


if __name__ == "__main__":
    sys.exit(main())
