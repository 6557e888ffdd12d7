"""Helpers the API functions share: data arguments, missing files, and the re-check a saved result runs.

    calib="DATA.npz" | {input: array} ─arrays─▶ {input: array}
"""

from __future__ import annotations

import os

import numpy as np

from spa.core.data import load_npz, require_finite
from spa.core.errors import UsageError
from spa.core.model import Model, check_file
from spa.passes.base import Pass, PassResult


def arrays(data, name: str = "calib"):
    """Arrays keyed by input name from a path to an .npz or a dict of arrays; an iterable of feed
    dicts passes as it is (None stays None)."""
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        return load_npz(data)
    if isinstance(data, dict):
        return require_finite({k: np.asarray(v) for k, v in data.items()}, f"{name}=")
    if hasattr(data, "__iter__"):
        return data
    raise UsageError(f"invalid {name}={type(data).__name__}: expected a path to an .npz, a dict of arrays or an "
                     "iterable of feed dicts")


def require_files(*models) -> None:
    """Fail before any work when a model argument names a file that is not there, is not a regular
    file, or holds tensors spa would refuse to load (spa.core.model.check_file)."""
    for model in models:
        if isinstance(model, (str, os.PathLike)):
            check_file(model)


def data_name(data) -> str | None:
    """The path a data argument names, as the documents print it (None for arrays in memory)."""
    return str(data) if isinstance(data, (str, os.PathLike)) else None


def saver(rewrite: Pass, model: Model, done: PassResult):
    """`verify(file)` for Result.save: the pass's promises re-checked on the written file."""
    return lambda file: rewrite.ensures(model, done.model, file)
