"""Calibration and evaluation data: `.npz` files keyed by graph input name, or any iterable of feeds.

    data.npz {"x": [N, ...], "labels": [N]} ─load_npz─▶ arrays ─batches─▶ {"x": [b, ...]}, ...

The first axis of every array is the sample axis. A labels array (any key that is not a
graph input) is taken apart with `split_labels`. Python users may pass any iterable of
feed dicts instead of a file; nothing here needs the whole set in memory at once.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx

from spa.core.errors import SpaError, first_line
from spa.core.runtime import graph_inputs


def load_npz(path) -> dict[str, np.ndarray]:
    """All arrays of an `.npz` file (object arrays refused: no pickles are loaded)."""
    p = Path(path)
    if not p.exists():
        raise SpaError(f"cannot read data '{path}': no such file")
    if not p.is_file():
        raise SpaError(f"cannot read data '{path}': not a regular file", "pass the .npz file itself")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise SpaError(f"cannot read data '{path}': not a valid .npz file ({first_line(exc, limit=120)})") from None
    return require_finite(arrays, f"data '{path}'")


def require_finite(arrays: dict, where: str = "data") -> dict:
    """`arrays` itself when every floating array is finite; else a one-line error naming the key
    (NaN or inf in calibration or training data would be scored, trained on and written)."""
    for key, value in arrays.items():
        a = np.asarray(value)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            bad = int(a.size - np.isfinite(a).sum())
            raise SpaError(f"{where} holds {bad} non-finite value(s) (NaN or inf) in '{key}'",
                           "clean the data first: spa does not calibrate or train on NaN/inf")
    return arrays


def require_keys(arrays: dict, inputs: list[str], labels: str | None = None) -> None:
    """A clear error when the data lacks an array for a model input or the labels key."""
    missing = [n for n in inputs if n not in arrays]
    if missing:
        raise SpaError(f"data has no array for model input(s) {missing} (it has {sorted(arrays)})",
                       "save the data keyed by the model's input names")
    if labels is not None and labels not in arrays:
        raise SpaError(f"data has no labels key '{labels}' (it has {sorted(arrays)})")


def split_labels(arrays: dict, inputs: list[str], labels: str | None) -> tuple[dict, np.ndarray | None]:
    """(feed arrays for `inputs`, labels or None); clear errors for missing keys and sizes."""
    require_keys(arrays, inputs, labels)
    feeds = {n: arrays[n] for n in inputs}
    y = arrays[labels] if labels is not None else None
    sizes = {len(a) for a in feeds.values()} | ({len(y)} if y is not None else set())
    if len(sizes) != 1:
        raise SpaError(f"data arrays disagree on the number of samples ({sorted(sizes)})")
    return feeds, y


def batches(feeds: dict[str, np.ndarray], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Slices of `size` samples along the first axis."""
    n = len(next(iter(feeds.values())))
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in feeds.items()}


def as_batches(data, size: int = 64) -> Iterable[dict[str, np.ndarray]]:
    """A dict of arrays (split into batches) or an iterable of feed dicts (used as they are)."""
    if isinstance(data, dict):
        return batches(data, size)
    return data


def calibration_batches(feeds: dict, batch: int, max_samples: int | None = None) -> list[dict]:
    """Feed dicts of up to `batch` samples (sliced along the first axis of the first array) from
    arrays keyed by input name; 0-d arrays (a sample rate) go with every batch unchanged."""
    arrays = {k: np.asarray(v) for k, v in feeds.items() if np.ndim(v)}
    scalars = {k: np.asarray(v) for k, v in feeds.items() if not np.ndim(v)}
    full = len(next(iter(arrays.values()))) if arrays else 1
    n = full if max_samples is None else min(full, max_samples)
    # the last batch stops at max_samples; without a cut, slices run as far as each array goes (a
    # recurrent state whose first axis is not the samples' goes whole with a single batch)
    end = (lambda i: i + batch) if n == full else (lambda i: min(i + batch, n))
    return [{**{k: v[i:end(i)] for k, v in arrays.items()}, **scalars} for i in range(0, n, batch)]


def conform(arrays, proto: onnx.ModelProto, where: str = "data"):
    """`arrays` fitted to the model's graph inputs: float arrays cast to the input's float type
    (float64 data for a float32 model), and a one-line error naming the key when an array's rank
    or kind (float vs integer) cannot be what the input takes. Keys that are not inputs (labels)
    and iterables of feed dicts pass unchanged."""
    if not isinstance(arrays, dict) or proto is None:
        return arrays
    out = dict(arrays)
    for vi, _ in graph_inputs(proto):
        if vi.name in arrays and vi.type.HasField("tensor_type"):
            out[vi.name] = _fit(np.asarray(arrays[vi.name]), vi, where)
    return out


def _fit(a: np.ndarray, vi, where: str) -> np.ndarray:
    tt = vi.type.tensor_type
    want = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else None
    rank = len(tt.shape.dim) if tt.HasField("shape") else None
    if rank is not None and a.ndim != rank:
        raise SpaError(f"{where} array '{vi.name}' has rank {a.ndim} (shape {list(a.shape)}), but the model input "
                       f"takes rank {rank}", "save one array per input, samples along the first axis")
    if want is None or a.dtype == want:
        return a
    if want.kind == "f" and a.dtype.kind in "fiu":
        return a.astype(want)
    if want.kind in "iub" and a.dtype.kind == "f":
        raise SpaError(f"{where} array '{vi.name}' holds {a.dtype} values, but the model input takes {want}",
                       "save integer data (token ids, indices) as integers")
    return a.astype(want)


def fixed_batch_size(proto: onnx.ModelProto) -> int | None:
    """The batch size the model's (non-initializer) inputs are fixed to, or None (`common_batch`)."""
    return common_batch([list(dims or ()) for _, dims in graph_inputs(proto)])


def common_batch(shapes: list) -> int | None:
    """The one static first dimension of input `shapes` (lists of ints, None or names for unknown
    dims; scalars ignored), or None when any input's first axis is dynamic or they disagree (a
    recurrent state's fixed leading 2 is no batch size when the tokens' batch is dynamic)."""
    ranked = [s for s in shapes if s]
    sizes = {s[0] for s in ranked if isinstance(s[0], int) and s[0] > 0}
    dynamic = any(not (isinstance(s[0], int) and s[0] > 0) for s in ranked)
    return None if dynamic or len(sizes) != 1 else sizes.pop()


class Batch(dict):
    """A feed dict padded to a model's fixed batch size: its first `rows` samples are real, the
    rest repeat the last real one and are dropped from every result (`trim`)."""

    def __init__(self, feeds: dict, rows: int):
        super().__init__(feeds)
        self.rows = rows


BATCH_VALUES = 2**21  # input values in one batch of a whole-model run, at most (fewer samples per batch beyond)


def bounded_batch(arrays: dict, batch: int) -> int:
    """`batch`, or fewer samples per batch (at least 1) where one batch of `arrays` (samples along
    the first axis) would hold more than BATCH_VALUES input values: a whole-model run holds every
    activation of its batch (PP-OCR detector crops of 320 x 320: 6 per batch, not 16; its
    calibrated prune's peak fell by about 200 MB)."""
    if not isinstance(arrays, dict):  # feed dicts as given: their batches are the caller's
        return batch
    per = sum(int(np.prod(np.shape(v)[1:])) for v in arrays.values() if np.ndim(v))
    return int(max(1, min(batch, BATCH_VALUES // max(per, 1))))


def model_batches(feeds: dict, batch: int, *, fixed: int | None = None, max_samples: int | None = None) -> list[dict]:
    """`calibration_batches` the way a model takes them: in its `fixed` batch size when it has one
    (`fixed_batch_size`), the last partial batch then padded with copies of its last sample (a
    `Batch` whose padded rows `trim` drops); else in runs of `batch`."""
    out = calibration_batches(feeds, fixed or batch, max_samples)
    if fixed and out:
        out[-1] = _padded(out[-1], fixed)
    return out


def _padded(feeds: dict, size: int) -> dict:
    arrays = [v for v in feeds.values() if np.ndim(v)]
    rows = len(arrays[0]) if arrays else size
    if rows >= size:
        return feeds
    pad = {k: np.concatenate([v, np.repeat(v[-1:], size - rows, axis=0)]) if np.ndim(v) and len(v) == rows else v
           for k, v in feeds.items()}
    return Batch(pad, rows)


def samples_used(calib, cap: int) -> int:
    """How many samples a calibration uses: `cap`, or fewer when its arrays (keyed by input name,
    samples along the first axis) hold fewer; `cap` for feed dicts."""
    sizes = [len(v) for v in calib.values() if np.ndim(v)] if isinstance(calib, dict) else []
    return min([cap, *sizes[:1]])


def samples_in(feeds) -> int:
    """The real samples of one feed dict: a padded `Batch`'s, else the first axis of its first
    array with one (1 when every input is 0-d)."""
    if isinstance(feeds, Batch):
        return feeds.rows
    first = next((v for v in feeds.values() if np.ndim(v)), None)
    return len(first) if first is not None else 1


def trim(results: dict, feeds) -> dict:
    """`results` (tensors computed from `feeds`) without the rows padding added: arrays whose first
    axis is the padded batch are cut to its real samples; anything else passes unchanged."""
    if not isinstance(feeds, Batch):
        return results
    size = len(next(v for v in feeds.values() if np.ndim(v)))
    return {k: v[:feeds.rows] if np.ndim(v) and len(v) == size else v for k, v in results.items()}
