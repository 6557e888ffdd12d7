"""Activation statistics of the channel spaces that weights read.

    calibration data ─ONNX Runtime (extra outputs)─▶ per space: mean, E[x xᵀ], E|x|, P(x = 0)
    the graph alone  ─spa.moments (BatchNorm/LayerNorm statistics, weights)─▶ mean, E[x xᵀ]

A space is `(tensor, axis)`: statistics are taken along `axis`, every other axis (batch,
spatial, sequence) counts as samples. Criteria that need data (`obspa`, `mean-act`, `apoz`)
get a `Stats` and never see op types; compensation (spa.obspa) uses the same second moments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spa.core.data import Batch, as_batches, fixed_batch_size, model_batches, require_keys, samples_in, trim
from spa.core.errors import SpaError
from spa.core.runtime import ort_reason, session_with_outputs
from spa.scoring import moments
from spa.scoring.moments import GRAM_MAX, Moments


@dataclass
class Stats:
    source: str  # "calibration" or "data-free"
    spaces: dict = field(default_factory=dict)  # space -> Moments
    samples: int = 0
    notes: list = field(default_factory=list)  # what a criterion could not use, one line each
    fell_back: list = field(default_factory=list)  # ids of the groups a criterion scored by l1 instead
    fallback_notes: list = field(default_factory=list)  # their notes (a summary replaces them)

    def get(self, space) -> Moments | None:
        return self.spaces.get(space)

    def note(self, line: str) -> None:
        if line not in self.notes:
            self.notes.append(line)


def read_spaces(analysis, groups=None) -> list:
    """The activation spaces read by the "in" members of `groups` (default: the prunable ones)."""
    groups = [g for g in analysis.groups if g.prunable] if groups is None else groups
    seen = {}
    for g in groups:
        for m in g.members:
            if m.role == "in" and m.reads is not None:
                seen.setdefault(m.reads, None)
    return list(seen)


class _Accumulator:
    """Running sums of one space. The products of a batch are taken in float32 (BLAS sgemm, half the
    memory of float64) and summed across batches in float64."""

    def __init__(self, d: int, paired: bool = False):
        self.cross = np.zeros((d, d)) if paired and d <= GRAM_MAX else None
        self.ref_sum = np.zeros(d) if paired else None
        self.ref_sq = np.zeros(d) if paired else None
        self.n = 0
        self.sum = np.zeros(d)
        self.sq = np.zeros(d)
        self.abs = np.zeros(d)
        self.zeros = np.zeros(d)
        self.gram = np.zeros((d, d)) if d <= GRAM_MAX else None

    def add(self, rows: np.ndarray, ref: np.ndarray | None = None) -> None:
        if self.cross is not None:
            self.cross += ref.T @ rows
        if self.ref_sum is not None:
            self.ref_sum += ref.sum(0, dtype=np.float64)
            self.ref_sq += np.einsum("ij,ij->j", ref, ref, dtype=np.float64)
        self.n += len(rows)
        self.sum += rows.sum(0, dtype=np.float64)
        self.sq += np.einsum("ij,ij->j", rows, rows, dtype=np.float64)
        self.abs += np.abs(rows).sum(0, dtype=np.float64)
        self.zeros += (rows == 0).sum(0)
        if self.gram is not None:
            self.gram += rows.T @ rows

    def result(self) -> Moments:
        n = max(self.n, 1)
        gram = None if self.gram is None else self.gram / n
        cross = None if self.cross is None else self.cross / n
        ref_mean = None if self.ref_sum is None else self.ref_sum / n
        ref_sq = None if self.ref_sq is None else self.ref_sq / n
        return Moments(self.sum / n, gram, self.sq / n, self.abs / n, self.zeros / n, cross, ref_mean, ref_sq)


def _rows(array: np.ndarray, axis: int, pick: np.ndarray | None = None) -> np.ndarray:
    """(rows, channels) of `array` along `axis`, float32 (float64 stays); `pick`: only these flat
    row indices (gathered without copying the whole tensor)."""
    moved = np.moveaxis(np.asarray(array), axis, -1)
    dtype = np.result_type(moved.dtype, np.float32)
    if pick is not None:
        return moved[np.unravel_index(pick, moved.shape[:-1])].astype(dtype, copy=False)
    return moved.reshape(-1, array.shape[axis]).astype(dtype, copy=False)


def _pick(shape: tuple, axis: int, cap: int | None, rng) -> np.ndarray | None:
    """A random subset of `cap` rows (positions x samples) of a tensor, or None to take them all."""
    n = int(np.prod(shape)) // max(shape[axis], 1)
    return None if cap is None or n <= cap else np.sort(rng.choice(n, cap, replace=False))


def reference_session(analysis, spaces, *, only: bool = False):
    """An ONNX Runtime session of the analysed model that also returns the tensors of `spaces`
    (`only`: just those, running only the part of the graph they depend on)."""
    return session_with_outputs(analysis.model.proto, list(dict.fromkeys(t for t, _ in spaces)), analysis.model.dtypes,
                                only=only)


def calibrate(analysis, data, spaces=None, *, max_samples: int = 512, batch_size: int = 64, progress=None,
              source=None, reference=None, max_rows: int | None = None) -> Stats:
    """Run `data` (arrays keyed by input name, or an iterable of feed dicts) through ONNX
    Runtime once, with every space's tensor as an extra output, and accumulate its moments.
    `source`: a ModelProto of the same graph with other weights (pruned ones zeroed and
    compensated); its moments are then paired with the analysed model's (`Moments.cross`).
    `reference`: a `reference_session` covering `spaces`, when the caller calibrates repeatedly
    (the `source` session then runs only what `spaces` need, as `reference_session(only=True)`).
    `max_rows`: at most this many rows (positions x samples) of each space per batch, drawn at
    random (seeded), the same rows of the source and the reference; None takes every row."""
    spaces = read_spaces(analysis) if spaces is None else list(spaces)
    tensors = list(dict.fromkeys(t for t, _ in spaces))
    dtypes = analysis.model.dtypes
    ref = reference if reference is not None else session_with_outputs(analysis.model.proto, tensors, dtypes)
    sess = ref if source is None else session_with_outputs(source, tensors, dtypes, only=reference is not None)
    if isinstance(data, dict):  # batched as the model takes them (a fixed batch size; 0-d arrays with every batch)
        inputs = [i.name for i in sess.get_inputs()]
        require_keys(data, inputs)
        data, fixed = {n: data[n] for n in inputs}, fixed_batch_size(analysis.model.proto)
        if fixed is None:
            batch_size = _bounded(sess, tensors, data, batch_size, paired=source is not None)
        data = model_batches(data, batch_size, fixed=fixed, max_samples=max_samples)
    acc: dict = {}
    seen, rng = 0, np.random.default_rng(0)
    for feeds in as_batches(data, batch_size):
        take = min(samples_in(feeds), max_samples - seen)
        if not isinstance(feeds, Batch):  # a padded batch of a fixed-size model runs whole; its padding is trimmed
            feeds = {k: v[:take] if np.ndim(v) else v for k, v in feeds.items()}  # 0-d inputs go as they are
        try:
            got = trim(_fetch(sess, tensors, feeds), feeds)
            want = got if source is None else trim(_fetch(ref, tensors, feeds), feeds)
        except Exception as exc:  # noqa: BLE001 - ORT's many run errors, as one line
            raise SpaError(f"the calibration data does not run through the model: {ort_reason(exc)}",
                           "give arrays of the model's input shapes, samples along the first axis") from None
        for space in spaces:
            pick = _pick(np.shape(got[space[0]]), space[1], max_rows, rng)
            rows = _rows(got[space[0]], space[1], pick)
            ref_rows = rows if source is None else _rows(want[space[0]], space[1], pick)
            acc.setdefault(space, _Accumulator(rows.shape[1], source is not None)).add(rows, ref_rows)
        seen += take
        if progress is not None:
            progress(seen, max_samples)
        if seen >= max_samples:
            break
    if seen == 0:
        raise SpaError("no samples in the calibration data")
    return Stats("calibration", {s: a.result() for s, a in acc.items()}, seen)


def _fetch(sess, tensors: list, feeds: dict) -> dict:
    """{tensor: value} of a run; graph inputs among `tensors` (a first layer's input) come from the feeds."""
    ran = [t for t in tensors if t not in feeds]
    return {**{t: feeds[t] for t in tensors if t in feeds}, **dict(zip(ran, sess.run(ran, feeds) if ran else []))}


OUTPUT_BYTES = 64 * 2**20  # the spaces' tensors of one batch held at once, at most (else fewer samples per batch)


def _bounded(sess, tensors: list, data: dict, batch_size: int, *, paired: bool) -> int:
    """`batch_size`, or fewer where one batch's outputs of `tensors` (twice, `paired`: the source's
    and the reference's) would exceed OUTPUT_BYTES, measured on the first sample (PP-OCR
    recognizer, every space: 9.7 MiB per sample, so 6 per batch; the memory peak of its calibrated
    prune fell from 1.0 to 0.6 GB)."""
    try:
        one = sess.run(tensors, {k: v[:1] if np.ndim(v) else v for k, v in data.items()})
    except Exception:  # noqa: BLE001 - the batched run reports what is wrong, in one line
        return batch_size
    per_sample = sum(np.asarray(o).nbytes for o in one) * (2 if paired else 1)
    return int(max(1, min(batch_size, OUTPUT_BYTES // max(per_sample, 1))))


def data_free(analysis, spaces=None) -> Stats:
    """Moments derived from the graph alone (spa.moments)."""
    spaces = read_spaces(analysis) if spaces is None else list(spaces)
    found = moments.propagate(analysis, {t for t, _ in spaces})
    stats = Stats("data-free")
    for space in spaces:
        dist = found.get(space[0])
        if dist is not None and dist.axis == space[1]:
            stats.spaces[space] = dist.moments()
    return stats
