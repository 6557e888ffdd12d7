"""Build ``examples/tiny_resnet_calib.npz``: unlabeled calibration samples for the bundled example.

The example (models/make_example.py) has fixed-seed weights and was never trained, so no real
image set is its data; these stand in for one: 64 smooth random images (noise blurred by
averaging 4x4 blocks and upsampling, then standardised per channel), shaped like its input
``input`` [batch, 3, 32, 32], float32, saved with ``np.savez_compressed`` under the input's name,
samples along the first axis, which is what ``--calib`` reads. A fixed seed makes it reproducible.

Usage::

    python -m models.make_calib examples/tiny_resnet_calib.npz
"""

from __future__ import annotations

import argparse

import numpy as np

SAMPLES = 64


def calibration_images(samples: int = SAMPLES, seed: int = 0) -> np.ndarray:
    """(samples, 3, 32, 32) float32: blurred noise, zero mean and unit variance per channel."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((samples, 3, 8, 8))
    fine = np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3) + 0.3 * rng.standard_normal((samples, 3, 32, 32))
    fine -= fine.mean(axis=(0, 2, 3), keepdims=True)
    fine /= fine.std(axis=(0, 2, 3), keepdims=True)
    return fine.astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output", nargs="?", default="examples/tiny_resnet_calib.npz")
    args = p.parse_args()
    np.savez_compressed(args.output, input=calibration_images())
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
