"""Output parity of two sessions (two models, or one model on two backends) on the same inputs.

    batches ─session A─▶ outputs A ┐
            ─session B─▶ outputs B ┴─ per output: max |a-b|, max |a-b|/|b|, cosine, rel. error,
                                      elements outside |a-b| <= atol + rtol*|b| (numpy.allclose's rule)

An output passes when no element is outside the tolerance (and its cosine is at least
min_cosine when one is asked for); integer and bool outputs must be equal. Outputs are matched
by name; when the two sides share no name but have as many outputs, by position (said in the notes).
"""

from __future__ import annotations

import numpy as np

from spa.core.checks import Fidelity
from spa.core.data import samples_in, trim
from spa.core.errors import SpaError
from spa.core.runtime import ort_reason


class _Output:
    def __init__(self):
        self.fid = Fidelity()
        self.max_rel = 0.0
        self.outside = 0
        self.elements = 0
        self.problem = None

    def add(self, a: np.ndarray, b: np.ndarray, atol: float, *, rtol: float) -> None:
        if a.shape != b.shape:
            self.problem = f"shapes differ: {list(a.shape)} vs {list(b.shape)}"
            return
        self.elements += a.size
        if a.dtype.kind not in "fc" or b.dtype.kind not in "fc":
            self.outside += int((a != b).sum())
            return
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        with np.errstate(invalid="ignore"):  # inf - inf, and atol=inf (a cosine-only gate)
            d = np.abs(a64 - b64)
            ok = (d <= atol + rtol * np.abs(b64)) | (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
            rel = d / np.maximum(np.abs(b64), 1e-12)
        self.outside += int((~ok).sum())
        if rel.size and not np.isnan(rel).all():
            self.max_rel = max(self.max_rel, float(np.nanmax(rel)))
        self.fid.add(a, b)

    def result(self, min_cosine: float | None) -> dict:
        if self.problem:
            return {"pass": False, "reason": self.problem}
        r = self.fid.result() if self.fid.aa or self.fid.bb else {}
        r.update(max_rel=self.max_rel, elements=self.elements, outside_tolerance=self.outside)
        ok = self.outside == 0 and (min_cosine is None or r.get("cosine", 1.0) >= min_cosine)
        r["pass"] = bool(ok)
        return r


def _run(sess, feeds: dict, name: str) -> dict:
    try:
        return sess.run(feeds)
    except SpaError:
        raise
    except Exception as exc:  # noqa: BLE001 - a runtime's own run errors, as one line
        raise SpaError(f"model '{name}' does not run on the inputs: {ort_reason(exc)}") from None


def pairs(names_a: list, names_b: list) -> tuple:
    """[(name in A, name in B)] and a note when matched by position."""
    common = [n for n in names_a if n in names_b]
    if common:
        return [(n, n) for n in common], None
    if len(names_a) == len(names_b):
        return list(zip(names_a, names_b)), "no output names in common: outputs matched by position"
    return [], f"no output names in common ({names_a} vs {names_b})"


def compare(sess_a, sess_b, batches, *, atol: float, rtol: float, min_cosine: float | None = None,
            names: tuple = ("A", "B")) -> dict:
    """Run every feed dict of `batches` through both sessions; per-output parity and the verdict.
    A session that fails to run is a SpaError naming its model (`names`) with the runtime's reason."""
    matched, note = pairs([o.name for o in sess_a.outputs], [o.name for o in sess_b.outputs])
    acc = {a: _Output() for a, _ in matched}
    samples = 0
    for feeds in batches:
        out_a, out_b = trim(_run(sess_a, feeds, names[0]), feeds), trim(_run(sess_b, feeds, names[1]), feeds)
        for a, b in matched:
            acc[a].add(np.asarray(out_a[a]), np.asarray(out_b[b]), atol, rtol=rtol)
        samples += samples_in(feeds)
    outputs = {a: acc[a].result(min_cosine) for a, _ in matched}
    return {"samples": samples, "outputs": outputs, "notes": [note] if note else [],
            "pass": bool(matched) and all(o["pass"] for o in outputs.values())}
